"""gpu-check report: results.json, summary.md, two plots and the compact target table on stdout.

The targets (TARGETS) are the README's performance targets; each is evaluated from the perf
records as a ratio: attention as provider time / fasttfm time (> 1 means fasttfm is faster),
memory-bound ops as the fraction of the measured copy bandwidth, fused linear-CE as its peak
memory and time over the unfused pair, decode as tokens/s over SDPA's. Aggregates are geometric
means over the cases with the minimum beside them, so one bad case cannot hide.
"""
import json
import math
import os
import time

__all__ = ["TARGETS", "write_results", "finish", "evaluate_targets", "target_table"]

# (label, kind, selector, goal). kinds: "speedup" (other provider's ms / fasttfm ms >= goal),
# "frac_copy" (GB/s / copy GB/s >= goal), "ratio_le" (fasttfm value / torch value <= goal).
TARGETS = [
    ("attention fwd vs SDPA FLASH (FA2)", "speedup", dict(section="attention", dir="fwd", other="sdpa_flash"), 1.0),
    ("attention fwd vs SDPA CUDNN (FA3-class)", "speedup", dict(section="attention", dir="fwd", other="sdpa_cudnn"),
     0.9),
    ("attention fwd+bwd vs SDPA FLASH", "speedup", dict(section="attention", dir="fwd+bwd", other="sdpa_flash"), 1.0),
    ("attention fwd+bwd vs SDPA CUDNN", "speedup", dict(section="attention", dir="fwd+bwd", other="sdpa_cudnn"), 0.9),
    ("attention vs FlexAttention (compiled)", "speedup", dict(section="flex", other="flex_compiled"), 1.0),
    ("LayerNorm fwd, % of copy BW", "frac_copy", dict(section="membound", op="layer_norm", dir="fwd"), 0.80),
    ("LayerNorm fwd+bwd, % of copy BW", "frac_copy", dict(section="membound", op="layer_norm", dir="fwd+bwd"), 0.70),
    ("RMSNorm fwd, % of copy BW", "frac_copy", dict(section="membound", op="rms_norm", dir="fwd"), 0.80),
    ("RMSNorm fwd+bwd, % of copy BW", "frac_copy", dict(section="membound", op="rms_norm", dir="fwd+bwd"), 0.70),
    ("softmax fwd, % of copy BW", "frac_copy", dict(section="membound", op="softmax", dir="fwd"), 0.80),
    ("softmax fwd+bwd, % of copy BW", "frac_copy", dict(section="membound", op="softmax", dir="fwd+bwd"), 0.70),
    ("cross-entropy fwd+bwd, % of copy BW", "frac_copy", dict(section="membound", op="cross_entropy"), 0.70),
    ("memory-bound ops vs torch eager", "speedup", dict(section="membound", other="torch"), 1.0),
    ("memory-bound ops vs torch.compile", "speedup", dict(section="compile", other="torch_compile"), 1.0),
    ("fused linear-CE peak memory / unfused", "ratio_le", dict(section="linear_ce", field="peak_mib"), 0.5),
    ("fused linear-CE time / unfused", "ratio_le", dict(section="linear_ce", field="ms"), 1.1),
    ("decode tokens/s vs SDPA", "speedup", dict(section="decode", other="torch_sdpa"), 1.0),
]
_KEYS = ("dtype", "d", "n", "mask", "dir", "op", "rows", "cols", "batch", "cache", "bt", "vocab")


def _perf(records):
    return [r for r in records if r.get("phase") == "perf" and r.get("status") == "ok" and "ms" in r]


def _match(rec, sel):
    return all(rec.get(k) == v for k, v in sel.items() if k not in ("other", "field"))


def _geo(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def evaluate_targets(records):
    """[(label, goal, kind, geomean, min, n_cases, met)] from the perf records."""
    perf = _perf(records)
    out = []
    for label, kind, sel, goal in TARGETS:
        vals = []
        if kind == "speedup":
            ours = {tuple(r.get(k) for k in _KEYS): r for r in perf if _match(r, sel) and r["provider"] == "fasttfm"}
            for r in perf:
                if _match(r, sel) and r["provider"] == sel["other"]:
                    mine = ours.get(tuple(r.get(k) for k in _KEYS))
                    if mine:
                        vals.append(r["ms"] / mine["ms"])
        elif kind == "frac_copy":
            vals = [r["frac_copy"] for r in perf if _match(r, sel) and r["provider"] == "fasttfm" and r.get("frac_copy")]
        else:
            rows = {r["provider"]: r for r in perf if _match(r, sel)}
            if "fasttfm" in rows and "torch" in rows and rows["torch"].get(sel["field"]):
                vals = [rows["fasttfm"][sel["field"]] / rows["torch"][sel["field"]]]
        g = _geo(vals)
        worst = (max(vals) if kind == "ratio_le" else min(vals)) if vals else None
        met = None if g is None else (g <= goal if kind == "ratio_le" else g >= goal)
        out.append((label, goal, kind, g, worst, len(vals), met))
    return out


def _fmt_goal(kind, goal):
    return {"speedup": f">= {goal:.2f}x", "frac_copy": f">= {goal:.0%}", "ratio_le": f"<= {goal:.2f}x"}[kind]


def _fmt_val(kind, v):
    if v is None:
        return "not measured"
    return f"{v:.0%}" if kind == "frac_copy" else f"{v:.2f}x"


def target_table(records):
    lines = ["| target | goal | measured (geomean) | worst case | cases | met |", "|---|---|---|---|---|---|"]
    for label, goal, kind, g, worst, n, met in evaluate_targets(records):
        lines.append(f"| {label} | {_fmt_goal(kind, goal)} | {_fmt_val(kind, g)} | {_fmt_val(kind, worst)} | {n} | "
                     f"{'-' if met is None else ('yes' if met else 'NO')} |")
    return "\n".join(lines)


def _counts(records, phase):
    c = {}
    for r in records:
        if r.get("phase") == phase and r.get("status") not in ("info",):
            c[r["status"]] = c.get(r["status"], 0) + 1
    return c


def write_results(run):
    records = run.records()
    peaks = next((r for r in records if r.get("section") == "peaks" and r.get("status") == "ok"), {})
    data = {"command": getattr(run, "command", None), "machine": run.machine, "budget_s": run.budget_s,
            "elapsed_s": round(time.time() - run.start, 1), "phases": run.phases,
            "peaks": {k: peaks.get(k) for k in ("copy_gbps", "gemm_tflops")},
            "counts": {p: _counts(records, p) for p in ("tests", "grid", "sanitizer", "perf")},
            "targets": [dict(zip(("label", "goal", "kind", "geomean", "worst", "cases", "met"), t))
                        for t in evaluate_targets(records)],
            "records": records}
    tmp = os.path.join(run.out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, os.path.join(run.out, "results.json"))
    return data


def _attention_table(records):
    perf = [r for r in _perf(records) if r.get("section") == "attention"]
    if not perf:
        return "(no attention timings)"
    provs = sorted({r["provider"] for r in perf}, key=lambda p: (p != "fasttfm", p))
    keys = sorted({(r["dtype"], r["d"], r["mask"], r["dir"], r["n"]) for r in perf},
                  key=lambda k: (k[0], -k[1], k[2], k[3], k[4]))
    by = {(r["dtype"], r["d"], r["mask"], r["dir"], r["n"], r["provider"]): r for r in perf}
    lines = ["| dtype | d | mask | dir | N | " + " | ".join(f"{p} TFLOP/s" for p in provs) + " |",
             "|---|---|---|---|---|" + "---|" * len(provs)]
    for k in keys:
        cells = [f"{by[k + (p,)]['tflops']:.0f}" if k + (p,) in by else "-" for p in provs]
        lines.append("| " + " | ".join(map(str, k)) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rows_table(records, section, cols):
    perf = [r for r in _perf(records) if r.get("section") == section]
    if not perf:
        return f"(no {section} timings)"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in perf:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _failures(records, phase, limit=40):
    bad = [r for r in records if r.get("phase") == phase and r.get("status") in ("failed", "error", "timeout")]
    lines = []
    for r in bad[:limit]:
        what = r.get("error") or r.get("failed") or r.get("why") or ""
        lines.append(f"- `{r.get('case')}`: {r['status']}: {str(what).strip().splitlines()[-1][:300] if what else ''}")
    if len(bad) > limit:
        lines.append(f"- ... {len(bad) - limit} more (results.json)")
    return "\n".join(lines) or "none"


def _plots(run, records):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["matplotlib not installed: no plots"]
    made = []
    perf = [r for r in _perf(records) if r.get("section") == "attention"]
    if perf:
        combos = sorted({(r["dtype"], r["d"], r["mask"], r["dir"]) for r in perf})
        ncol = 4
        nrow = math.ceil(len(combos) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3 * nrow), squeeze=False)
        for ax, combo in zip(axes.flat, combos):
            for prov in sorted({r["provider"] for r in perf}):
                pts = sorted((r["n"], r["tflops"]) for r in perf if (r["dtype"], r["d"], r["mask"], r["dir"]) == combo
                             and r["provider"] == prov)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=prov, lw=2.5 if prov == "fasttfm" else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_title(" ".join(map(str, combo)), fontsize=9)
            ax.set_xlabel("seqlen")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=7)
        for ax in list(axes.flat)[len(combos):]:
            ax.axis("off")
        fig.suptitle(f"attention on {run.machine.get('gpu')} (B*N=16k, H*D=2048)")
        fig.tight_layout()
        fig.savefig(os.path.join(run.out, "attention.png"), dpi=80)
        plt.close(fig)
        made.append("attention.png")
    mem = [r for r in _perf(records) if r.get("section") == "membound" and r.get("frac_copy")]
    if mem:
        ops = sorted({(r["op"], r["dir"]) for r in mem})
        fig, axes = plt.subplots(1, len(ops), figsize=(3.6 * len(ops), 3.2), squeeze=False)
        for ax, (op, dr) in zip(axes.flat, ops):
            for prov in sorted({r["provider"] for r in mem}):
                for dt in sorted({r["dtype"] for r in mem}):
                    pts = sorted((r["cols"], 100 * r["frac_copy"]) for r in mem if (r["op"], r["dir"]) == (op, dr)
                                 and r["provider"] == prov and r["dtype"] == dt)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", ls="-" if prov == "fasttfm" else "--", label=f"{prov} {dt}")
            ax.set_xscale("log", base=2)
            ax.set_ylim(0, 110)
            ax.set_title(f"{op} {dr}", fontsize=9)
            ax.set_xlabel("row width")
            ax.set_ylabel("% of copy BW")
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(os.path.join(run.out, "memory_bound.png"), dpi=80)
        plt.close(fig)
        made.append("memory_bound.png")
    return made


def finish(run):
    """Write every output, print the compact table; exit status 0 unless something failed."""
    records = run.records()
    data = write_results(run)
    try:
        plots = _plots(run, records)
    except Exception as exc:  # noqa: BLE001 - a plot must not cost the run its report
        plots = [f"plots failed: {exc}"]
    m = run.machine
    phase_lines = ["| phase | status | seconds | budget s | note |", "|---|---|---|---|---|"]
    for name, p in run.phases.items():
        note = p.get("why") or (f"archs {p['archs']}" if name == "build" and p.get("archs") else "")
        phase_lines.append(f"| {name} | {p.get('status')} | {p.get('seconds', '-')} | {p.get('budget_s', '-')} | {note} |")
    counts = data["counts"]
    peaks = data["peaks"]
    summary = [
        f"# gpu-check on {m.get('gpu') or 'a machine without a GPU'}", "",
        f"Command: `{data['command']}`  ",
        f"Commit {m.get('commit')}{' (dirty tree)' if m.get('dirty') else ''}; python {m.get('python')}, "
        f"torch {m.get('torch')} (CUDA {m.get('cuda')}), triton {m.get('triton')}, numpy {m.get('numpy')}; "
        f"sm_{''.join(map(str, m.get('cc') or []))}, {m.get('sms')} SMs, {m.get('mem_gib')} GiB; {m.get('cpus')} CPUs; "
        f"nvidia-smi: {m.get('nvidia_smi')}  ",
        f"Wall time {data['elapsed_s']} s of a {run.budget_s:.0f} s budget; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
        "## Phases", "", "\n".join(phase_lines), "",
        f"Measured peaks: copy {peaks.get('copy_gbps') or float('nan'):.0f} GB/s (read + write), "
        f"bf16 8192^3 GEMM {peaks.get('gemm_tflops') or float('nan'):.0f} TFLOP/s", "",
        "## Targets (README) against this run", "", target_table(records), "",
        "## Correctness", "",
        f"tests (cuda parametrizations): {counts['tests']}; grid: {counts['grid']}; sanitizer: {counts['sanitizer']}",
        "", "Test failures:", _failures(records, "tests"), "", "Grid failures:", _failures(records, "grid"), "",
        "Sanitizer:", "\n".join(f"- {r.get('case')}: {r.get('status')} {r.get('summary') or r.get('why') or ''}"
                                for r in records if r.get("phase") == "sanitizer") or "not run", "",
        "## Attention (TFLOP/s, fwd+bwd counts 3.5x the forward FLOPs)", "", _attention_table(records), "",
        "## Memory-bound ops", "",
        _rows_table(records, "membound", ["op", "provider", "dtype", "rows", "cols", "dir", "ms", "gbps", "frac_copy"]),
        "", "## torch.compile", "",
        _rows_table(records, "compile", ["op", "provider", "dtype", "rows", "cols", "dir", "ms", "gbps", "frac_copy"]),
        "", "## Fused linear cross-entropy", "",
        _rows_table(records, "linear_ce", ["provider", "bt", "hidden", "vocab", "ms", "peak_mib", "tflops"]),
        "", "## Decode", "",
        _rows_table(records, "decode", ["provider", "batch", "cache", "ms", "tokens_per_s", "gbps"]),
        "", "## FlexAttention", "",
        _rows_table(records, "flex", ["provider", "mask", "dir", "n", "ms", "tflops"]),
        "", "Plots: " + ", ".join(plots),
    ]
    with open(os.path.join(run.out, "summary.md"), "w") as f:
        f.write("\n".join(summary) + "\n")
    failed_phases = [n for n, p in run.phases.items() if p.get("status") in ("failed", "timeout")]
    bad_checks = sum(counts[p].get("failed", 0) + counts[p].get("error", 0) for p in ("tests", "grid", "sanitizer"))
    print("\n" + "\n".join(phase_lines))
    print(f"\ntests {counts['tests']} | grid {counts['grid']} | sanitizer {counts['sanitizer']} | "
          f"copy {peaks.get('copy_gbps') or float('nan'):.0f} GB/s | gemm {peaks.get('gemm_tflops') or float('nan'):.0f} TFLOP/s")
    print("\n" + target_table(records))
    print(f"\nwritten: {run.out}/ (summary.md, results.json, records.jsonl, logs, plots)")
    if failed_phases or bad_checks:
        print(f"gpu-check: FAILED (phases {failed_phases}, {bad_checks} failed checks)")
        return 1
    print("gpu-check: no failures" + (" (GPU phases skipped: no GPU)" if not m.get("cc") else ""))
    return 0
