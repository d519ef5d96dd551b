"""Test-session settings shared by every test file."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Models the studies train (studies.dpm_tasks.trained_model) are cached in a directory of the
    session, not in the user's ~/.cache: tests start from nothing and leave nothing behind. Set in
    the environment so that sweep worker processes see it."""
    old = os.environ.get("SUBSTRATE_CACHE")
    os.environ["SUBSTRATE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("SUBSTRATE_CACHE", None)
    else:
        os.environ["SUBSTRATE_CACHE"] = old
