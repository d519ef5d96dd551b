"""Test-session settings shared by every test file."""

import contextlib
import os
import sys

import pytest


def pytest_collection_modifyitems(config, items):
    """Groups for pytest-xdist's `--dist loadgroup` (the test command runs on two worker processes): a test
    file's tests stay on one worker, so that its module-scoped fixtures are built once, and every test that
    reads the session's study archives (`config_archives`) joins one group, so that each config is swept
    once. Without xdist the marks are inert."""
    for item in items:
        group = "config_archives" if "config_archives" in item.fixturenames else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Models the studies train (studies.catalogue.dpm_gradients.trained_model) are cached in a directory of the
    session, not in the user's ~/.cache: tests start from nothing and leave nothing behind. Set in
    the environment so that sweep worker processes see it."""
    old = os.environ.get("SUBSTRATE_CACHE")
    os.environ["SUBSTRATE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("SUBSTRATE_CACHE", None)
    else:
        os.environ["SUBSTRATE_CACHE"] = old


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread(request):
    """torch's intra-op threads set to 1 for the torch-based tests (models.dpm): their problems are
    small, and two threads on a machine whose other core is busy ran them up to 18x slower."""
    if "torch" not in sys.modules:
        yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@contextlib.contextmanager
def _one_torch_thread():
    """torch's intra-op threads at 1, as in a sweep's worker processes (their environment sets one
    thread), for the runs of the diffusion studies made in this process."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _Archives(dict):
    """Study config path -> (the study at its debug profile, its sweep archive's path, the sweep's
    counts), swept on first use, in this process (SerialExecutor: the same execute_run as a pool
    worker, without starting two worker processes per study, each paying the imports and the loading
    of its kernels: ~6x the CPU time of the runs). test_dask.py sweeps every config again on worker
    processes and compares them bit for bit with these."""

    def __init__(self, folders):
        super().__init__()
        self.folders = folders

    def __missing__(self, path):
        from studies import sweep
        from studies.catalogue import TASKS
        from studies.config import load_study

        s = load_study(path, "debug", tasks=TASKS)
        stats = {}
        with _one_torch_thread():
            archive = sweep.run_sweep(s, str(self.folders.mktemp(s.name)), executor=sweep.SerialExecutor(),
                                      progress=False, stats=stats)
        self[path] = (s, archive, stats)
        return self[path]


@pytest.fixture(scope="session")
def config_archives(tmp_path_factory):
    """Every study config of studies/configs swept at debug size, once per
    session (test_studies.py checks the archives, test_figures.py draws them): a dict from the config's
    path, each swept when a test first asks for it (a config whose test is skipped is never swept)."""
    return _Archives(tmp_path_factory)
