"""Helpers of the study figures (each study module draws its own, :mod:`studies.catalogue`), and
:func:`draw`, the figure of an archive chosen by its task. Figures read an archive and return a
matplotlib Figure; they compute nothing."""

from __future__ import annotations

import json
import warnings

import matplotlib

matplotlib.use("Agg")  # figures are written to files; no display is needed  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

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
    """A legend label for one point of ``dim``, with the coordinates that vary along it."""
    point = ds.sel({dim: value}) if dim in ds.indexes else ds.isel({dim: value})
    extra = [f"{c}={fmt(point[c].item())}" for c in ds.coords
             if c != dim and ds[c].dims == (dim,) and c != "method"]
    name = str(value)
    return f"{name} ({', '.join(extra)})" if extra else name


def fmt(v):
    """A coordinate value as text: floats by ``:g``."""
    return f"{v:g}" if isinstance(v, float) else str(v)


def median(da, keep):
    """Median over every dimension but ``keep``, ignoring NaN (failed and missing runs)."""
    drop = [d for d in da.dims if d not in keep]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices stay NaN
        return da.median(dim=drop, skipna=True) if drop else da


def draw(path: str, tasks: dict):
    """The figure of a sweep archive, chosen by its task in ``tasks`` (name -> :class:`~studies.runs.Task`,
    e.g. ``studies.catalogue.TASKS``), and the name to save it under (the checked ``study_name``: a
    plain file name). Raises :class:`~substrate.errors.ArchiveError` naming the file when the archive
    cannot be read or lacks what the figure needs."""
    with archive.open_file(path) as f:
        head = read_header(f, path)
    if not head["n_done"]:
        raise ArchiveError(path, "has no finished run to draw")
    task = head["task"]
    plots = {name: t.plot for name, t in tasks.items() if t.plot is not None}
    if task not in plots:
        raise ArchiveError(path, f"has no figure for task {task!r}; figures exist for {', '.join(plots)}")
    try:
        return plots[task](path), head["study_name"]
    except ArchiveError:
        raise
    except (KeyError, IndexError, ValueError, TypeError) as e:
        # open_dataset checked the layout; what remains is a result or coordinate the figure needs that
        # the archive does not hold (or holds with another shape or type)
        plt.close("all")
        raise ArchiveError(path, f"lacks what the figure for task {task!r} needs ({type(e).__name__}: {e})") \
            from None
