"""The local-rules family (issue 20, ``models.local``): a classifier trained on the substrate by any rule of
``models.train.RULES`` (centred EP, the exact gradient, and the local rules: counter-current learning,
Forward-Forward, NoProp-DT and -CT, predictive coding), on a device with one effect at a
level: programming noise, read noise, pulsed updates, time-constant mismatch (``device`` section).

* ``local_rules``: metrics per epoch (``ep_train``'s), saved after every epoch; its figure is the device
  study's, accuracy and gradient cosine against the level, one column per effect, one colour per rule.

Each rule trains the model it defines (NoProp's blocks, predictive coding's feed-forward circuit,
counter-current's two anti-parallel circuits, Forward-Forward's one circuit per layer); EP and the exact gradient train ``ep_train``'s classifier (cross-entropy
readout, tied feedback). ``network.sizes`` is one block's (inputs, hidden..., classes) for every rule.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from models.local import (  # importing models.local registers its rules in RULES
    ccl,
    forward_forward,
)
from models.train import OPTIMISERS, RULES, Classifier, make_rule, train
from studies.catalogue.devices import plot_devices, swept_effects
from studies.catalogue.ep import (
    EP_RULE,
    EP_TRAIN_SCHEMA,
    task_data,
    task_relaxation,
    training_result,
    warmup_ep_train,
)
from studies.config import Field, Range
from studies.runs import Result, Task, discard
from substrate import devices as D
from substrate.errors import SubstrateValueError

# the models of the rules of models.local that build theirs with a class of their module (NoProp and
# predictive coding: rule.model); their defaults are their papers' (activation, biases)
MODELS = {ccl.CounterCurrent.name: ccl.CounterCurrentModel.layered,
          forward_forward.ForwardForward.name: forward_forward.ForwardForwardModel.layered}
# limit: ep_bias's diagnostic of the finite-nudge bias, not a learning rule
LOCAL_RULE_NAMES = tuple(name for name in RULES if name != "limit")
EFFECTS = ("none", "programming_noise", "read_noise", "pulsed", "tau_mismatch")
LOCAL_DEVICE = {
    "effect": Field(str, EFFECTS, "none",
                    "the device effect: programming_noise (aihwkit PCM programming noise x level), read_noise "
                    "(relative sigma = level, per read_policy), pulsed (every update written as pulses of a "
                    "constant-step device, dw_min = level), tau_mismatch (relative spread of tau = level)"),
    "level": Field(float, Range(0.0, 1e4), 0.0, "the effect's level (see effect)"),
    "read_policy": Field(str, ("phase", "equilibrium"), "equilibrium", "when read noise is redrawn"),
}
LOCAL_RULE = {
    "name": Field(str, LOCAL_RULE_NAMES, "centred", "the learning rule (models.train.RULES)"),
    "beta": EP_RULE["beta"],
    "points": EP_RULE["points"],
    "eta": Field(float, Range(0.0, 1e3, lo_open=True), 0.1, "weight of the denoising loss (NoProp)"),
    "blocks": Field(int, Range(1, 100), 10, "T, blocks of the discrete schedule (noprop_dt)"),
    "steps": Field(int, Range(1, 1000), 20, "steps of the inference ODE (noprop_ct)"),
}
# ep_train's fields (same order), without homeostasis (the local rules have none), with this study's rule,
# device and optimiser defaults
LOCAL_RULES_SCHEMA = {
    **{k: v for k, v in EP_TRAIN_SCHEMA.items() if not k.startswith("homeostasis")},
    "rule": LOCAL_RULE,
    "optimiser": EP_TRAIN_SCHEMA["optimiser"]._replace(default="adam"),
    "lr": EP_TRAIN_SCHEMA["lr"]._replace(default=0.003),
    "device": LOCAL_DEVICE,
}


def local_device(config):
    """The substrate.devices.Device of a ``device`` section (None for effect ``none``)."""
    effect, level = config["effect"], config["level"]
    if effect == "none":
        return None
    if effect == "pulsed":
        return D.Device((D.ConstantStep(dw_min=level),), name=f"pulsed:{level:g}")
    return D.Device(swept_effects(effect, level, config["read_policy"]), name=f"{effect}:{level:g}")


def build(config: dict, rng: np.random.Generator):
    """(rule, model) of a config: the rule by name with the section's values of its fields, and the model
    it trains (``rule.model`` for a rule that defines one, :data:`MODELS` for the others of models.local,
    else ``ep_train``'s classifier)."""
    r, net = config["rule"], dict(config["network"])
    cls = RULES[r["name"]]
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    rule = make_rule(r["name"], **{k: v for k, v in r.items() if k in fields})
    sizes, cost = net.pop("sizes"), net.pop("cost")
    if r["name"] in MODELS:
        return rule, MODELS[r["name"]](sizes, rng)
    if not hasattr(rule, "model"):
        return rule, Classifier.layered(sizes, rng, cost=cost, **net)
    options = {"activation": net["activation"], "init_scale": net["init_scale"]}
    if r["name"] == "noprop_dt":
        options["blocks"] = r["blocks"]
    elif r["name"] == "noprop_ct":
        options["steps"] = r["steps"]
    return rule, rule.model(sizes, rng, **options)


def run_local_rules(config: dict, seed: int, save_partial=discard) -> Result:
    """Train the config's rule on its model, on the config's device: metrics per epoch."""
    data = task_data(config)
    sizes = config["network"]["sizes"]
    if sizes[0] != data.n_features or sizes[-1] != data.classes:
        raise SubstrateValueError(f"network.sizes={sizes}: {config['data']} needs {data.n_features} inputs "
                                     f"and {data.classes} classes")
    rng = np.random.default_rng(seed)
    rule, model = build(config, rng)
    device = local_device(config["device"])
    if device is not None:  # the devices draw from their own streams, apart from training's
        chip = np.random.default_rng([seed, 6])
        if hasattr(model, "on_device"):  # a model of several circuits puts each on the device
            model = model.on_device(device, chip)
        else:
            model.network = D.attach(model.network, device, chip)
    opt = OPTIMISERS[config["optimiser"]]
    optimiser = opt(config["lr"], config["momentum"]) if config["optimiser"] == "sgd" else opt(config["lr"])

    def on_epoch(history):
        save_partial(result_of(history))
        save_partial.progress(history.epoch[-1], config["epochs"])

    history = train(model, data, rule=rule, optimiser=optimiser, epochs=config["epochs"],
                    batch_size=config["batch_size"], relaxation=task_relaxation(config), rng=rng,
                    probe=config["probe"], progress=False, on_epoch=on_epoch)
    return result_of(history)


def result_of(history) -> Result:
    """``ep_train``'s metrics per epoch, without the two this study never has: the homeostasis penalty
    (no homeostasis) and the angle between W and B^T (no independent feedback)."""
    result = training_result(history)
    for name in NOT_MEASURED:
        del result.arrays[name]
    return result


NOT_MEASURED = ("asymmetry_penalty", "weight_angle")


TASK = Task(LOCAL_RULES_SCHEMA, run_local_rules, warmup_ep_train, plot_devices,
            "local rules (NoProp, predictive coding, ...) beside EP and the exact gradient under device effects")
