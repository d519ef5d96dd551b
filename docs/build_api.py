"""The API reference of substrate, models and studies, as HTML pages made by pdoc from the docstrings:
``make docs`` writes it to docs/api/ (``python docs/build_api.py [folder]`` elsewhere). The equations
the code implements, with their sources, are in docs/equations.md.

Every public module gets its page: pdoc alone would document only the submodules a package's
``__all__`` names (substrate's names none), so they are listed here, walking the packages; modules
whose name starts with an underscore (the compiled kernels) stay internal.
"""

from __future__ import annotations

import importlib
import pathlib
import pkgutil
import sys

import pdoc
import pdoc.extract

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("substrate", "models", "studies")


def public_modules() -> list[str]:
    """The importable names of the packages and of their public modules, packages first."""
    names = []
    for package in PACKAGES:
        names.append(package)
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, f"{package}."):
            if not any(part.startswith("_") for part in info.name.split(".")):
                names.append(info.name)
    return names


def specs() -> list[str]:
    """What to hand pdoc: the packages, then each public module that pdoc's own walk of the specs so far
    does not reach (it adds every submodule of a package without ``__all__``; a repeated one warns)."""
    out, reached = list(PACKAGES), set(pdoc.extract.walk_specs(PACKAGES))
    for name in public_modules():
        if name not in reached:
            out.append(name)
            reached.update(pdoc.extract.walk_specs([name]))
    return out


def build(output) -> pathlib.Path:
    """Write the reference to the folder ``output`` (made if needed); returns it."""
    output = pathlib.Path(output)
    pdoc.render.configure(docformat="restructuredtext", footer_text="substrate")
    # "!": pdoc's walk also adds private submodules (models._pvrnn_kernels); they stay out
    pdoc.pdoc(*specs(), r"!(.*\.)?_", output_directory=output)
    return output


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run from a checkout: the packages beside this folder
    print(build(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "api") / "index.html")
