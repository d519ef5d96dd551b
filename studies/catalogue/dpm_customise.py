"""The three customisations of AdjointDPM (Pan et al., ICLR 2024; docs/equations.md, section 7) on the 8x8
digits: task ``dpm_customise`` (issue 8).

A conditional noise predictor (``models.dpm``) trained on the digits (the ``model`` section, cached
by :func:`studies.catalogue.dpm_gradients.trained_model`) samples by the probability-flow ODE (the ``sampler``
section); every gradient of a loss on the samples comes from the continuous adjoint
(:func:`models.dpm.customise`, Adam). ``what`` picks the customisation:

* ``noise`` (security auditing): samples conditioned on a source digit; each sample's initial noise
  x_T is optimised so that a fixed classifier (:func:`studies.catalogue.dpm_gradients.digits_classifier`, the
  *attacked* one) labels it as the target digit (cross-entropy). Measured per (source, target) pair:
  the share the attacked classifier labels target at every step; before and after, the shares an
  independent classifier (another seed, the *judge*) labels target and source (did the digit change,
  or only the attacked classifier's opinion?); how far x_T moved, ||x_T - x_T0|| / ||x_T0||, and the
  image, the RMS pixel change (pixels clipped to [-1, 1], as every classifier sees them).
* ``conditioning``: a class embedding c, started at one digit's, learned so that new samples have
  thicker strokes while staying that digit; fresh noise every step. Measured on held-out noise,
  before and after: the ink (below) and the judge's accuracy on the digit.
* ``weights``: the network's weights fine-tuned towards the same style for every digit (each batch
  cycles through the digits; fresh noise every step). Measured on held-out noise, per digit, before
  and after: ink and the judge's accuracy.

The style loss of a sample x (64 pixels in [-1, 1]) of digit d is

    ((ink(x) - ink*_d) / ink*_d)^2 + keep * CE(classifier(x), d),
    ink(x) = mean over pixels of sigmoid(x / edge),   ink*_d = ink_factor * (mean ink of digit d's training images),

CE the cross-entropy of the attacked classifier on the image clipped to [-1, 1].

ink is a soft share of inked pixels (above mid-grey). Its gradient is largest at grey pixels, the
strokes' edges, so raising it widens the strokes; the plain mean of (x + 1) / 2 has the same
gradient at every pixel and would grey the background as much as it thickens the strokes.
"""

from __future__ import annotations

import functools
import json
import textwrap
import time

import matplotlib.pyplot as plt
import numpy as np

from studies import figures as F
from studies.catalogue.dpm_gradients import MODEL, digits_classifier, trained_model
from studies.config import Check, Field, ListOf, Range
from studies.runs import Result, Task, discard
from substrate.errors import SubstrateValueError

KINDS = ("noise", "conditioning", "weights")
SOLVERS = ("euler", "midpoint", "rk4", "ms2", "ms3", "dpm1", "dpm2")  # models.dpm.SOLVERS: all have an adjoint
GRIDS = ("uniform_t", "logsnr", "karras")  # models.dpm.GRIDS (not imported: the schema loads without torch)
ODES = ("original", "reparameterised", "gaussian")  # models.dpm.ODES
STAGES = ["before", "after"]
NOISE, FRESH, HELD_OUT = 1, 2, 3  # the random streams of a run (_generator): one purpose each


def _pair(v: str):
    """'S>T' -> (S, T)."""
    s, _, t = v.partition(">")
    return int(s), int(t)


def _pair_ok(v: str) -> bool:
    s, sep, t = v.partition(">")
    return bool(sep) and s.isdigit() and t.isdigit() and len(s) == len(t) == 1 and s != t


CUSTOMISE_SCHEMA = {
    "model": {**MODEL,
              "dataset": Field(str, ("digits",), "digits", "training data: scikit-learn's 8x8 digits (pixels "
                                                           "in [-1, 1], class = digit)"),
              "hidden": Field(int, Range(1, 4096), 256, MODEL["hidden"].doc),
              "depth": Field(int, Range(1, 16), 3, MODEL["depth"].doc),
              "embed": Field(int, Range(1, 1024), 16, MODEL["embed"].doc),
              "train_steps": Field(int, Range(1, 10_000_000), 20000, MODEL["train_steps"].doc),
              "lr": Field(float, Range(0.0, 1.0, lo_open=True), 1e-3, MODEL["lr"].doc)},
    "what": Field(str, KINDS, "noise", "the customisation: the initial noise x_T against a classifier, a "
                                       "learned class embedding c, or fine-tuned weights"),
    "sampler": {
        "solver": Field(str, SOLVERS, "dpm2", "steps of the probability-flow ODE and of its adjoint"),
        "steps": Field(int, Range(1, 10_000), 20, "sampler steps"),
        "grid": Field(str, GRIDS, "logsnr", "time grid of the sampler"),
        "ode": Field(str, ODES, "reparameterised", "form of the probability-flow ODE (AdjointDPM's: "
                                                   "reparameterised; irrelevant for dpm1/dpm2)"),
    },
    "noise": {
        "pairs": Field(ListOf(str, 1, 45, Check(_pair_ok, "'S>T', two different digits, e.g. '3>8'")),
                       Check(lambda v: len(set(v)) == len(v), "distinct pairs"), ["1>7", "3>8", "5>9", "0>6"],
                       "(source, target) digits: samples of the source pushed to be classified as the target"),
        "samples": Field(int, Range(1, 100_000), 32, "samples (initial noises) optimised per pair"),
        "steps": Field(int, Range(1, 100_000), 30, "Adam steps on x_T"),
        "lr": Field(float, Range(0.0, 100.0, lo_open=True), 0.05, "Adam step size on x_T"),
    },
    "conditioning": {
        "digit": Field(int, Range(0, 9), 1, "the digit whose embedding c starts from and whose class is kept"),
        "batch": Field(int, Range(1, 100_000), 32, "fresh samples per Adam step"),
        "steps": Field(int, Range(1, 100_000), 150, "Adam steps on c"),
        "lr": Field(float, Range(0.0, 100.0, lo_open=True), 0.1, "Adam step size on c"),
    },
    "weights": {
        "batch": Field(int, Range(10, 100_000), 40, "fresh samples per Adam step, cycling through the 10 digits"),
        "steps": Field(int, Range(1, 100_000), 60, "Adam steps on the weights"),
        "lr": Field(float, Range(0.0, 1.0, lo_open=True), 1e-4, "Adam step size on the weights"),
    },
    "style": {
        "ink_factor": Field(float, Range(0.0, 3.0, lo_open=True), 1.5,
                            "target ink: this times the mean ink of the digit's training images"),
        "edge": Field(float, Range(0.0, 10.0, lo_open=True), 0.25,
                      "width of the sigmoid that counts a pixel as inked: ink = mean sigmoid(x / edge)"),
        "keep": Field(float, Range(0.0, 1e3), 0.1, "weight of the classifier's cross-entropy to the digit "
                                                    "(keeps the class while the style changes)"),
    },
    "evaluation": {
        "samples": Field(int, Range(1, 100_000), 100, "held-out samples per digit, before and after "
                                                      "(conditioning, weights)"),
        "show": Field(int, Range(1, 64), 8, "images kept per pair or digit, before and after"),
    },
}


def _solver(config):
    """The ``solver`` and ``ode`` arguments of models.dpm.customise, from the ``sampler`` section."""
    return {"solver": config["sampler"]["solver"], "ode": config["sampler"]["ode"]}


def _generator(seed: int, *stream: int):
    """A torch Generator for one purpose of a run: its own stream of (seed, *stream)."""
    import torch

    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0]))


@functools.lru_cache(maxsize=4)
def _classifiers(seed: int):
    """(attacked classifier, its held-out accuracy, judge, its accuracy): ``digits_classifier(seed)``
    and ``digits_classifier(seed + 1)``, trained once per process (fixed: no gradient to their weights)."""
    return digits_classifier(seed) + digits_classifier(seed + 1)


def ink(x, edge: float):
    """The soft share of inked pixels of each image (rows of x, pixels in [-1, 1]): mean sigmoid(x / edge)."""
    import torch

    return torch.sigmoid(x / edge).mean(-1)


def _check(config: dict):
    """Raises SubstrateValueError for a config whose keys contradict each other."""
    show = config["evaluation"]["show"]
    section = "noise" if config["what"] == "noise" else "evaluation"
    if show > config[section]["samples"]:
        raise SubstrateValueError(f"evaluation.show={show}: at most {section}.samples = {config[section]['samples']} "
                                  "(the images shown are among the samples drawn)")


def run_dpm_customise(config: dict, seed: int, save_partial=discard) -> Result:
    """One customisation (``what``) of the digits diffusion model trained with ``seed``; the attacked
    classifier is ``digits_classifier(seed)``, the judge ``digits_classifier(seed + 1)``. Arrays are
    named by the customisation (``noise_*``, ``conditioning_*``, ``weights_*``); per-step arrays hold
    the value on the batch before each Adam step; images are the first ``evaluation.show`` samples
    (8x8, pixels in [-1, 1]) before and after, from the same initial noise. Scalars also hold the
    classifiers' held-out accuracies on real digits, ``seconds`` (the whole run) and
    ``train_seconds`` (the model's training in it; 0 from the cache)."""
    import torch

    from models import dpm

    _check(config)
    start = time.perf_counter()
    model, x, labels, train_seconds = trained_model(config["model"], seed)
    classifier, accuracy, judge, judge_accuracy = _classifiers(seed)
    times = dpm.grid(model.schedule, config["sampler"]["steps"], config["sampler"]["grid"])

    def draw(c, noise):
        with torch.no_grad():
            return dpm.sample(model, model.schedule, noise, c, times, config["sampler"]["ode"],
                              config["sampler"]["solver"])

    kind = {"noise": _noise, "conditioning": _conditioning, "weights": _weights}[config["what"]]
    arrays, scalars, coords = kind(config, seed, model, x, labels, classifier, judge, draw, times)
    scalars.update({"classifier_accuracy": accuracy, "judge_accuracy": judge_accuracy,
                    "train_seconds": train_seconds, "seconds": time.perf_counter() - start})
    return Result(arrays=arrays, scalars=scalars, coords=coords)


def _shown(x0):
    """The images as displayed, pixels clipped to [-1, 1]: what every classifier sees (unclipped, the
    attack on the noise pushed pixels out to +-35, measured: no image at all)."""
    return x0.clamp(-1.0, 1.0)


def _share(net, x0, digit) -> float:
    """The share of the images x0 that ``net`` labels ``digit``."""
    import torch

    with torch.no_grad():
        return float((net(_shown(x0)).argmax(-1) == digit).double().mean())


def _images(x0, show):
    """The first ``show`` samples as 8x8 images."""
    return x0[:show].reshape(-1, 8, 8).numpy()


def _noise(config, seed, model, x, labels, classifier, judge, draw, times):
    """Security auditing: per pair, x_T of ``noise.samples`` samples of the source digit optimised
    against the attacked classifier's cross-entropy to the target; (arrays, scalars, coords)."""
    import torch

    from models import dpm

    n, show = config["noise"], config["evaluation"]["show"]
    pairs = [_pair(p) for p in n["pairs"]]
    P, K = len(pairs), n["steps"]
    loss, share = np.empty((P, K)), np.empty((P, K))
    judge_target, judge_source = np.empty((P, 2)), np.empty((P, 2))
    target_share, noise_move, image_move = np.empty((P, 2)), np.empty(P), np.empty(P)
    images = np.empty((P, 2, show, 8, 8))
    for i, (source, target) in enumerate(pairs):
        c = model.embedding(source).detach()
        x_T0 = torch.randn(n["samples"], x.shape[1], dtype=torch.float64, generator=_generator(seed, NOISE, i))
        labelled = []  # the attacked classifier's target share before each step, recorded by the loss

        def cross_entropy(x0):
            x0 = x0.detach().requires_grad_(True)
            logits = classifier(_shown(x0))
            labelled.append(float((logits.argmax(-1) == target).double().mean()))
            L = torch.nn.functional.cross_entropy(logits, torch.full((len(x0),), target))
            return float(L.detach()), torch.autograd.grad(L, x0)[0]

        before = draw(c, x_T0)
        x_T, _, loss[i], after = dpm.customise(model, model.schedule, x_T0, c, times, cross_entropy, what="noise",
                                               steps=K, lr=n["lr"], **_solver(config))
        share[i] = labelled
        for s, x0 in enumerate((before, after)):
            target_share[i, s] = _share(classifier, x0, target)
            judge_target[i, s], judge_source[i, s] = _share(judge, x0, target), _share(judge, x0, source)
            images[i, s] = _images(x0, show)
        noise_move[i] = float(((x_T - x_T0).norm(dim=1) / x_T0.norm(dim=1)).mean())
        image_move[i] = float(((_shown(after) - _shown(before)) ** 2).mean(1).sqrt().mean())
    return (
        {"noise_loss": (("pair", "step"), loss), "noise_target_share_steps": (("pair", "step"), share),
         "noise_target_share": (("pair", "stage"), target_share),
         "noise_judge_target_share": (("pair", "stage"), judge_target),
         "noise_judge_source_share": (("pair", "stage"), judge_source),
         "noise_x_T_move": (("pair",), noise_move), "noise_image_move": (("pair",), image_move),
         "noise_images": (("pair", "stage", "shown", "row", "col"), images)},
        {"target_share_before": float(target_share[:, 0].mean()),
         "target_share_after": float(target_share[:, 1].mean()),
         "judge_target_share_after": float(judge_target[:, 1].mean()),
         "judge_source_share_after": float(judge_source[:, 1].mean()),
         "x_T_move": float(noise_move.mean()), "image_move": float(image_move.mean())},
        {"pair": list(n["pairs"]), "stage": STAGES})


def _style_loss(config, classifier, targets, digits, record):
    """loss_grad of the style loss (module docstring) for a batch whose rows are of ``digits`` with
    target inks ``targets``; ``record(ink)`` gets the batch's mean ink at every call."""
    import torch

    st = config["style"]

    def loss_grad(x0):
        x0 = x0.detach().requires_grad_(True)
        soft = ink(x0, st["edge"])
        record(float(soft.detach().mean()))
        L = (((soft - targets) / targets) ** 2).mean() + \
            st["keep"] * torch.nn.functional.cross_entropy(classifier(_shown(x0)), digits)
        return float(L.detach()), torch.autograd.grad(L, x0)[0]

    return loss_grad


def _class_inks(config, x, labels):
    """Target ink per digit: ``style.ink_factor`` times the mean ink of its training images."""
    import torch

    soft = ink(torch.as_tensor(x), config["style"]["edge"]).numpy()
    return config["style"]["ink_factor"] * np.array([soft[labels == d].mean() for d in range(10)])


def _conditioning(config, seed, model, x, labels, classifier, judge, draw, times):
    """A class embedding learned for thicker strokes of one digit, fresh noise every step."""
    import torch

    from models import dpm

    cd, ev, st = config["conditioning"], config["evaluation"], config["style"]
    digit = cd["digit"]
    target = float(_class_inks(config, x, labels)[digit])
    c0 = model.embedding(digit).detach()
    inks = []
    loss_grad = _style_loss(config, classifier, torch.full((cd["batch"],), target, dtype=torch.float64),
                            torch.full((cd["batch"],), digit), inks.append)
    shape = (cd["batch"], x.shape[1])
    _, c, loss, _ = dpm.customise(model, model.schedule, torch.zeros(shape, dtype=torch.float64), c0, times,
                                  loss_grad, what="conditioning", steps=cd["steps"], lr=cd["lr"],
                                  **_solver(config), generator=_generator(seed, FRESH))
    held_out = torch.randn(ev["samples"], x.shape[1], dtype=torch.float64, generator=_generator(seed, HELD_OUT))
    samples = [draw(c0, held_out), draw(c, held_out)]
    ink_eval = np.array([float(ink(s, st["edge"]).mean()) for s in samples])
    accuracy = np.array([_share(judge, s, digit) for s in samples])
    return (
        {"conditioning_loss": (("step",), loss), "conditioning_ink_steps": (("step",), np.array(inks)),
         "conditioning_ink": (("stage",), ink_eval), "conditioning_accuracy": (("stage",), accuracy),
         "conditioning_images": (("stage", "shown", "row", "col"),
                                 np.stack([_images(s, ev["show"]) for s in samples]))},
        {"conditioning_digit": digit, "ink_target": target, "ink_before": ink_eval[0], "ink_after": ink_eval[1],
         "accuracy_before": accuracy[0], "accuracy_after": accuracy[1],
         "c_move": float((c - c0).norm() / c0.norm())},
        {"stage": STAGES})


def _weights(config, seed, model, x, labels, classifier, judge, draw, times):
    """The weights fine-tuned for thicker strokes of every digit, fresh noise every step."""
    import torch

    from models import dpm

    w, ev, st = config["weights"], config["evaluation"], config["style"]
    targets = _class_inks(config, x, labels)
    digits = torch.arange(w["batch"]) % 10
    held_out = torch.randn(ev["samples"], x.shape[1], dtype=torch.float64, generator=_generator(seed, HELD_OUT))

    def evaluate():
        """(ink, judge accuracy, images) per digit on the held-out noise."""
        out = [draw(model.embedding(d).detach(), held_out) for d in range(10)]
        return (np.array([float(ink(s, st["edge"]).mean()) for s in out]),
                np.array([_share(judge, s, d) for d, s in enumerate(out)]),
                np.stack([_images(s, ev["show"]) for s in out]))

    before = evaluate()
    inks = []
    loss_grad = _style_loss(config, classifier, torch.as_tensor(targets)[digits], digits, inks.append)
    # the embeddings are a fixed input here: customise trains the weights with c detached
    _, _, loss, _ = dpm.customise(model, model.schedule, torch.zeros(w["batch"], x.shape[1], dtype=torch.float64),
                                  model.embedding(digits).detach(), times, loss_grad, what="weights",
                                  steps=w["steps"], lr=w["lr"], **_solver(config),
                                  generator=_generator(seed, FRESH))
    after = evaluate()
    ink_eval, accuracy, images = (np.stack([b, a], axis=1) for b, a in zip(before, after))
    return (
        {"weights_loss": (("step",), loss), "weights_ink_steps": (("step",), np.array(inks)),
         "weights_ink_target": (("digit",), targets),
         "weights_ink": (("digit", "stage"), ink_eval), "weights_accuracy": (("digit", "stage"), accuracy),
         "weights_images": (("digit", "stage", "shown", "row", "col"), images)},
        {"ink_target": float(targets.mean()), "ink_before": float(ink_eval[:, 0].mean()),
         "ink_after": float(ink_eval[:, 1].mean()), "accuracy_before": float(accuracy[:, 0].mean()),
         "accuracy_after": float(accuracy[:, 1].mean())},
        {"digit": list(range(10)), "stage": STAGES})


# ------------------------------------------------------------------------------------ figure
def _montage(images, labels, ax, title):
    """Rows of 8x8 images (``images``: rows, columns, 8, 8) with a one-pixel gap, labelled on the left."""
    rows, cols = images.shape[:2]
    canvas = np.full((rows * 9 - 1, cols * 9 - 1), np.nan)
    for r in range(rows):
        for c in range(cols):
            canvas[r * 9:r * 9 + 8, c * 9:c * 9 + 8] = images[r, c]
    ax.imshow(canvas, cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_yticks(np.arange(rows) * 9 + 3.5, labels, fontsize=7)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)


def _bars(ax, names, values, labels, colors):
    """Grouped bars: one group per name, one bar per row of ``values`` (rows: series, seeds as points
    behind the median: values has shape series, names, seeds)."""
    width = 0.8 / len(values)
    for k, (v, label, color) in enumerate(zip(values, labels, colors)):
        pos = np.arange(len(names)) + (k - (len(values) - 1) / 2) * width
        ax.bar(pos, np.nanmedian(v, axis=-1), width, color=color, alpha=0.7, label=label)
        ax.plot(np.repeat(pos, v.shape[-1]), v.reshape(-1), "k.", ms=3)
    ax.set_xticks(np.arange(len(names)), names, fontsize=8)


def plot_dpm_customise(archive_path: str):
    """AdjointDPM's customisations (one row per ``what`` in the archive; medians over seeds, seeds as
    points; images from the first seed). noise: the attacked classifier's target share per Adam step
    and the loss, per (source, target) pair; the shares after (attacked and independent classifier);
    how far x_T and the image moved; samples before and after. conditioning and weights: the batch's
    ink per step against the target, the loss; ink and the independent classifier's accuracy on
    held-out noise before and after (per digit for weights); samples before and after."""
    ds, axes = F.open_sweep(archive_path)
    whats = [str(w) for w in ds["what"].values] if "what" in ds.dims else [json.loads(ds.attrs["base"])["what"]]
    fig, grid = plt.subplots(len(whats), 5, figsize=(25, 4.6 * len(whats)), layout="constrained", squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1.1, 1, 1.7]})

    def run(what):
        one = ds.sel(what=what) if "what" in ds.dims else ds
        return one.transpose("seed", ...) if "seed" in one.dims else one.expand_dims("seed")

    def steps(ax, da, label, color, log=False):
        v = np.atleast_2d(da.values)
        ok = np.isfinite(v).any(0)
        ax.plot(np.arange(v.shape[1])[ok], np.nanmedian(v[:, ok], 0), color=color, label=label)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("Adam step")
        F.integer_ticks(ax.xaxis)

    for row, what in zip(grid, whats):
        one = run(what)
        a_curve, a_loss, a_m1, a_m2, a_img = row
        if what == "noise":
            pairs = [str(p) for p in one["pair"].values]
            for k, p in enumerate(pairs):
                steps(a_curve, one["noise_target_share_steps"].sel(pair=p), p, f"C{k}")
                steps(a_loss, one["noise_loss"].sel(pair=p), p, f"C{k}", log=True)
            a_curve.set_ylabel("share the attacked classifier labels target")
            a_curve.set_title("noise: x_T optimised against a classifier (source>target)")
            a_loss.set_ylabel("cross-entropy to the target")
            a_loss.set_title("loss of the attacked classifier")

            def per_pair(name, stage):
                return one[name].sel(stage=stage).transpose("pair", "seed").values

            _bars(a_m1, pairs, [per_pair("noise_target_share", "before"), per_pair("noise_target_share", "after"),
                                per_pair("noise_judge_target_share", "after"),
                                per_pair("noise_judge_source_share", "after")],
                  ["target, attacked classifier, before", "target, attacked classifier, after",
                   "target, independent classifier, after", "source, independent classifier, after"],
                  ["C7", "C3", "C1", "C0"])
            a_m1.set_ylabel("share of the samples")
            a_m1.set_title("labels before / after")
            for ax in (a_m1, a_m2):
                ax.set_xlabel("digits (source>target)")
            _bars(a_m2, pairs, [one["noise_x_T_move"].transpose("pair", "seed").values,
                                one["noise_image_move"].transpose("pair", "seed").values],
                  [r"$\|x_T - x_T^0\| / \|x_T^0\|$", "image RMS change (pixels in [-1, 1])"], ["C4", "C5"])
            a_m2.set_title("how far the noise and the image moved")
            a_m2.set_ylabel("relative change")
            im = one["noise_images"].isel(seed=0).values  # pair, stage, shown, 8, 8
            _montage(im.reshape(-1, *im.shape[2:]), [f"{p} {s}" for p in pairs for s in STAGES], a_img,
                     "samples before / after (same x_T start)")
        else:
            name = what
            steps(a_curve, one[f"{name}_ink_steps"], "batch ink", "C0")
            a_curve.axhline(float(np.nanmedian(one["ink_target"].values)), color="k", ls="--", label="target ink")
            a_curve.set_ylabel("ink (soft share of inked pixels)")
            steps(a_loss, one[f"{name}_loss"], "", "C0", log=True)
            a_loss.set_ylabel("style loss (ink + keep x cross-entropy)")
            a_loss.set_title("loss")
            if what == "conditioning":
                digit = int(np.nanmedian(one["conditioning_digit"].values))
                a_curve.set_title(f"conditioning: embedding c of digit {digit} learned, fresh noise")
                for ax, var, label in ((a_m1, "conditioning_ink", "ink"),
                                       (a_m2, "conditioning_accuracy", "independent classifier accuracy")):
                    _bars(ax, STAGES, [one[var].transpose("stage", "seed").values], [label], ["C2"])
                    ax.set_ylabel(label)
                    ax.set_xlabel("stage")
                a_m1.axhline(float(np.nanmedian(one["ink_target"].values)), color="k", ls="--", label="target")
                im = one["conditioning_images"].isel(seed=0).values  # stage, shown, 8, 8
                _montage(im, STAGES, a_img, "held-out samples before / after")
            else:
                a_curve.set_title("weights: fine-tuned for every digit, fresh noise")
                digits = [str(d) for d in one["digit"].values]
                for ax, var, label in ((a_m1, "weights_ink", "ink"),
                                       (a_m2, "weights_accuracy", "independent classifier accuracy")):
                    _bars(ax, digits, [one[var].sel(stage=s).transpose("digit", "seed").values for s in STAGES],
                          [f"{label}, {s}" for s in STAGES], ["C7", "C2"])
                    ax.set_ylabel(label)
                    ax.set_xlabel("digit")
                a_m1.plot(np.arange(len(digits)), np.nanmedian(one["weights_ink_target"].transpose("digit", "seed")
                                                               .values, -1), "k_", ms=12, label="target")
                im = one["weights_images"].isel(seed=0).values[:, :, :2]  # digit, stage, 2 shown, 8, 8
                im = im.reshape(len(digits), -1, 8, 8).transpose(1, 0, 2, 3)  # (stage, shown) rows, digits across
                _montage(im, [f"{s} {k + 1}" for s in STAGES for k in range(im.shape[0] // 2)], a_img,
                         "held-out samples before / after, one column per digit")
            a_m1.set_title("held-out noise: ink before / after")
            a_m2.set_title("held-out noise: class kept?")
        for ax in row[2:4]:  # bars: room above them for the legend
            ax.set_ylim(0, ax.get_ylim()[1] * 1.3)
        for ax in row[:4]:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="upper center" if ax in row[2:4] else "best", ncol=2 if ax in row[2:4] else 1)
    fig.suptitle(textwrap.fill(f"{ds.attrs['study_name']}: {ds.attrs.get('description', '')} (medians over "
                               "seeds, seeds as points; images: first seed)", 160), fontsize=10)
    return F.readable_ticks(fig)


TASK = Task(CUSTOMISE_SCHEMA, run_dpm_customise, plot=plot_dpm_customise,
            description="AdjointDPM's customisations on digits: noise vs a classifier, a learned embedding, weights")
