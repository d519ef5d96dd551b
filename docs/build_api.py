"""The API reference of substrate, models and studies, as HTML pages made by pdoc from the docstrings:
``make docs`` writes it to docs/api/ (``python docs/build_api.py [folder]`` elsewhere). The equations
the code implements, with their sources, are in docs/equations.md.

The build fails on any warning (:class:`BuildWarning`), and on a public function, class, method or
property without a docstring (:func:`undocumented`). Every public module gets its page: pdoc alone
would document only the submodules a package's ``__all__`` names (substrate's names none), so they are
listed here, walking the packages; modules whose name starts with an underscore (the compiled
kernels) stay internal.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import pkgutil
import sys
import warnings

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


class BuildWarning(RuntimeError):
    """The reference was built with warnings (an annotation pdoc cannot resolve, a module that cannot be
    imported...): the build fails, so that the pages say what the code says."""


def build(output) -> pathlib.Path:
    """Write the reference to the folder ``output`` (made if needed); returns it. Any warning during the
    build (pdoc's, or an import's) is a :class:`BuildWarning` listing them."""
    output = pathlib.Path(output)
    # pdoc blocks subprocesses while it imports the modules (and warns): platform.processor(), which a
    # dependency calls on import, runs `uname -p`; that is harmless
    os.environ.setdefault("PDOC_ALLOW_EXEC", "1")
    pdoc.render.configure(docformat="restructuredtext", footer_text="substrate")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # "!": pdoc's walk also adds private submodules (models._pvrnn_kernels); they stay out
        pdoc.pdoc(*specs(), r"!(.*\.)?_", output_directory=output)
    if caught:
        raise BuildWarning("the API reference was built with warnings:\n" + "\n".join(
            f"{w.category.__name__}: {w.message}" for w in caught))
    return output


def undocumented(modules=None) -> list[str]:
    """The public functions, classes, methods and properties of ``modules`` (default: every public
    module, :func:`public_modules`) that have no docstring
    (an override that has none inherits its base's, as ``inspect.getdoc`` does): names imported from
    elsewhere are checked where they are defined. Module constants and dataclass fields are described in
    their module's or class's docstring."""
    missing = []

    def walk(doc, module):
        for m in doc.own_members:
            if m.name.startswith("_") or m.taken_from[0] != module:
                continue
            prop = isinstance(m, pdoc.doc.Variable) and isinstance(doc, pdoc.doc.Class) and \
                isinstance(getattr(doc.obj, m.name, None), property)
            if (isinstance(m, (pdoc.doc.Function, pdoc.doc.Class)) or prop) and not m.docstring.strip():
                missing.append(m.fullname)
            if isinstance(m, pdoc.doc.Class):
                walk(m, module)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # build() reports the warnings
        for name in public_modules() if modules is None else modules:
            walk(pdoc.doc.Module(importlib.import_module(name)), name)
    return missing


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run from a checkout: the packages beside this folder
    print(build(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "api") / "index.html")
    missing = undocumented()
    if missing:
        sys.exit("public names without a docstring:\n  " + "\n  ".join(missing))
