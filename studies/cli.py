"""The ``substrate`` command."""

from __future__ import annotations

import os
import sys
import time

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """substrate: simulate analog networks that relax to equilibrium, and learn on them."""


@main.command()
@click.option("--out", default="quickstart-output", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the HDF5 archive and the figure.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the run.")
@click.option("--batch", default=256, show_default=True, type=click.IntRange(1, 1797),
              help="Number of digits relaxed at once.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def quickstart(out, seed, batch, quiet):
    """Relax a 64-32-10 network on scikit-learn's digits with every integrator; write an archive and a figure."""
    from studies import quickstart as qs

    start = time.perf_counter()
    paths = qs.run(out, seed=seed, config={"batch": batch}, progress=not quiet)
    import substrate as S
    from substrate import archive

    a = archive.read(paths["archive"])
    click.echo(f"{'integrator':<10} {'status':<14} {'steps':>7} {'evals':>7} {'t*':>8} {'residual':>10} {'ms':>8}")
    for method in S.METHODS:
        r = a["relax"][method]
        click.echo(f"{method:<10} {r['attrs']['status']:<14} {int(r['steps']):>7} {int(r['nfev']):>7} "
                   f"{float(r['t_final']):>8.2f} {float(r['residual'].max()):>10.2e} {float(r['seconds']) * 1e3:>8.1f}")
    click.echo(f"archive: {os.path.abspath(paths['archive'])}")
    click.echo(f"figure:  {os.path.abspath(paths['figure'])}")
    click.echo(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
