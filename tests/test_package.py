"""Packaging: the sdist carries every file the extension build includes; tools that need the source
checkout say so instead of passing on nothing."""
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked(prefix):
    out = subprocess.run(["git", "ls-files", prefix], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [p for p in out.stdout.split() if p]


def test_sdist_has_every_build_input(tmp_path):
    """`setup.py sdist` in a copy of the tracked tree; every tracked csrc/ source and header, the
    kernels and the package data must be in the tarball (the missing headers made
    `pip wheel fasttfm-0.1.0.tar.gz` fail on cpu_common.h)."""
    files = _tracked(".")
    copy = tmp_path / "src"
    for rel in files:
        dst = copy / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), dst)
    env = dict(os.environ, FASTTFM_SKIP_CUDA_BUILD="1", FASTTFM_SKIP_EMU_BUILD="1")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=copy,
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tarball,) = (tmp_path / "dist").iterdir()
    with tarfile.open(tarball) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    need = [p for p in files if p.startswith(("csrc/", "kernels/", "fasttfm/")) and not p.endswith(".png")]
    need += ["setup.py", "pyproject.toml", "README.md"]
    missing = sorted(set(need) - names)
    assert not missing, f"sdist lacks {missing[:20]}"


def test_aot_cuda_without_sources_fails_clearly(tmp_path, monkeypatch):
    from fasttfm import aot

    monkeypatch.setattr(aot, "_root", lambda: str(tmp_path))
    monkeypatch.setattr(aot, "nvcc_path", lambda: "/usr/bin/true")
    with pytest.raises(RuntimeError, match="no CUDA sources"):
        aot.cuda_reports((90,))


def test_aot_help_is_its_own():
    proc = subprocess.run([sys.executable, "-m", "fasttfm", "aot", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "--only" in proc.stdout, proc.stdout + proc.stderr


def test_extension_built_for_another_torch_is_reported_not_hidden(monkeypatch, capsys):
    """A _C built against another torch (recorded in _build_info.json) must not read as 'not built' nor
    let CPU tensors silently take torch's path: info prints the reason, ops raise it."""
    import torch

    import fasttfm
    from fasttfm import _ext, cli

    if _ext._load_error("_C") == "not built":
        pytest.skip("fasttfm._C is not built here")
    monkeypatch.setattr(_ext, "_build_info", lambda: {"torch": "0.0.0+other"})
    _ext._load_error.cache_clear()
    try:
        with pytest.raises(fasttfm.MissingExtensionError, match="built against torch 0.0.0"):
            _ext.cpu_lib()
        with pytest.raises(fasttfm.MissingExtensionError, match="rebuild"):
            fasttfm.rms_norm(torch.randn(3, 8), (8,), torch.ones(8))
        cli.info()
        assert "LOAD ERROR fasttfm._C: was built against torch 0.0.0+other" in capsys.readouterr().out
    finally:
        monkeypatch.undo()
        _ext._load_error.cache_clear()
    assert _ext._load_error("_C") is None
