"""Packaging: the sdist carries every file the extension build includes; tools that need the source
checkout say so instead of passing on nothing."""
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

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


# ---- CUDA tensors never fall back silently (issue 13 item 3) -------------------------------------------
# No GPU here: the tests call the functions that CUDA tensors run (the custom ops' CUDA implementations,
# and the row kernels of cross-entropy with its device decision answering "cuda") on CPU tensors. Without
# the variable they must raise with the loader's real text; with FASTTFM_ALLOW_FALLBACK=1 they must run
# torch's ops (correct results against float64) and warn once per process.

_IMPORT_TEXT = "fails to load: /site/fasttfm/_C.so: undefined symbol: _ZN3c1017planted_for_test"


@pytest.fixture
def broken_c(monkeypatch):
    from fasttfm import _ext

    monkeypatch.setattr(_ext, "_load_error", lambda module: _IMPORT_TEXT if module == "_C" else None)
    monkeypatch.setattr(_ext, "_fallback_warned", False)
    monkeypatch.delenv("FASTTFM_ALLOW_FALLBACK", raising=False)
    return monkeypatch


def _cuda_points(dtype):
    """[(name, call)] for every CUDA decision point of the extension's ops, each returning its result
    and the float64 and same-dtype torch references: [(out, ref64, ref_lowp, what)]."""
    import torch.nn.functional as F

    from fasttfm.ops import cross_entropy as ce
    from fasttfm.ops import layer_norm as ln
    from fasttfm.ops import softmax as sm
    from tests.oracle import randn

    rows, cols = 5, 37
    x, dy = randn(rows, cols, dtype=dtype), randn(rows, cols, dtype=dtype)
    w, b = randn(cols, dtype=dtype), randn(cols, dtype=dtype)

    def refs(fn, *args):
        hi = [a.double().requires_grad_() for a in args]
        lo = [a.detach().clone().requires_grad_() for a in args]
        out64, outlo = fn(*hi), fn(*lo)
        g64 = torch.autograd.grad(out64, hi, dy.double())
        glo = torch.autograd.grad(outlo, lo, dy)
        return (out64, *g64), (outlo, *glo)

    def layer_norm():
        y, mean, rstd = ln._layer_norm_fwd_cuda(x, w, b, 1e-5, False)
        dx, dw, db = ln._layer_norm_bwd_cuda(dy, x, w, mean, rstd, False, True, True)
        r64, rlo = refs(lambda x_, w_, b_: F.layer_norm(x_, (cols,), w_, b_, 1e-5), x, w, b)
        return list(zip((y, dx, dw, db), r64, rlo, ("y", "dx", "dw", "db")))

    def rms_norm():
        y, mean, rstd = ln._layer_norm_fwd_cuda(x, w, None, 1e-6, True)
        dx, dw, _ = ln._layer_norm_bwd_cuda(dy, x, w, mean, rstd, True, True, False)
        r64, rlo = refs(lambda x_, w_: F.rms_norm(x_, (cols,), w_, 1e-6), x, w)
        return list(zip((y, dx, dw), r64, rlo, ("y", "dx", "dw")))

    def softmax():
        mask = torch.rand(rows, cols) > 0.3
        mask[:, 0] = True
        y = sm._softmax_fwd_cuda(x.view(rows, cols, 1), rows, 0.5, mask.view(1, 1, rows, cols), False, True, None)
        dx = sm._softmax_bwd_cuda(y, dy.view(rows, cols, 1), rows, 0.5, False, dtype).view(rows, cols)
        r64, rlo = refs(lambda x_: torch.softmax((x_ * 0.5).masked_fill(~mask, float("-inf")), -1), x)
        return list(zip((y.view(rows, cols), dx), r64, rlo, ("y", "dx")))

    def cross_entropy():
        target = torch.randint(0, cols, (rows,))
        hi, lo = x.double().requires_grad_(), x.detach().clone().requires_grad_()
        l64, llo = F.cross_entropy(hi, target, reduction="none"), F.cross_entropy(lo.float(), target, reduction="none")
        g = randn(rows)
        (d64,), (dlo,) = torch.autograd.grad(l64, hi, g.double()), torch.autograd.grad(llo, lo, g)
        loss, lse = ce.ce_fwd_rows(x, target, None, -100, 1.0, 0.0, 0.0)
        dx = ce.ce_bwd_rows(g, x, target, None, lse, -100, 1.0, 0.0, 0.0)
        dx_ = ce.ce_bwd_rows_(x.clone(), g, target, None, lse, -100, 1.0, 0.0, 0.0)
        return [(loss, l64, llo, "loss"), (dx, d64, dlo, "dlogits"), (dx_, d64, dlo, "dlogits in place")]

    return [("layer_norm", layer_norm), ("rms_norm", rms_norm), ("softmax", softmax), ("cross_entropy", cross_entropy)]


def _fake_cuda_for_cross_entropy(monkeypatch):
    from fasttfm.ops import cross_entropy as ce

    monkeypatch.setattr(ce, "backend", lambda t: "cuda")


def test_cuda_ops_raise_the_load_error_instead_of_falling_back(broken_c):
    import fasttfm

    _fake_cuda_for_cross_entropy(broken_c)
    for name, call in _cuda_points(torch.float32):
        with pytest.raises(fasttfm.MissingExtensionError) as info:
            call()
        text = str(info.value)
        for need in ("undefined symbol: _ZN3c1017planted_for_test", "make build", "FASTTFM_ALLOW_FALLBACK=1"):
            assert need in text, f"{name}: {need!r} not in {text!r}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_allow_fallback_runs_torch_ops_with_one_warning(broken_c, dtype):
    import warnings

    from tests.oracle import assert_close_oracle

    _fake_cuda_for_cross_entropy(broken_c)
    broken_c.setenv("FASTTFM_ALLOW_FALLBACK", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, call in _cuda_points(dtype):
            for out, ref64, lowp, what in call():
                assert_close_oracle(out, ref64, lowp, factor=3.0, name=f"{name} {what} ({dtype})")
    ours = [w for w in caught if "FASTTFM_ALLOW_FALLBACK" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "planted_for_test" in str(ours[0].message) and issubclass(ours[0].category, RuntimeWarning)


def test_broken_extension_in_a_copy_is_reported_with_the_loaders_text(tmp_path):
    """A real load failure, no monkeypatching: a copy of the package whose _C is not a shared object, and one
    whose _build_info.json names another torch. `info` prints the reason; ops raise it; CPU tensors do not
    quietly take torch's path."""
    import glob

    from fasttfm import _ext

    if _ext._load_error("_C") == "not built":
        pytest.skip("fasttfm._C is not built here")
    pkg = os.path.join(ROOT, "fasttfm")
    script = ("import torch, fasttfm\n"
              "from fasttfm import cli\n"
              "cli.info()\n"
              "try:\n"
              "    fasttfm.rms_norm(torch.randn(3, 8), (8,), torch.ones(8))\n"
              "    print('NO ERROR')\n"
              "except fasttfm.MissingExtensionError as exc:\n"
              "    print('RAISED', exc)\n")
    for case in ("corrupt_so", "other_torch"):
        copy = tmp_path / case
        shutil.copytree(pkg, copy / "fasttfm", ignore=shutil.ignore_patterns("__pycache__", "_C_emu*"))
        shutil.copytree(os.path.join(ROOT, "kernels"), copy / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
        if case == "corrupt_so":
            (so,) = glob.glob(str(copy / "fasttfm" / "_C.*"))
            with open(so, "wb") as f:
                f.write(b"not an ELF file\n" * 512)
            expect = "invalid ELF header"
        else:
            (copy / "fasttfm" / "_build_info.json").write_text('{"torch": "0.0.1+corrupted", "archs": []}')
            expect = "built against torch 0.0.1+corrupted"
        env = dict(os.environ, PYTHONPATH=str(copy))
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=copy, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = proc.stdout
        assert "LOAD ERROR fasttfm._C:" in out and "cpu: load error" in out and expect in out, out
        assert "RAISED" in out and expect in out.split("RAISED", 1)[1] and "make build" in out, out


# ---- the wheel a user installs (issue 13: "a package people install") -------------------------------

def test_wheel_from_sdist_installs_and_runs_outside_the_checkout(tmp_path):
    """sdist of the tracked tree -> wheel built from that sdist (CPU-only extension, about a minute) ->
    installed into a folder of its own; from a folder outside the checkout, `info`, `bench --list` and
    `gpu-check` (build and tests phases say they need a checkout) run on the installed package, and the
    build printed none of the packaging warnings issue 13 lists."""
    files = _tracked(".")
    src = tmp_path / "src"
    for rel in files:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), src / rel)
    env = dict(os.environ, FASTTFM_SKIP_CUDA_BUILD="1", FASTTFM_SKIP_EMU_BUILD="1", PYTHONWARNINGS="default")
    env.pop("PYTHONPATH", None)
    sdist = subprocess.run([sys.executable, "setup.py", "sdist", "-d", str(tmp_path / "dist")], cwd=src, env=env,
                           capture_output=True, text=True, timeout=600)
    assert sdist.returncode == 0, sdist.stderr[-3000:]
    (tarball,) = (tmp_path / "dist").glob("*.tar.gz")
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-v",
                            "-w", str(tmp_path / "wheels"), str(tarball)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=1200)
    assert wheel.returncode == 0, wheel.stdout[-3000:] + wheel.stderr[-3000:]
    log = sdist.stdout + sdist.stderr + wheel.stdout + wheel.stderr
    for warning in ("absent from the `packages` configuration", "as a TOML table is deprecated"):
        assert warning not in log, f"packaging warning in the build: {warning}"
    (whl,) = (tmp_path / "wheels").glob("fasttfm-*.whl")
    site = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(whl)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr[-3000:]
    assert (site / "fasttfm" / "bench" / "suite.py").is_file() and (site / "fasttfm" / "tinyshakespeare.txt").is_file()
    (so,) = (site / "fasttfm").glob("_C.*.so")
    if shutil.which("readelf"):
        sections = subprocess.run(["readelf", "-S", "-W", str(so)], capture_output=True, text=True).stdout
        assert ".debug_info" not in sections, "the release build carries host debug info"

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run_env = dict(env, PYTHONPATH=str(site))

    def fasttfm_cli(*args):
        proc = subprocess.run([sys.executable, "-m", "fasttfm", *args], cwd=outside, env=run_env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"fasttfm {' '.join(args)}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        return proc.stdout

    where = subprocess.run([sys.executable, "-c", "import fasttfm, fasttfm.bench, fasttfm.kernels as k; "
                            "print(fasttfm.__file__, fasttfm.bench.__file__, k.__file__)"],
                           cwd=outside, env=run_env, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(p.startswith(str(site)) for p in where.stdout.split()), where.stdout
    assert "cpu: built" in fasttfm_cli("info")
    shipped = {p[len("bench/bench_"):-3] for p in files if p.startswith("bench/bench_") and p.endswith(".py")}
    assert set(fasttfm_cli("bench", "--list").split()) == shipped
    out = fasttfm_cli("gpu-check", "--phases", "build,tests", "--budget-s", "60")
    assert "tests: skipped: the tests phase collects tests/ of a source checkout" in out, out
    assert (outside / "fasttfm-gpu-check" / "summary.md").is_file()
