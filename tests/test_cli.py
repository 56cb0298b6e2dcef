"""`python -m fasttfm info` says what is built; missing parts give errors that say how to build."""
import subprocess
import sys

import pytest

from fasttfm import _ext


def test_info_lists_versions_and_parts():
    out = subprocess.run([sys.executable, "-m", "fasttfm", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for key in ("torch", "triton", "CUDA toolkit", "GPU", "extension", "emulation"):
        assert key in out.stdout
    parts = _ext.built_parts()
    for name, built in parts.items():
        assert f"{name}: {'built' if built else 'missing'}" in out.stdout


def test_missing_extension_error_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_ext, "_load_error", lambda module: "not built")
    with pytest.raises(_ext.MissingExtensionError, match="make build"):
        _ext.emu_lib()
    with pytest.raises(_ext.MissingExtensionError, match="fasttfm._C is not built"):
        _ext.cuda_lib()


def test_cuda_home_is_the_real_toolkit():
    import os

    from fasttfm._cuda_home import find_cuda_home

    home = find_cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit on this machine")
    assert os.path.exists(os.path.join(home, "bin", "nvcc"))
    assert os.path.isdir(os.path.join(home, "include"))
    assert any(os.path.exists(os.path.join(home, d, "libcudart.so")) for d in ("lib64", "lib", "targets/x86_64-linux/lib"))


def test_cuda_home_through_a_wrapper_nvcc(tmp_path, monkeypatch):
    """The nvcc on PATH may be a wrapper script outside the toolkit: ask it, don't guess from its folder."""
    import os

    from fasttfm import _cuda_home

    real = _cuda_home.find_cuda_home()
    if real is None:
        pytest.skip("no CUDA toolkit on this machine")
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec "{os.path.join(real, "bin", "nvcc")}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
    _cuda_home.find_cuda_home.cache_clear()
    try:
        assert _cuda_home.find_cuda_home() == real
    finally:
        _cuda_home.find_cuda_home.cache_clear()
