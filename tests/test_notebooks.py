"""Every notebook in studies/notebooks executes against a tiny archive (a debug sweep made here) and
draws at least one figure; notebooks read archives and compute nothing."""

import glob
import json
import os
import re
import sys

import pytest

import ipykernel  # noqa: F401,E402  (test dependencies)
import nbclient  # noqa: E402
import nbformat  # noqa: E402

from studies.catalogue import TASKS  # noqa: E402
from studies.config import load_study  # noqa: E402
from models.data import FASHION_MNIST_DIR  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "studies", "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
KERNEL = "substrate-test"
# what a notebook must not do: run or compute studies (it reads the archive and calls the study modules' figures)
FORBIDDEN = re.compile(r"\b(run_sweep|execute_run|consolidate|SerialExecutor|LocalExecutor|DaskExecutor|"
                       r"import substrate|from substrate|relax\(|gradient\()")


def test_there_are_notebooks():
    names = {os.path.basename(p) for p in NOTEBOOKS}
    assert {"relaxation.ipynb", "gradient_accuracy.ipynb", "ep_bias.ipynb", "ep_homeostasis.ipynb"} <= names


def study_of(nb, path) -> str:
    """The study config a notebook draws: its metadata ``substrate.study`` (a path from the repository
    root), else studies/configs/<notebook name>.toml."""
    rel = nb.metadata.get("substrate", {}).get("study") or \
        os.path.join("studies", "configs", os.path.basename(path)[:-len(".ipynb")] + ".toml")
    config = os.path.join(ROOT, rel)
    assert os.path.isfile(config), f"{path}: no study config {rel} (set metadata substrate.study)"
    return config


def parameter_cell(nb, path):
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code", f"{path}: one code cell tagged 'parameters'"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0] is tagged[0], f"{path}: the parameters cell must be the first code cell"
    assert re.search(r"^ARCHIVE = ", tagged[0].source, re.M), f"{path}: the parameters cell sets ARCHIVE"
    return tagged[0]


@pytest.fixture(scope="module")
def archives(config_archives):
    """{config path: archive}: the debug sweep of each study that a notebook draws, shared with
    test_studies.py and test_figures.py (conftest.py's ``config_archives``): a notebook only reads it."""
    return lambda config: config_archives[config][1]


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernel spec that runs this interpreter (the venv's), found through JUPYTER_PATH; Jupyter's and
    IPython's user folders in a temporary directory."""
    base = tmp_path_factory.mktemp("jupyter")
    spec = base / "data" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "substrate tests", "language": "python"}))
    env = {"JUPYTER_PATH": str(base / "data"), "JUPYTER_CONFIG_DIR": str(base / "config"),
           "JUPYTER_RUNTIME_DIR": str(base / "runtime"), "IPYTHONDIR": str(base / "ipython"),
           "JUPYTER_PLATFORM_DIRS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        assert KernelSpecManager().get_kernel_spec(KERNEL).argv[0] == sys.executable
        yield KERNEL
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: os.path.basename(p))
def test_notebook_is_well_formed_and_computes_nothing(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    cell = parameter_cell(nb, path)
    config = study_of(nb, path)
    # by default the notebook looks for its study's archive (studies.archives.find_archive)
    name = load_study(config, tasks=TASKS).name
    assert re.search(r"^ARCHIVE = None$", cell.source, re.M), cell.source
    assert any(re.search(rf"^ARCHIVE = find_archive\({name!r}, ARCHIVE\)$", c.source, re.M) for c in nb.cells
               if c.cell_type == "code"), f"{path}: no ARCHIVE = find_archive({name!r}, ARCHIVE)"
    for c in nb.cells:
        if c.cell_type == "code":
            assert not FORBIDDEN.search(c.source), f"{path}: a notebook computes nothing:\n{c.source}"
            assert not c.get("outputs") and c.get("execution_count") is None, f"{path}: stored without outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: os.path.basename(p))
def test_notebook_executes_against_a_tiny_archive(path, archives, kernel_env, tmp_path):
    nb = nbformat.read(path, as_version=4)
    config = study_of(nb, path)
    with open(config) as fh:  # as tests/test_studies.py: a study on Fashion-MNIST needs its IDX files
        if 'data = "fashion_mnist"' in fh.read() and not os.path.isdir(FASHION_MNIST_DIR):
            pytest.skip(f"no Fashion-MNIST in {FASHION_MNIST_DIR}")
    archive = archives(config)
    parameter_cell(nb, path).source = f"ARCHIVE = {archive!r}"
    client = nbclient.NotebookClient(nb, kernel_name=kernel_env, timeout=300, startup_timeout=120,
                                     resources={"metadata": {"path": NOTEBOOK_DIR}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, str(tmp_path / os.path.basename(path)))  # the executed notebook, to look at
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors
    images = [o for o in outputs if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]
    assert images, f"{path}: no figure drawn"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    study = load_study(study_of(nb, path), "debug", tasks=TASKS)
    assert f"study {study.name}" in text and f"runs: {len(study.runs())} total" in text
