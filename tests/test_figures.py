"""Study figures a paper's reader can use: every study's figure, drawn from its debug archive (the
``config_archives`` fixture of conftest.py, shared with test_studies.py), has on every axis that
shows data at least two labelled ticks in view and a label, and no legend over a title; and the tick
helpers of studies.figures label log axes of any span."""

import os

import matplotlib.pyplot as plt
import pytest
from test_studies import CONFIGS

from studies import figures as F
from studies import quickstart
from studies.catalogue import TASKS


def _labelled_ticks(axis, lim):
    """The non-empty tick labels of ``axis`` whose ticks lie inside the view ``lim``."""
    lo, hi = sorted(lim)
    slack = (hi - lo) * 1e-9  # a tick at the limit, up to rounding
    along = 0 if axis.axis_name == "x" else 1
    return [t.get_text() for t in axis.get_ticklabels()
            if t.get_visible() and t.get_text().strip() and lo - slack <= t.get_position()[along] <= hi + slack]


def _has_data(ax):
    return bool(ax.lines or ax.collections or ax.patches or ax.images)


def problems(fig):
    """What a reader would object to in ``fig``: an axis with data but fewer than two labelled ticks in
    view, a tick label twice or no axis label; a legend over the suptitle or an Axes title, the
    suptitle over an Axes title. An image panel (a montage of samples,
    a table of values) needs no axis label (its ticks name its rows and columns) and no ticks on an
    axis it leaves without (the pixels are the data); a colorbar's long axis is checked, its short one
    is not."""
    fig.canvas.draw()  # ticks, layout and text positions as saved
    renderer = fig.canvas.get_renderer()
    found = []
    for k, ax in enumerate(fig.axes):
        if not ax.get_visible() or not _has_data(ax):
            continue
        name = f"axes {k} ({ax.get_title() or ax.get_ylabel()!r})"
        colorbar = getattr(ax, "_colorbar", None)
        for axis, lim, label in ((ax.xaxis, ax.get_xlim(), ax.get_xlabel()), (ax.yaxis, ax.get_ylim(),
                                                                               ax.get_ylabel())):
            if colorbar is not None and axis is not colorbar.long_axis:
                continue
            if ax.images and not axis.get_ticklocs().size:
                continue
            ticks = _labelled_ticks(axis, lim)
            if len(ticks) < 2:
                found.append(f"{name}: {axis.axis_name} axis has {len(ticks)} labelled ticks in view {ticks}")
            if len(set(ticks)) < len(ticks):
                found.append(f"{name}: {axis.axis_name} axis repeats a tick label {ticks}")
            if not label.strip() and not ax.images:  # an image's rows and columns are named by its ticks
                found.append(f"{name}: {axis.axis_name} axis has no label")
    suptitle = fig._suptitle if fig._suptitle is not None and fig._suptitle.get_text() else None
    axes_titles = [ax.title for ax in fig.axes if ax.title.get_text()]
    titles = [suptitle] * (suptitle is not None) + axes_titles
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for title in titles:
            if box.overlaps(title.get_window_extent(renderer)):
                found.append(f"a legend overlaps the title {title.get_text()!r}")
    if suptitle is not None:
        box = suptitle.get_window_extent(renderer)
        found += [f"the suptitle overlaps the title {t.get_text()!r}" for t in axes_titles
                  if box.overlaps(t.get_window_extent(renderer))]
    return found


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_study_figure_is_readable(config_archives, path):
    """The figure `substrate plot` draws of every study's debug archive: titled, every axis labelled
    with two or more distinct tick labels in view, no legend over a title."""
    fig, name = F.draw(config_archives[path][1], TASKS)
    try:
        assert name == config_archives[path][0].name and fig._suptitle.get_text()
        assert problems(fig) == []
    finally:
        plt.close(fig)


def test_the_overlay_of_sweeps_under_other_settings_is_readable_and_names_each_setting(config_archives, tmp_path):
    """`substrate plot A.h5 B.h5` of two meta_prior sweeps, the second with an override: one colour per
    archive, labelled by what it was made under; archives of another study, or of a study without an
    overlay, are refused with a message."""
    from click.testing import CliRunner

    from studies.cli import main

    meta = next(p for p in CONFIGS if os.path.basename(str(p)).startswith("meta_prior"))
    first = config_archives[meta][1]
    result = CliRunner().invoke(main, ["sweep", str(meta), "--profile", "debug", "--set", "base.training.epochs=3",
                                       "--workers", "1", "--out", str(tmp_path / "short")])
    assert result.exit_code == 0, result.output
    second = str(tmp_path / "short" / "meta_prior.h5")
    fig, name = F.draw_overlay([first, second], TASKS)
    try:
        assert name == "meta_prior-overlay" and problems(fig) == []
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert labels == ["meta_prior: profile debug", "meta_prior: profile debug, training.epochs=3"]
    finally:
        plt.close(fig)
    result = CliRunner().invoke(main, ["plot", first, second, "--out", str(tmp_path)])
    assert result.exit_code == 0 and (tmp_path / "meta_prior-overlay.png").stat().st_size > 20_000, result.output
    relax = next(p for p in CONFIGS if os.path.basename(str(p)).startswith("relaxation"))
    result = CliRunner().invoke(main, ["plot", first, config_archives[relax][1]])
    assert result.exit_code != 0 and "an overlay compares sweeps of one study" in result.output
    result = CliRunner().invoke(main, ["plot", config_archives[relax][1], config_archives[relax][1]])
    assert result.exit_code != 0 and "has no overlay figure for task 'relaxation'" in result.output

def test_the_quickstart_figure_is_readable(tmp_path):
    paths = quickstart.run(str(tmp_path), config={"epochs": 1, "n_train": 100}, progress=False)
    fig = quickstart.ep_training(paths["archive"])
    try:
        assert problems(fig) == []
    finally:
        plt.close("all")


SPANS = [(0.05, 0.1), (0.15, 3.0), (0.6136, 0.6139), (2e-4, 7e-3), (1e-3, 1e2), (3.0, 4.0), (40.0, 90.0)]


@pytest.mark.parametrize("span", SPANS, ids=str)
def test_log_axes_of_any_span_get_two_distinct_labelled_ticks(span):
    """matplotlib's default labels only the powers of ten on a log axis spanning more than a decade
    (one label, or none, on (0.05, 0.1) and (0.15, 3)); readable_ticks labels every span."""
    fig, ax = plt.subplots(layout="constrained")
    ax.loglog(span, span[::-1], label="a line")
    ax.set_xlim(*span)
    ax.set_ylim(*span)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    try:
        assert problems(F.readable_ticks(fig)) == []
        ticks = _labelled_ticks(ax.yaxis, span)
        values = [float(t) for t in ticks if "$" not in t]
        assert all(span[0] <= v <= span[1] for v in values)  # the labels say where the ticks are
    finally:
        plt.close(fig)


def test_the_checks_find_what_a_reader_would_object_to():
    fig, (a, b) = plt.subplots(1, 2, layout="constrained")
    a.loglog([0.05, 0.1], [0.15, 3.0], label="a line")  # matplotlib's default ticks: one label per axis
    a.set_xlabel("x")
    b.plot([0, 1], [0, 1])  # no labels
    b.set_title("a title")
    b.legend(["over the title"], loc="lower left", bbox_to_anchor=(0.0, 0.98))
    fig.suptitle("the figure")
    try:
        found = problems(fig)
        for axis in "xy":
            assert any(f.startswith(f"axes 0 (''): {axis} axis has 1 labelled ticks") for f in found), found
        assert "axes 0 (''): y axis has no label" in found and "axes 1 ('a title'): x axis has no label" in found
        assert "a legend overlaps the title 'a title'" in found
        F.readable_ticks(fig)
        assert not [f for f in problems(fig) if "ticks" in f]
    finally:
        plt.close(fig)
