"""Helpers of the study figures (each study module draws its own, :mod:`studies.catalogue`), and
:func:`draw`, the figure of an archive chosen by its task. Figures read an archive and return a
matplotlib Figure; they compute nothing."""

from __future__ import annotations

import json
import math
import warnings

import matplotlib

matplotlib.use("Agg")  # figures are written to files; no display is needed  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as ticker  # noqa: E402
import numpy as np  # noqa: E402

from studies.archives import open_dataset, read_header  # noqa: E402
from substrate import archive  # noqa: E402
from substrate.errors import ArchiveError  # noqa: E402


def open_sweep(path: str):
    """(the archive as an ``xarray.Dataset`` (:func:`studies.archives.open_dataset`), its sweep axes in
    order, the seed last)."""
    ds = open_dataset(path)
    return ds, list(json.loads(ds.attrs["axes"]))


def other_axis(ds, axes, exclude):
    """The first sweep axis not in ``exclude`` and not the seed, or None."""
    return next((a for a in axes if a not in exclude and a != "seed"), None)


def label(ds, dim, value):
    """A legend label for one point of ``dim``, with the coordinates that vary along it (not those
    equal at every point, nor one that repeats the point's name)."""
    point = ds.sel({dim: value}) if dim in ds.indexes else ds.isel({dim: value})
    name = str(value)
    extra = [f"{c}={fmt(point[c].item())}" for c in ds.coords
             if c != dim and ds[c].dims == (dim,) and c != "method" and len(set(ds[c].values.tolist())) > 1
             and fmt(point[c].item()) != name]
    return f"{name} ({', '.join(extra)})" if extra else name


def fmt(v):
    """A coordinate value as text: floats by ``:g``."""
    return f"{v:g}" if isinstance(v, float) else str(v)


def panel_title(dim, value) -> str:
    """The title of a panel at one ``value`` of the sweep axis ``dim`` ("" without one): the axis in
    words, angles in degrees."""
    if dim is None:
        return ""
    text = fmt(value.item() if hasattr(value, "item") else value)
    return f"{dim.replace('_', ' ')} = {text}" + ("°" if dim.endswith("angle") else "")


def setting(ds) -> str:
    """What a sweep archive was made under, as a legend label: its profile and the ``--set`` overrides
    of the study's settings (not those of the sweep's grid or seeds), or "as in the study file"."""
    overrides = [o for o in json.loads(ds.attrs.get("overrides", "[]")) if not o.startswith("sweep.")]
    said = ([f"profile {ds.attrs['profile']}"] if ds.attrs.get("profile") else []) + \
        [o.removeprefix("base.") for o in overrides]
    return ", ".join(said) or "as in the study file"


def median(da, keep):
    """Median over every dimension but ``keep``, ignoring NaN (failed and missing runs)."""
    drop = [d for d in da.dims if d not in keep]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices stay NaN
        return da.median(dim=drop, skipna=True) if drop else da


class Numbers(ticker.Formatter):
    """Tick labels of a log axis at 1, 2 and 5 times the powers of ten: plain numbers when every tick is
    between 1e-3 and 1e4, else all as a x 10^n (one notation per axis)."""

    def __init__(self):
        self.ticks = []

    def set_locs(self, locs):
        self.ticks = list(locs)

    def __call__(self, v, pos=None):
        if all(1e-3 <= abs(t) < 1e4 for t in self.ticks if t):
            return f"{v:.4g}"
        exp = math.floor(math.log10(abs(v)))
        mant = round(v / 10.0 ** exp, 3)
        return rf"$10^{{{exp}}}$" if mant == 1 else rf"${mant:g}\times10^{{{exp}}}$"


def _log_ticks(axis, lim):
    """Labelled ticks on a log ``axis`` whose view is ``lim``: the powers of ten when at least two are in
    view (matplotlib's default), else 1, 2 and 5 times them when that gives two or more, else evenly
    spaced round numbers (a span under half a decade), as many digits as tell them apart."""
    lo, hi = sorted(lim)
    if not (lo > 0 and np.isfinite(hi)):
        return
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if last - first - 1 + (10.0 ** first >= lo) + (10.0 ** last <= hi) >= 2:  # powers of ten in view
        axis.set_minor_formatter(ticker.NullFormatter())  # the powers alone: minor labels crowd them
        return
    candidates = [m * 10.0 ** k for k in range(first, last + 1) for m in (1, 2, 5)]
    if sum(lo <= t <= hi for t in candidates) >= 2:
        axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(Numbers())
    else:
        axis.set_major_locator(ticker.MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]))
        axis.set_major_formatter(ticker.ScalarFormatter(useOffset=False))
    axis.set_minor_formatter(ticker.NullFormatter())


def readable_ticks(fig):
    """Every log axis of ``fig`` given at least two labelled ticks in its view, whatever its span (by
    default a log axis labels only the powers of ten, and one spanning less than two decades may show
    one label or none). Call it once the data are drawn and the limits set: it reads the view."""
    for ax in fig.axes:
        for axis, scale, lim in ((ax.xaxis, ax.get_xscale(), ax.get_xlim()),
                                 (ax.yaxis, ax.get_yscale(), ax.get_ylim())):
            if scale == "log" and axis.get_transform().base == 10:  # another base: its powers are dense
                _log_ticks(axis, lim)
    return fig


def integer_ticks(*axes):
    """Integer ticks only (epochs, steps) on each ``matplotlib.axis.Axis`` given."""
    for axis in axes:
        axis.set_major_locator(ticker.MaxNLocator(integer=True))


def figure_legend(fig, axes=None, columns=4):
    """One legend for the whole figure, below the panels (clear of the titles and the data), in up to
    ``columns`` columns: every labelled line or patch of ``axes`` (default: all of the figure's), the
    first of each label; nothing when there is nothing to explain."""
    handles = {}
    for ax in fig.axes if axes is None else axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), fontsize=8, loc="outside lower center",
                   ncols=min(columns, len(handles)))


def draw_overlay(paths: list[str], tasks: dict):
    """The figure comparing sweep archives of one study made under different settings (profiles,
    ``--set`` overrides), drawn by the task's ``overlay``, and the name to save it under
    (``<study_name>-overlay``). Raises :class:`~substrate.errors.ArchiveError` naming the file that
    cannot be read, has no finished run, or belongs to another study than the first."""
    heads = []
    for path in paths:
        with archive.open_file(path) as f:
            heads.append(read_header(f, path))
        if not heads[-1]["n_done"]:
            raise ArchiveError(path, "has no finished run to draw")
        if heads[-1]["study_name"] != heads[0]["study_name"]:
            raise ArchiveError(path, f"is a sweep of study {heads[-1]['study_name']!r}, the first archive one of "
                                     f"{heads[0]['study_name']!r}: an overlay compares sweeps of one study")
    task = heads[0]["task"]
    overlays = {name: t.overlay for name, t in tasks.items() if t.overlay is not None}
    if task not in overlays:
        raise ArchiveError(paths[0], f"has no overlay figure for task {task!r} (one archive at a time: "
                                     f"`substrate plot ARCHIVE`); overlays exist for {', '.join(overlays)}")
    try:
        return readable_ticks(overlays[task](list(paths))), f"{heads[0]['study_name']}-overlay"
    except (KeyError, IndexError, ValueError, TypeError) as e:
        plt.close("all")
        raise ArchiveError(paths[0], f"and the others lack what the overlay for task {task!r} needs "
                                     f"({type(e).__name__}: {e})") from None


def draw(path: str, tasks: dict):
    """The figure of a sweep archive, chosen by its task in ``tasks`` (name -> :class:`~studies.runs.Task`,
    e.g. ``studies.catalogue.TASKS``), and the name to save it under (the checked ``study_name``: a
    plain file name). Every log axis gets labelled ticks (:func:`readable_ticks`: the study figures
    call it themselves, for the notebooks that call them; here, for a figure that does not). Raises
    :class:`~substrate.errors.ArchiveError` naming the file when the archive cannot be read or lacks
    what the figure needs."""
    with archive.open_file(path) as f:
        head = read_header(f, path)
    if not head["n_done"]:
        raise ArchiveError(path, "has no finished run to draw")
    task = head["task"]
    plots = {name: t.plot for name, t in tasks.items() if t.plot is not None}
    if task not in plots:
        raise ArchiveError(path, f"has no figure for task {task!r}; figures exist for {', '.join(plots)}")
    try:
        return readable_ticks(plots[task](path)), head["study_name"]
    except ArchiveError:
        raise
    except (KeyError, IndexError, ValueError, TypeError) as e:
        # open_dataset checked the layout; what remains is a result or coordinate the figure needs that
        # the archive does not hold (or holds with another shape or type)
        plt.close("all")
        raise ArchiveError(path, f"lacks what the figure for task {task!r} needs ({type(e).__name__}: {e})") \
            from None
