"""Package-level promises: no torch at import, a Numba cache that works for read-only installs."""

import os
import subprocess
import sys

import substrate


def test_import_does_not_load_torch():
    """torch (hundreds of MB, seconds to import) is loaded by the modules that use it only: the
    torchdiffeq backend and the diffusion model (``models.dpm``, a torch network)."""
    code = ("import sys, substrate, substrate.devices, models.ep, models.train, models.data, models.pvrnn, "
            "models.metrics, models.homeostasis; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True, text=True)
    assert out.stdout.strip() == "False", "torch imported"


def test_numba_cache_moves_out_of_a_read_only_install(monkeypatch, tmp_path):
    """Where the package folder is not writable, NUMBA_CACHE_DIR is set to a user cache folder before
    numba is imported (numba would otherwise fail to cache); a user's own setting wins."""
    package = os.path.dirname(substrate.__file__)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if p == package else real_access(p, m))
    monkeypatch.setenv("NUMBA_CACHE_DIR", "")  # records the original value (or its absence) for the undo,
    monkeypatch.delenv("NUMBA_CACHE_DIR")  # which delenv(raising=False) of an absent variable does not
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    substrate._numba_cache_dir()
    assert os.environ["NUMBA_CACHE_DIR"] == os.path.join(str(tmp_path), "substrate", "numba")
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/elsewhere")
    substrate._numba_cache_dir()
    assert os.environ["NUMBA_CACHE_DIR"] == "/elsewhere"
    monkeypatch.setattr(os, "access", real_access)
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    substrate._numba_cache_dir()  # writable package folder: numba caches beside the sources
    assert "NUMBA_CACHE_DIR" not in os.environ
