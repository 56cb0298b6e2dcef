"""gpu-check phase ``grid``: correctness at GPU scale, where the interpreter could never go.

Attention forward and every gradient (dq, dk, dv) at sequence lengths up to 8k, head dims
64/128/256, fp16/bf16, full/causal/window/chunk/varlen/GQA/softcap, against an explicit-mask
float64 reference computed on the GPU; norms and softmax at widths up to 262144 and
cross-entropy / fused linear cross-entropy at vocab 262144; bitwise determinism (two runs).

Each check uses FlashAttention's relative oracle: the kernel's max error against the float64
reference is at most 2x that of the same reference math run in the tested dtype, plus a floor of
half an ulp at the largest magnitude. Inputs are fresh random draws (the seed is recorded).
Cases run in order of value and stop at the phase deadline (the rest are recorded as skipped).
"""
import os
import sys

import torch
import torch.nn.functional as F

from ._common import guarded, left, record, rel_oracle

__all__ = ["attention_reference", "visible_mask", "attention_cases", "main"]


def visible_mask(nq, nk, left_w, right_w, chunk, device):
    """(nq, nk) bool: query i sees key j (FlashAttention's bottom-right alignment; -1 = unbounded)."""
    i = torch.arange(nq, device=device)[:, None] + (nk - nq)
    j = torch.arange(nk, device=device)[None, :]
    vis = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if left_w >= 0:
        vis &= j >= i - left_w
    if right_w >= 0:
        vis &= j <= i + right_w
    if chunk:
        vis &= torch.div(i, chunk, rounding_mode="floor") == torch.div(j, chunk, rounding_mode="floor")
    return vis


def attention_reference(q, k, v, *, causal=False, window=(-1, -1), chunk=None, softcap=0.0, scale=None):
    """softmax(scale q k^T (+cap, mask)) v in the inputs' dtype; q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D).
    Rows that see no key give 0."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    left_w, right_w = window
    vis = visible_mask(q.shape[2], k.shape[2], left_w, 0 if causal else right_w, chunk, q.device)
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


def _varlen_reference(q, k, v, cu, **kw):
    """Packed (total, H, D) sequences: the reference per sequence, concatenated."""
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        outs.append(attention_reference(qs, ks, vs, **kw)[0].transpose(0, 1))
    return torch.cat(outs, 0)


def attention_cases(quick=False):
    """(name, kwargs) in order of value: the common training shapes first, then the variants."""
    cases = []
    for dtype in (torch.bfloat16, torch.float16):
        for d in (128, 64, 256):
            cases.append(dict(dtype=dtype, d=d, n=8192, causal=True))
            cases.append(dict(dtype=dtype, d=d, n=4097, causal=False))
    bf = torch.bfloat16
    cases += [
        dict(dtype=bf, d=128, n=8192, causal=True, window=(1024, 0)),
        dict(dtype=bf, d=128, n=8192, chunk=2048),
        dict(dtype=bf, d=128, n=8192, causal=True, hq=8, hkv=2),
        dict(dtype=bf, d=128, n=4096, causal=True, softcap=30.0),
        dict(dtype=bf, d=128, causal=True, varlen=[3001, 4999, 123, 64]),
        dict(dtype=torch.float16, d=64, causal=True, window=(511, 0), hq=8, hkv=4, varlen=[2048, 77, 6000]),
        dict(dtype=bf, d=256, n=8192, causal=True, window=(2048, 0), hq=4, hkv=1),
        dict(dtype=torch.float16, d=128, nq=1000, n=8192, causal=True),
        dict(dtype=bf, d=80, n=3333, window=(300, 300)),
    ]
    return cases[:4] if quick else cases


def _name(c):
    parts = [str(c["dtype"]).replace("torch.", ""), f"d{c['d']}"]
    parts.append(f"varlen{c['varlen']}" if c.get("varlen") else f"N{c.get('nq', c['n'])}x{c['n']}")
    for key in ("causal", "window", "chunk", "softcap"):
        if c.get(key):
            parts.append(key if c[key] is True else f"{key}={c[key]}")
    if c.get("hq"):
        parts.append(f"gqa{c['hq']}/{c['hkv']}")
    return " ".join(parts)


def run_attention_case(c, device="cuda"):
    import fasttfm

    dtype, d = c["dtype"], c["d"]
    hq, hkv = c.get("hq", 2), c.get("hkv", c.get("hq", 2))
    kw = dict(causal=c.get("causal", False), window=c.get("window", (-1, -1)), softcap=c.get("softcap", 0.0))
    chunk = c.get("chunk")
    if c.get("varlen"):
        lens = c["varlen"]
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
        tot = sum(lens)
        shapes = [(tot, hq, d), (tot, hkv, d), (tot, hkv, d)]
    else:
        nq = c.get("nq", c["n"])
        shapes = [(1, hq, nq, d), (1, hkv, c["n"], d), (1, hkv, c["n"], d)]
    q, k, v = (torch.randn(s, device=device, dtype=torch.float64).to(dtype) for s in shapes)
    dout = torch.randn(shapes[0], device=device, dtype=torch.float64).to(dtype)

    def grads(fn, dt):
        ins = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        out = fn(*ins)
        out.backward(dout.to(dt))
        return [out.detach()] + [t.grad for t in ins]

    if c.get("varlen"):
        mx = max(c["varlen"])
        ours = grads(lambda a, b, e: fasttfm.attention(a, b, e, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mx,
                                                        max_seqlen_k=mx, chunk_size=chunk, **kw), dtype)
        ref = grads(lambda a, b, e: _varlen_reference(a, b, e, cu, chunk=chunk, **kw), torch.float64)
        low = grads(lambda a, b, e: _varlen_reference(a, b, e, cu, chunk=chunk, **kw), dtype)
    else:
        ours = grads(lambda a, b, e: fasttfm.attention(a, b, e, chunk_size=chunk, **kw), dtype)
        ref = grads(lambda a, b, e: attention_reference(a, b, e, chunk=chunk, **kw), torch.float64)
        low = grads(lambda a, b, e: attention_reference(a, b, e, chunk=chunk, **kw), dtype)
    return _compare("attention", _name(c), ["out", "dq", "dk", "dv"], ours, ref, low)


def _compare(family, case, names, ours, ref, low):
    fails, errs = [], {}
    for nm, o, r, lo in zip(names, ours, ref, low):
        ok, err, bound = rel_oracle(o, r, lo)
        errs[nm] = {"err": err, "bound": bound, "ok": ok}
        if not ok:
            fails.append(nm)
    return record("grid", family=family, case=case, status="ok" if not fails else "failed", failed=fails, errors=errs)


def run_norm_case(kind, rows, cols, dtype, device="cuda"):
    import fasttfm

    x = (torch.randn(rows, cols, device=device, dtype=torch.float64) * 2 + 0.5).to(dtype)
    w = (1 + 0.1 * torch.randn(cols, device=device, dtype=torch.float64)).to(dtype)
    b = (0.1 * torch.randn(cols, device=device, dtype=torch.float64)).to(dtype)
    dy = torch.randn(rows, cols, device=device, dtype=torch.float64).to(dtype)

    def run(fn, dt):
        ins = [t.detach().to(dt).requires_grad_() for t in ((x, w, b) if kind == "layer_norm" else (x, w))]
        y = fn(*ins)
        y.backward(dy.to(dt))
        return [y.detach()] + [t.grad for t in ins]

    if kind == "layer_norm":
        ours = run(lambda a, ww, bb: fasttfm.layer_norm(a, (cols,), ww, bb, 1e-5), dtype)
        ref = run(lambda a, ww, bb: F.layer_norm(a, (cols,), ww, bb, 1e-5), torch.float64)
        low = run(lambda a, ww, bb: F.layer_norm(a, (cols,), ww, bb, 1e-5), dtype)
        names = ["y", "dx", "dweight", "dbias"]
    else:
        ours = run(lambda a, ww: fasttfm.rms_norm(a, (cols,), ww, 1e-6), dtype)
        ref = run(lambda a, ww: F.rms_norm(a, (cols,), ww, 1e-6), torch.float64)
        low = run(lambda a, ww: F.rms_norm(a, (cols,), ww, 1e-6), dtype)
        names = ["y", "dx", "dweight"]
    return _compare(kind, f"{str(dtype)[6:]} {rows}x{cols}", names, ours, ref, low)


def run_softmax_case(rows, cols, dtype, device="cuda"):
    import fasttfm

    x = (torch.randn(rows, cols, device=device, dtype=torch.float64) * 4).to(dtype)
    dy = torch.randn(rows, cols, device=device, dtype=torch.float64).to(dtype)

    def run(fn, dt):
        a = x.detach().to(dt).requires_grad_()
        y = fn(a)
        y.backward(dy.to(dt))
        return [y.detach(), a.grad]

    ours = run(lambda a: fasttfm.softmax(a, -1), dtype)
    ref = run(lambda a: torch.softmax(a, -1), torch.float64)
    low = run(lambda a: torch.softmax(a, -1), dtype)
    return _compare("softmax", f"{str(dtype)[6:]} {rows}x{cols}", ["y", "dx"], ours, ref, low)


def run_ce_case(rows, vocab, dtype, smoothing=0.1, device="cuda"):
    import fasttfm

    logits = (torch.randn(rows, vocab, device=device, dtype=torch.float32) * 3).to(dtype)
    target = torch.randint(0, vocab, (rows,), device=device)
    target[::7] = -100

    def run(fn, dt):
        a = logits.detach().to(dt).requires_grad_()
        loss = fn(a)
        loss.backward()
        return [loss.detach(), a.grad]

    ours = run(lambda a: fasttfm.cross_entropy(a, target, label_smoothing=smoothing), dtype)
    ref = run(lambda a: F.cross_entropy(a, target, label_smoothing=smoothing), torch.float64)
    low = run(lambda a: F.cross_entropy(a, target, label_smoothing=smoothing), dtype)
    return _compare("cross_entropy", f"{str(dtype)[6:]} {rows}x{vocab} ls={smoothing}", ["loss", "dlogits"], ours,
                    ref, low)


def run_linear_ce_case(rows, hidden, vocab, dtype, device="cuda"):
    import fasttfm

    h = torch.randn(rows, hidden, device=device, dtype=dtype)
    w = (torch.randn(vocab, hidden, device=device, dtype=torch.float32) * hidden ** -0.5).to(dtype)
    target = torch.randint(0, vocab, (rows,), device=device)
    target[::5] = -100

    def run(fn, dt):
        a, b = h.detach().to(dt).requires_grad_(), w.detach().to(dt).requires_grad_()
        loss = fn(a, b)
        loss.backward()
        return [loss.detach(), a.grad, b.grad]

    ours = run(lambda a, b: fasttfm.linear_cross_entropy(a, b, target, label_smoothing=0.1), dtype)
    ref = run(lambda a, b: F.cross_entropy(a @ b.t(), target, label_smoothing=0.1), torch.float64)
    low = run(lambda a, b: F.cross_entropy(a @ b.t(), target, label_smoothing=0.1), dtype)
    return _compare("linear_cross_entropy", f"{str(dtype)[6:]} {rows}x{hidden} V={vocab}",
                    ["loss", "dhidden", "dweight"], ours, ref, low)


def run_determinism(device="cuda", n=4096, cols=4096, rows=8192, vocab=32000):
    """Bitwise equality of two identical runs (attention grads, norm weight grads, CE, linear-CE)."""
    import fasttfm

    def twice(fn):
        a, b = fn(), fn()
        return all(torch.equal(x, y) for x, y in zip(a, b))

    q, k, v = (torch.randn(2, 8, n, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn_like(q)

    def attn():
        ins = [t.detach().requires_grad_() for t in (q, k, v)]
        fasttfm.attention(*ins, causal=True).backward(do)
        return [t.grad for t in ins]

    x = torch.randn(rows, cols, device=device, dtype=torch.bfloat16)
    w = torch.ones(cols, device=device, dtype=torch.bfloat16)
    dy = torch.randn_like(x)

    def ln():
        a, ww, bb = x.detach().requires_grad_(), w.detach().requires_grad_(), torch.zeros_like(w).requires_grad_()
        fasttfm.layer_norm(a, (cols,), ww, bb).backward(dy)
        return [a.grad, ww.grad, bb.grad]

    def rms():
        a, ww = x.detach().requires_grad_(), w.detach().requires_grad_()
        fasttfm.rms_norm(a, (cols,), ww).backward(dy)
        return [a.grad, ww.grad]

    logits = torch.randn(rows // 2, vocab, device=device, dtype=torch.bfloat16)
    t = torch.randint(0, vocab, (rows // 2,), device=device)

    def ce():
        a = logits.detach().requires_grad_()
        loss = fasttfm.cross_entropy(a, t, label_smoothing=0.1)
        loss.backward()
        return [loss.detach(), a.grad]

    h = torch.randn(rows // 2, 1024, device=device, dtype=torch.bfloat16)
    wv = torch.randn(vocab, 1024, device=device, dtype=torch.bfloat16) * 0.03

    def lce():
        a, b = h.detach().requires_grad_(), wv.detach().requires_grad_()
        loss = fasttfm.linear_cross_entropy(a, b, t)
        loss.backward()
        return [loss.detach(), a.grad, b.grad]

    res = {name: twice(fn) for name, fn in
           [("attention bwd", attn), ("layer_norm bwd", ln), ("rms_norm bwd", rms), ("cross_entropy", ce),
            ("linear_cross_entropy", lce)]}
    bad = [n for n, ok in res.items() if not ok]
    return record("grid", family="determinism", case="two runs bitwise", status="ok" if not bad else "failed",
                  failed=bad, results=res)


def all_cases(quick=False):
    """(family, case label, thunk) in the order they run."""
    cases = [("attention", _name(c), (lambda c=c: run_attention_case(c))) for c in attention_cases(quick)]
    big = [] if quick else [(8, 262144), (64, 65536)]
    for kind in ("layer_norm", "rms_norm"):
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            for rows, cols in [(4096, 4095), *big][: 1 if quick else 3]:
                cases.append((kind, f"{dtype} {rows}x{cols}",
                              lambda kind=kind, r=rows, c=cols, dt=dtype: run_norm_case(kind, r, c, dt)))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for rows, cols in [(2048, 4097), *big][: 1 if quick else 3]:
            cases.append(("softmax", f"{dtype} {rows}x{cols}", lambda r=rows, c=cols, dt=dtype: run_softmax_case(r, c, dt)))
    cases.append(("determinism", "two runs", run_determinism))
    for dtype in (torch.bfloat16, torch.float32):
        cases.append(("cross_entropy", f"{dtype} V=262144",
                      lambda dt=dtype: run_ce_case(256 if quick else 2048, 262144, dt)))
    cases.append(("linear_cross_entropy", "bf16 V=262144",
                  lambda: run_linear_ce_case(512 if quick else 2048, 1024, 262144, torch.bfloat16)))
    return cases


def _shards(argv, n):
    """Run ``n`` shard processes (Triton compiles on the CPU: shards compile in parallel), wait for them
    until the deadline; their records go to the same file. Returns the worst exit status."""
    import subprocess
    import time

    from ._common import deadline

    procs = [subprocess.Popen([sys.executable, "-m", "fasttfm.gpu_check.grid", "--shard", f"{i}/{n}", *argv])
             for i in range(n)]
    rc = 0
    for p in procs:
        try:
            rc = max(rc, p.wait(timeout=max(1.0, deadline() + 3 - time.time())))
        except subprocess.TimeoutExpired:
            p.kill()
            rc = max(rc, 1)
    return rc


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    quick = "--quick" in argv
    shard = None
    if "--shard" in argv:
        i, n = argv[argv.index("--shard") + 1].split("/")
        shard = (int(i), int(n))
    elif torch.cuda.is_available() and not quick:
        return _shards([a for a in argv if a != "--shard"], int(os.environ.get("FASTTFM_GPU_CHECK_SHARDS", "3")))
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    record("grid", case="seed", status="info", seed=seed, shard=shard)
    if not torch.cuda.is_available():
        record("grid", case="all", status="skipped", why="no CUDA device")
        return 0
    failed = 0
    cases = all_cases(quick=quick)
    if shard:
        cases = cases[shard[0]::shard[1]]
    for i, (family, label, thunk) in enumerate(cases):
        if left() < 5:
            for fam, lab, _ in cases[i:]:
                record("grid", family=fam, case=lab, status="skipped", why="phase budget exhausted")
            break
        rec = guarded("grid", f"{family} {label}", thunk)
        failed += rec.get("status") not in ("ok",)
        torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
