"""The ``substrate`` command."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import click
import numpy as np
from numba.core import config as numba_config
from tqdm import tqdm

from models.train import live_progress
from studies import archives, figures
from studies import quickstart as qs
from studies import sweep as sw
from studies import warmup as wu
from studies.catalogue import TASKS, drift
from studies.config import (
    StudyConfigError,
    load_study,
    package_folder,
    packaged_studies,
    study_path,
)
from studies.dask_executor import DaskSweepError, make_executor
from studies.runs import RESERVED
from substrate import SubstrateValueError, load
from substrate import archive as substrate_archive
from substrate.archive import TEMP_PREFIX
from substrate.devices import PRESETS
from substrate.devices.presets import alias_of
from substrate.errors import ArchiveError


class CLIError(click.ClickException):
    """Bad input or a failure the user can act on: printed as one line ``substrate: error: ...``
    (exit code 1), never a traceback."""

    def show(self, file=None):
        """Print the error as one line on stderr."""
        click.echo(f"substrate: error: {' '.join(self.format_message().split())}", err=True)


def _output_folder(out: str, option: str = "--out") -> str:
    """``out`` made if need be and checked writable by writing a file there, or a :class:`CLIError`
    naming it; the probe finds what ``os.access`` misses (a read-only file system mounted under a
    writable folder, a network file system's own rules)."""
    out = os.path.abspath(out)
    existing = out
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CLIError(f"{option} {out}: {existing} is a file, not a folder; allowed: a folder, or a path "
                       "where one can be made")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise CLIError(f"{option} {out}: cannot make the folder {e.filename or out} ({e.strerror or e}); "
                       "allowed: a folder this user can write in") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".h5", dir=out)  # removed if left behind
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CLIError(f"{option} {out}: cannot write in this folder ({e.strerror or e}); allowed: a folder "
                       "this user can write in") from None
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="substrate", message="substrate %(version)s")
def main():
    """substrate: simulate analog networks that relax to equilibrium, and learn on them."""


@main.command()
@click.option("--out", default="quickstart-output", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the HDF5 archive and the figure.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the run.")
@click.option("--epochs", default=15, show_default=True, type=click.IntRange(0, 1000), help="Training epochs.")
@click.option("--n-train", default=0, show_default=True, type=click.IntRange(0, 1438),
              help="Training digits used (0: all 1438; the test set is then a quarter as many).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def quickstart(out, seed, epochs, n_train, quiet):
    """Train a 64-128-10 network on scikit-learn's digits with centred EP, holomorphic EP and the exact
    gradient; write an archive and a figure of the learning curves and gradient alignment."""
    out = _output_folder(out)
    start = time.perf_counter()
    paths = qs.run(out, seed=seed, config={"epochs": epochs, "n_train": n_train}, progress=not quiet)
    a = substrate_archive.read(paths["archive"])
    click.echo(f"{'rule':<44} {'test acc':>9} {'cos(g, exact)':>14} {'s/epoch':>8}")
    for name, r in substrate_archive.members(a["rules"]).items():
        secs = r["seconds"][1:].mean() if len(r["seconds"]) > 1 else float("nan")
        click.echo(f"{r['attrs']['rule']:<44} {100 * r['test_accuracy'][-1]:>8.1f}% "
                   f"{r['grad_cosine'][-1]:>14.6f} {secs:>8.2f}")
    click.echo(f"archive: {os.path.abspath(paths['archive'])}")
    click.echo(f"figure:  {os.path.abspath(paths['figure'])}")
    click.echo(f"done in {time.perf_counter() - start:.1f} s")


def _load(study, profile, overrides=()):
    try:
        return load_study(study_path(study), profile, tasks=TASKS, overrides=overrides)
    except StudyConfigError as e:
        raise CLIError(str(e)) from None


STUDY_HELP = "STUDY: a study file, or the name of a packaged study (substrate studies lists them)."


@main.command(epilog=STUDY_HELP)
@click.argument("study")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Folder for the run files and the archive [default: sweep-output/<study name>, "
                   "with -<profile> appended when a profile is used].")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1), help="Worker processes.")
@click.option("--profile", default=None, help="A [profiles.<name>] of the study file, e.g. debug.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Change the study file: a TOML assignment applied before the file is checked, over the "
                   "profile (repeatable): --set base.epochs=1 --set sweep.seeds=[0] --set base.data=digits.")
@click.option("--dry-run", is_flag=True, help="Print the grid and the number of runs (and of those already "
                                              "finished in --out); run nothing, write nothing.")
@click.option("--retry-failed", is_flag=True, help="Run again the runs that failed (finished runs are always skipped).")
@click.option("--consolidate-every", default=600.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds between rewrites of the archive while the sweep runs.")
@click.option("--quiet", is_flag=True, help="No progress (on a terminal a bar, else a line every few seconds).")
@click.option("--max-runs", default=100_000, show_default=True, type=click.IntRange(min=1),
              help="Refuse a study of more runs than this (counted from its axes before anything is expanded).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Run on a Dask cluster: its scheduler's address (tcp://host:8786, tls://host:8786) or "
                   "scheduler file; the workers must share the output folder's file system (--workers is "
                   "then unused).")
@click.option("--tls-ca-file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="TLS to a tls:// scheduler: the CA certificate (PEM) that signed the cluster's certificates.")
@click.option("--tls-cert", default=None, type=click.Path(exists=True, dir_okay=False),
              help="TLS: this client's certificate (PEM; it may hold the key too).")
@click.option("--tls-key", default=None, type=click.Path(exists=True, dir_okay=False),
              help="TLS: this client's private key (PEM), when not in --tls-cert.")
@click.option("--security-config", default=None, type=click.Path(exists=True, dir_okay=False),
              help="TLS: a Dask config file (YAML) with distributed.comm.tls.* (ca-file, client.cert, "
                   "client.key), instead of the --tls-* options.")
def sweep(study, out, workers, profile, overrides, dry_run, retry_failed, consolidate_every, quiet, max_runs,
          scheduler, tls_ca_file, tls_cert, tls_key, security_config):
    """Run every run of a study (skipping finished ones) and consolidate them into one archive."""
    study = _load(study, profile, overrides)
    click.echo(study.summary())
    out = out or os.path.join("sweep-output", study.name + (f"-{profile}" if profile else ""))
    if dry_run:
        click.echo("\n".join(_grid_lines(study, out, max_runs)))
        return
    try:
        sw.check_run_count(study, max_runs, "--max-runs")
        executor = make_executor(scheduler, workers, tls_ca_file=tls_ca_file, tls_cert=tls_cert,
                                 tls_key=tls_key, security_config=security_config)
    except (ImportError, ValueError) as e:
        raise CLIError(str(e)) from None
    out = _output_folder(out)
    start = time.perf_counter()
    stats = {}
    try:
        path = sw.run_sweep(study, out, workers=workers, retry_failed=retry_failed, progress=not quiet,
                            executor=executor, consolidate_every=consolidate_every, stats=stats,
                            max_runs=max_runs)
    except (sw.SweepLockedError, DaskSweepError, substrate_archive.WriteError, SubstrateValueError) as e:
        raise CLIError(str(e)) from None
    click.echo(f"ran {stats['ran']} runs ({stats['done']} done, {stats['failed']} failed); skipped "
               f"{stats['skipped']} finished before; {time.perf_counter() - start:.1f} s")
    _summary(path)


def _grid_lines(study, out, max_runs) -> list:
    """The axes (values and the keys they set), the number of runs and how many have a run file in ``out``."""
    lines = ["axes:"]
    axes = [(a.name, f" <- {', '.join(a.keys)}" if list(a.keys) != [a.name] else "", [_shown(p) for p in a.points])
            for a in study.axis_list] + [("seed", "", [str(s) for s in study.seeds])]
    for name, via, values in axes:
        lines.append(f"  {name} ({len(values)}){via}: {', '.join(values[:12])}{', ...' if len(values) > 12 else ''}")
    lines.append(f"runs: {study.n_runs:,}")
    if study.n_runs > max_runs:
        lines.append(f"more than --max-runs={max_runs:,}: a sweep would refuse it")
    elif os.path.isdir(sw.runs_folder(out)):
        state = sw.statuses(study, out)
        done = sum(s == "done" for s in state.values())
        failed = sum(s == "failed" for s in state.values())
        lines.append(f"in {os.path.abspath(out)}: {done} done, {failed} failed, {len(state) - done - failed} to run "
                     f"({len(state) - done} with --retry-failed)")
    else:
        lines.append(f"in {os.path.abspath(out)}: none run yet")
    return lines


def _shown(point: tuple) -> str:
    return str(point[0]) if len(point) == 1 else "(" + ", ".join(str(v) for v in point) + ")"


@main.command()
def studies():
    """List the studies shipped with the package: name, task, runs (and with --profile debug), description.
    Run one with `substrate sweep NAME`."""
    rows = []
    for name, path in packaged_studies().items():
        try:
            full = load_study(path, tasks=TASKS)
        except StudyConfigError as e:
            rows.append((name, "?", "?", f"invalid: {e}"))
            continue
        try:
            debug = f" ({load_study(path, 'debug', tasks=TASKS).n_runs:,} debug)"
        except StudyConfigError:
            debug = ""
        rows.append((name, full.task, f"{full.n_runs:,}{debug}", full.description))
    widths = [max(len(r[i]) for r in rows + [("name", "task", "runs", "")]) for i in range(3)]
    for row in [("name", "task", "runs", "description")] + rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
    click.echo(f"study files: {package_folder('configs')}")
    click.echo(f"notebooks:   {package_folder('notebooks')} (<name>.ipynb draws the archive of `substrate sweep "
               "<name>`, where there is one)")


def _summary(path, errors=5):
    try:
        with substrate_archive.open_file(path) as f:
            lines = _summary_lines(archives.read_header(f, path), f, path, errors)
    except ArchiveError as e:
        raise CLIError(str(e)) from None
    click.echo("\n".join(lines))


def _summary_lines(a, f, path, errors):
    """The counts of runs and the first ``errors`` failed runs of an open archive (checked header ``a``)."""
    lines = [f"archive: {os.path.abspath(path)}",
             f"runs: {a['n_runs']} total, {a['n_done']} done, {a['n_failed']} failed, {a['n_missing']} missing"]
    if a["n_failed"] and errors:
        lines.append("failed runs:")
        for rid, status, coords, error in archives.read_runs(f, path):
            if status == "failed" and len(lines) < 3 + errors:
                lines.append(f"  {rid} [{', '.join(f'{k}={v}' for k, v in coords.items())}]: {error}")
        if a["n_failed"] > len(lines) - 3:
            lines.append(f"  ... and {a['n_failed'] - (len(lines) - 3)} more")
    return lines


@main.command()
@click.argument("archive", type=click.Path(exists=True, dir_okay=False))
@click.option("--errors", default=5, show_default=True, type=click.IntRange(min=0), help="Failed runs to list.")
def info(archive, errors):
    """Summarise a sweep archive: study, axes, runs done and failed, first errors."""
    try:
        with substrate_archive.open_file(archive) as f:
            layout = archives.read_layout(f, archive)
            summary = _summary_lines(layout["attrs"], f, archive, errors)
    except ArchiveError as e:
        raise CLIError(str(e)) from None
    a, axes = layout["attrs"], layout["attrs"]["axes"]
    profile = f", profile {a['profile']}" if a["profile"] else ""
    description = f" - {a['description']}" if a["description"] else ""
    click.echo(f"study: {a['study_name']} (task {a['task']}{profile}){description}")
    click.echo(f"created {a['created']} on {a['host']}, git {a['git_commit']}")
    if a.get("overrides", "[]") != "[]":
        click.echo(f"set: {a['overrides']}")
    click.echo("axes:")
    for name, values in axes.items():
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
        keys = a["axis_keys"].get(name, [name])
        via = f" <- {', '.join(keys)}" if keys != [name] else ""
        click.echo(f"  {name} ({len(values)}){via}: {shown}")
    dims = layout["dims"]
    results = sorted(k for k in dims if k not in layout["coords"] and k not in RESERVED)
    own = {k: dims[k][len(axes):] for k in results}
    click.echo("results per run: " + (", ".join(f"{k}({', '.join(own[k])})" if own[k] else k for k in results)
                                      or "none yet"))
    click.echo("\n".join(summary))


@main.command()
@click.argument("archives", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Folder for the figures [default: the (first) archive's folder].")
def plot(archives, out):
    """Draw a sweep archive's figures (PNG and PDF), chosen by its task; given several archives of one
    study (made under different profiles or --set overrides), the figure that overlays them
    (<study>-overlay.png), for the studies that have one."""
    try:
        fig, name = figures.draw(archives[0], TASKS) if len(archives) == 1 else \
            figures.draw_overlay(list(archives), TASKS)
    except ArchiveError as e:
        raise CLIError(str(e)) from None
    out = out or os.path.dirname(os.path.abspath(archives[0]))
    os.makedirs(out, exist_ok=True)
    for ext in ("png", "pdf"):
        path = os.path.join(out, f"{name}.{ext}")  # name: checked by read_header, a plain file name
        fig.savefig(path, dpi=120)
        click.echo(f"figure: {os.path.abspath(path)}")


@main.command()
@click.argument("archive", type=click.Path(exists=True, dir_okay=False))
def table(archive):
    """Print a sweep archive's tables as markdown, chosen by its task (compare: the winners per device,
    then every rule and device)."""
    tables = {name: t.table for name, t in TASKS.items() if t.table is not None}
    try:
        with substrate_archive.open_file(archive) as f:
            head = archives.read_header(f, archive)
        if head["task"] not in tables:
            raise ArchiveError(archive, f"has no table for task {head['task']!r}; tables exist for "
                                        f"{', '.join(tables)}")
        if not head["n_done"]:
            raise ArchiveError(archive, "has no finished run to tabulate")
        text = tables[head["task"]](archive)
    except ArchiveError as e:
        raise CLIError(str(e)) from None
    click.echo(text)


EVALUATED = ("ep_train", "drift")  # the tasks whose saved model is a classifier of their config's data


def _drift_times(text: str) -> list:
    """The seconds of ``--times`` (comma-separated, ascending), or a :class:`CLIError` naming the bad one."""
    try:
        times = [drift.seconds(t) for t in text.split(",")]
    except SubstrateValueError as e:
        raise CLIError(f"--times {text}: {e}") from None
    if any(b <= a for a, b in zip(times, times[1:])):
        raise CLIError(f"--times {text}: the times must be ascending and different (one chip drifts on)")
    return times


@main.command()
@click.argument("run_file", metavar="RUN.h5", type=click.Path(exists=True, dir_okay=False))
@click.option("--device", default="pcm_inference", show_default=True,
              help="Device preset to program the networks on (a preset with drift).")
@click.option("--times", default="1s,1h,1d,1mo,1y", show_default=True,
              help="Drift times after programming, ascending: a number and s, min, h, d, w, mo (30 d) or y (365 d).")
@click.option("--compensation", type=click.Choice(["on", "off", "both"]), default="both", show_default=True,
              help="Global drift compensation.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the chip's draws (with each run's own seed; the drift study's runs used 0).")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Also write the accuracies to this HDF5 file.")
def evaluate(run_file, device, times, compensation, seed, out):
    """Program the networks a run file or a sweep archive saved onto a device, let them drift, and print
    the test accuracy (on each run's test set) after each time."""
    if device not in drift.drift_presets():
        raise CLIError(f"--device {device}: " + ("a preset without drift" if device in PRESETS else "unknown preset")
                       + f"; allowed: {', '.join(drift.drift_presets())} (the presets with drift)")
    seconds = _drift_times(times)
    settings = drift.COMPENSATION if compensation == "both" else (compensation,)
    try:
        saved = archives.saved_objects(run_file)
    except ArchiveError as e:
        raise CLIError(str(e)) from None
    if not saved:
        raise CLIError(f"{run_file} holds no saved weights: sweep a training study with save_weights = true in "
                       "its [study] table (the default), e.g. `substrate sweep drift --profile debug`")
    unknown = sorted({s["task"] for s in saved} - set(EVALUATED))
    if unknown:
        raise CLIError(f"{run_file}: evaluate takes the networks of the tasks {', '.join(EVALUATED)}; its runs are "
                       f"of {', '.join(unknown)}")
    labels = [drift.time_label(t) for t in seconds]
    width = max(10, *(len(x) + 2 for x in labels))
    click.echo(f"test accuracy (%) on {device} after drift; {len(saved)} saved network(s) in {run_file}")
    names = [f"{item['run_id']}/{item['name']}" for item in saved]
    first = max(len(x) for x in names) + 2
    click.echo(f"{'network':<{first}}{'compensation':<14}" + "".join(f"{x:>{width}}" for x in labels) + "  point")
    table = []
    for item, name in zip(saved, names):
        try:
            model = load(run_file, group=item["group"])
        except ArchiveError as e:
            raise CLIError(str(e)) from None
        try:
            acc = drift.evaluate_saved(model, item["config"], item["seed"], device, seconds, settings, seed)
        except (SubstrateValueError, OSError) as e:  # e.g. the run's data set is not installed here
            raise CLIError(f"{run_file}, run {item['run_id']}: {e}") from None
        table.append(acc)
        point = ", ".join(f"{k}={v}" for k, v in item["coords"].items())
        for c, row in zip(settings, acc):
            click.echo(f"{name:<{first}}{c:<14}"
                       + "".join(f"{100 * a:>{width}.2f}" for a in row) + f"  {point}")
    if out is not None:
        path = os.path.abspath(out)
        try:
            with substrate_archive.create_h5(path, "the evaluation", "free some space and try again") as (f, _):
                f.attrs.update({"format": "substrate-evaluation/1", "source": os.path.abspath(run_file),
                                "device": device, "seed": seed, "dims": '["network", "compensation", "time"]'})
                substrate_archive.create_dataset(f, "accuracy", np.asarray(table))
                substrate_archive.create_dataset(f, "time_seconds", np.asarray(seconds))
                substrate_archive.create_dataset(f, "time", np.asarray(labels, dtype="S"))
                substrate_archive.create_dataset(f, "compensation", np.asarray(settings, dtype="S"))
                substrate_archive.create_dataset(f, "run_id", np.asarray([s["run_id"] for s in saved], dtype="S"))
                substrate_archive.create_dataset(f, "network", np.asarray([s["group"] for s in saved], dtype="S"))
                substrate_archive.seal(f)
        except OSError as e:
            raise CLIError(f"--out {out}: cannot write it ({e})") from None
        click.echo(f"accuracies: {path}")


@main.command()
@click.argument("name", required=False)
def devices(name):
    """List the device presets (or one preset, NAME): each with its whole source, its effects and their
    parameters (rounded, with units), and the preset it repeats if it is an alias."""
    if name is not None and name not in PRESETS:
        raise click.ClickException(f"no device preset {name!r}; presets: {', '.join(PRESETS)}")
    width = max(80, min(120, shutil.get_terminal_size().columns))
    for key, dev in PRESETS.items():
        if name is None or key == name:
            head, _, rest = dev.describe(width).partition("\n")
            alias = alias_of(key)
            click.echo(head + (f"  (alias of {alias}: the same device)" if alias else "") + "\n" + rest + "\n")


@main.command()
@click.argument("paths", nargs=-1)
@click.option("--list", "list_paths", is_flag=True, help="List the paths and what each compiles, then exit.")
@click.option("--jobs", default=min(2, os.cpu_count() or 1), show_default=True, type=click.IntRange(min=1),
              help="Paths compiled at once, each in its own process.")
def warmup(paths, list_paths, jobs):
    """Compile the kernels of the common paths ahead (PATHS: names from --list; default: all), so that
    the first run loads them from Numba's cache instead of compiling them. Paths share kernels; the
    seconds of each are those left after the paths before it."""
    if list_paths:
        for name, (what, _) in wu.PATHS.items():
            click.echo(f"{name:<18} {what}")
        return
    unknown = [p for p in paths if p not in wu.PATHS]
    if unknown:
        raise CLIError(f"no warm-up path {', '.join(map(repr, unknown))}; paths: {', '.join(wu.PATHS)}")
    names = list(dict.fromkeys(paths)) or list(wu.PATHS)
    live = live_progress()
    start = time.perf_counter()
    with tqdm(total=len(names), desc="warmup", unit="path", disable=not live, dynamic_ncols=True) as bar:
        for name, seconds in wu.run_all(names, jobs):
            bar.set_postfix_str(name)
            bar.update()
            if not live:
                click.echo(f"{name:<18} {seconds:7.1f} s", err=True)
    click.echo(f"compiled {len(names)} paths in {time.perf_counter() - start:.1f} s; cache: {_numba_cache()}")


def _numba_cache() -> str:
    """Where Numba keeps the compiled kernels."""
    return numba_config.CACHE_DIR or "next to the sources (__pycache__)"


if __name__ == "__main__":
    sys.exit(main())
