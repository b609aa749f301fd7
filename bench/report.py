"""Reports of the benchmark suite: the day's Markdown report with PNG plots, the README section, a summary.

    python -m rlhf_fast.bench.report [--out DIR]                 rebuild the newest report(s) from the JSON rows
    python -m rlhf_fast.bench.report --summary [--device cuda]   print the highlights and headline tables
    python -m rlhf_fast.bench.report --readme [README.md]        refresh the README's benchmark section

The driver (bench/suite.py) calls ``write_report`` at the end of every run: <out>/<date>-<device>.md,
built from all the rows of <out>/<date>-<device>-suite.json (the day's runs, newest measurement of
each key), with plots <out>/plots/<date>-<device>-<op>-<sweep>.png: time and peak memory against
the vocabulary or the token count, forward and forward+backward, one line per implementation.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


from . import harness
from .case import timed

CSV_FIELDS = (
    "timestamp", "date", "device", "device_name", "driver", "torch", "cuda", "triton", "python", "commit", "dirty",
    "cpu_threads", "load_avg_1m", "quick", "op", "dtype", "label", "tags", "impl", "mode", "status", "verified",
    "median_ms", "p10_ms", "p90_ms", "reps", "copies", "peak_mb", "bytes", "flops", "gbps", "tflops", "ceiling",
    "frac_ceiling", "copy_gbps", "flop_ceiling_tflops", "ratio_vs_eager", "ratio_vs_compile", "ratio_vs_eager-scan",
    "mem_vs_eager", "loss_math_ratio",
)  # fmt: skip
TITLES = {
    "logprobs": "token_logprobs (logp)",
    "logprobs_entropy": "token_logprobs with entropy",
    "policy_loss": "fused_policy_loss (GRPO loss from logits)",
    "linear_logprobs": "linear_token_logprobs (lm_head fused)",
    "linear_sft": "linear_sft_loss (lm_head fused)",
    "linear_policy_loss": "fused_linear_policy_loss (lm_head fused)",
    "gae": "gae",
    "ppo_advantages": "ppo_advantages (KL rewards + GAE + whitening)",
    "group_advantages": "group_advantages (GRPO)",
    "pairwise": "pairwise_reward_loss",
}
SWEEP_AXIS = {"sweep-vocab": ("V", "vocabulary V"), "sweep-tokens": (None, "tokens")}
README_BEGIN, README_END = "<!-- bench-suite:begin -->", "<!-- bench-suite:end -->"


# --------------------------------------------------------------------------- rows


def suite_files(out_dir: Path | str) -> list[Path]:
    return sorted(Path(out_dir).glob("*-suite.json"))


def day_rows(out_dir: Path | str, device_name: str, date: str) -> list[dict]:
    path = harness.results_path(out_dir, "suite", device_name, date)
    return harness.load_rows([path]) if path.is_file() else []


def latest_days(out_dir: Path | str) -> dict[str, tuple[str, str, list[dict]]]:
    """device type -> (device name, date, rows) of the newest suite results file of that device type."""
    newest: dict[str, tuple[str, str, str, list[dict]]] = {}
    for path in suite_files(out_dir):
        rows = harness.load_rows([path])
        if not rows:
            continue
        stamp = max(r["timestamp"] for r in rows)
        kind = rows[0]["device"]
        if kind not in newest or stamp > newest[kind][0]:
            newest[kind] = (stamp, rows[0]["device_name"], rows[0]["date"], rows)
    return {kind: value[1:] for kind, value in newest.items()}


def _impl_rank(r: dict) -> tuple:
    name = r["impl"]
    if name == "eager":
        rank = 0
    elif name.startswith("eager"):
        rank = 1
    elif name.startswith("compile"):
        rank = 2
    elif r.get("ours"):
        rank = 3
    else:
        rank = 4
    return rank, name, r["mode"] != "fwd"


def cases_of(rows: list[dict], op: str) -> list[tuple[str, str, list[dict]]]:
    """(label, dtype, rows) per case of ``op``, headline first, then by size."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["op"] == op:
            groups.setdefault((r["label"], r["dtype"]), []).append(r)

    def key(item):
        (label, dtype), rs = item
        size = 1
        for v in rs[0]["shape"]:
            size *= v
        return "headline" not in rs[0].get("tags", []), size

    return [(label, dtype, sorted(rs, key=_impl_rank)) for (label, dtype), rs in sorted(groups.items(), key=key)]


def ops_in(rows: list[dict]) -> list[str]:
    present = {r["op"] for r in rows}
    return [op for op in TITLES if op in present] + sorted(present - set(TITLES))


# --------------------------------------------------------------------------- tables


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%" if value >= 0.1 else f"{100 * value:.2g}%"


def _rate(r: dict) -> str:
    if r.get("tflops"):
        return f"{r['tflops']:.2f} TFLOP/s"
    gbps = r.get("gbps")
    return "-" if gbps is None else f"{gbps:.3g} GB/s"


def _status(r: dict, limit: int = 48) -> str:
    text = r["status"]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def case_table(rows: list[dict]) -> str:
    ratio_keys = sorted({k for r in rows for k in r if k.startswith("ratio_vs_") and r.get(k) is not None},
                        key=lambda k: (k != "ratio_vs_eager", k))  # fmt: skip
    columns = [
        ("impl", lambda r: r["impl"]),
        ("mode", lambda r: r["mode"]),
        ("median ms", lambda r: harness.fmt(r.get("median_ms"), ".4g")),
        ("p10-p90 ms", lambda r: "-" if r.get("p10_ms") is None else f"{r['p10_ms']:.4g}-{r['p90_ms']:.4g}"),
    ]
    columns += [(f"x {k.removeprefix('ratio_vs_')}", lambda r, k=k: harness.fmt(r.get(k), ".2f")) for k in ratio_keys]
    columns += [
        ("rate", _rate),
        ("of ceiling", lambda r: _pct(r.get("frac_ceiling"))),
        ("peak MiB", lambda r: harness.fmt(r.get("peak_mb"), ".4g")),
        ("mem / eager", lambda r: harness.fmt(r.get("mem_vs_eager"), ".2f")),
        ("status", _status),
    ]
    shown = [r for r in rows if not r["status"].startswith("skipped")]
    table = harness.markdown_table(shown, columns) if shown else "(no implementation ran)"
    notes = dict.fromkeys(f"{r['impl']}: {r['status']}" for r in rows if r["status"] != "ok")
    return "\n".join([table] + ([""] + [f"- {n}" for n in notes] if notes else []))


def case_heading(label: str, dtype: str, rows: list[dict]) -> str:
    dims = rows[0].get("dims") or {}
    text = ", ".join(f"{k}={v}" for k, v in dims.items()) or label
    tags = [t for t in rows[0].get("tags", []) if t]
    return f"### [{text}] {dtype}" + (f" ({', '.join(tags)})" if tags else "")


# --------------------------------------------------------------------------- highlights


def _headline(rows: list[dict], op: str) -> list[dict]:
    for label, dtype, rs in cases_of(rows, op):
        if "headline" in rs[0].get("tags", []):
            return rs
    return []


def _get(rs: list[dict], impl: str, mode: str) -> dict | None:
    return next((r for r in rs if r["impl"] == impl and r["mode"] == mode and timed(r)), None)


def highlights(rows: list[dict]) -> list[str]:
    """One line per op: its fastest verified implementation of ours at the headline case, and
    issue 3's two comparisons (GAE against the loop; the policy loss against token_logprobs)."""
    lines = []
    for op in ops_in(rows):
        rs = _headline(rows, op)
        if not rs:
            continue
        shape = ", ".join(f"{k}={v}" for k, v in (rs[0].get("dims") or {}).items())
        for mode in ("fwd+bwd", "fwd"):
            ours = [r for r in rs if r["mode"] == mode and r.get("ours") and r["status"] == "ok" and r.get("median_ms")
                    and not r["impl"].startswith("token_logprobs/") and not r.get("variant")]  # fmt: skip
            if ours:
                break
        if not ours:
            continue
        best = min(ours, key=lambda r: r["median_ms"])
        parts = [f"{best['impl']} {best['median_ms']:.4g} ms"]
        ratios = [k for k in best if k.startswith("ratio_vs_") and best.get(k)]
        for key in sorted(ratios, key=lambda k: (k != "ratio_vs_eager", k)):
            parts.append(f"{best[key]:.2f}x {key.removeprefix('ratio_vs_')}")
        if best.get("mem_vs_eager") is not None:
            parts.append(f"peak memory {best['mem_vs_eager']:.2f}x eager's")
        if best.get("frac_ceiling") is not None:
            parts.append(f"{_pct(best['frac_ceiling'])} of the {best.get('ceiling', '')} ceiling")
        if best.get("loss_math_ratio"):
            parts.append(f"{best['loss_math_ratio']:.2f}x token_logprobs alone")
        lines.append(f"- **{op}** [{shape}] {rs[0]['dtype']}, {mode}: " + ", ".join(parts))
    for impl in sorted({r["impl"] for r in _headline(rows, "gae") if r.get("ours")}):
        rs = _headline(rows, "gae")
        cells = []
        for mode in ("fwd", "fwd+bwd"):
            r = _get(rs, impl, mode)
            if r and r["status"] == "ok":
                cells.append(f"{mode} {harness.fmt(r.get('ratio_vs_eager'), '.1f')}x the Python loop, "
                             f"{harness.fmt(r.get('ratio_vs_eager-scan'), '.1f')}x the vectorised scan, "
                             f"{harness.fmt(r.get('ratio_vs_eager-blocked'), '.1f')}x the blocked matmul form")  # fmt: skip
        if cells:
            lines.append(f"- gae {impl}: " + "; ".join(cells) + " (issue 3 target: >= 50x the loop)")
    return lines


def objectives_table(rows: list[dict]) -> str:
    """Issue 15's target, per objective of fused_policy_loss (bench_policy_loss.py): forward +
    backward over token_logprobs' with entropy, same backend and shape, at most 1.1x for an
    objective separable per token and 1.3x for one coupled across the sequence. "meets" is set on
    a GPU only (the target is a GPU one); "x eager" is against the same objective's eager PyTorch."""
    shown = [r for r in rows if r["op"] == "policy_loss" and r["mode"] == "fwd+bwd" and r.get("target_ratio")
             and not r["status"].startswith("skipped")]  # fmt: skip
    if not shown:
        return "(no per-objective rows)"
    shown.sort(key=lambda r: (r["label"], r.get("variant") or "", r["impl"]))

    def meets(r):
        return "-" if r.get("meets_target") is None else "yes" if r["meets_target"] else "NO"

    columns = [
        ("shape", lambda r: r["label"]),
        ("objective", lambda r: r.get("variant") or f"{r.get('objective', '?')} (base)"),
        ("separable", lambda r: "yes" if r.get("separable") else "no"),
        ("impl", lambda r: r["impl"].rpartition("/")[2]),
        ("fwd+bwd ms", lambda r: harness.fmt(r.get("median_ms"), ".4g")),
        ("x eager", lambda r: harness.fmt(r.get("ratio_vs_eager"), ".2f")),
        ("x token_logprobs", lambda r: harness.fmt(r.get("loss_math_ratio"), ".2f")),
        ("target", lambda r: f"<= {r['target_ratio']:g}"),
        ("meets", meets),
        ("status", _status),
    ]
    return harness.markdown_table(shown, columns)


# --------------------------------------------------------------------------- plots


def sweep_points(rows: list[dict], op: str, sweep: str):
    """{impl: {mode: [(x, median_ms, peak_mb)]}} over the cases of ``op`` tagged ``sweep``."""
    axis = SWEEP_AXIS[sweep][0]
    lines: dict[str, dict[str, list]] = {}
    for r in rows:
        if r["op"] != op or sweep not in r.get("tags", []) or not timed(r):
            continue
        dims = r.get("dims") or {}
        x = dims.get(axis) if axis else dims.get("N", dims.get("T"))
        if x is None and not axis and "B" in dims and "T" in dims and "V" in dims:
            x = dims["B"] * dims["T"]
        if x is None:
            continue
        lines.setdefault(r["impl"], {}).setdefault(r["mode"], []).append((x, r["median_ms"], r.get("peak_mb")))
    return lines


def _tick(value: int) -> str:
    """32000 -> '32k', 151936 -> '152k', 512 -> '512'."""
    return f"{value / 1000:.0f}k" if value >= 10000 else str(value)


def plot_sweep(rows: list[dict], op: str, sweep: str, path: Path, title: str) -> Path | None:
    """2 x 2 panels (forward, forward + backward) x (time, peak memory); None when the sweep has < 2 points."""
    lines = sweep_points(rows, op, sweep)
    if not any(len({p[0] for p in pts}) >= 2 for modes in lines.values() for pts in modes.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("fwd", "fwd+bwd") if any(m in modes for modes in lines.values())]
    fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.6 * len(modes)), squeeze=False)
    styles = ["o-", "s-", "^-", "D-", "v-", "P-", "X-", "*-", "h-", "<-", ">-"]
    for i, mode in enumerate(modes):
        for k, (impl, by_mode) in enumerate(sorted(lines.items())):
            pts = sorted(by_mode.get(mode, []))
            if not pts:
                continue
            xs = [p[0] for p in pts]
            axes[i][0].plot(xs, [p[1] for p in pts], styles[k % len(styles)], label=impl, markersize=4)
            mem = [(p[0], p[2]) for p in pts if isinstance(p[2], (int, float))]
            if mem:
                axes[i][1].plot([m[0] for m in mem], [m[1] for m in mem], styles[k % len(styles)], label=impl,
                                markersize=5, alpha=0.85)  # fmt: skip
        ticks = sorted({p[0] for by_mode in lines.values() for p in by_mode.get(mode, [])})
        for j, ylabel in enumerate(("median time (ms), log scale", "peak memory beyond the inputs (MiB)")):
            ax = axes[i][j]
            ax.set_xscale("log")
            ax.set_xticks(ticks, [_tick(t) for t in ticks])
            ax.minorticks_off()
            if j == 0:
                ax.set_yscale("log")
            else:
                ax.set_ylim(bottom=0)  # linear: an implementation that allocates nothing sits on 0
            ax.set_xlabel(SWEEP_AXIS[sweep][1])
            ax.set_ylabel(ylabel)
            ax.set_title(mode, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        axes[i][0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fixed_dims(rows: list[dict], op: str, sweep: str) -> str:
    axis = SWEEP_AXIS[sweep][0]
    dims = [r.get("dims") or {} for r in rows if r["op"] == op and sweep in r.get("tags", [])]
    fixed = {k: v for k, v in (dims[0] if dims else {}).items() if k != axis and all(d.get(k) == v for d in dims)}
    if not axis:
        dropped = ("N", "T", "B") if "V" in fixed else ("T",)  # the token count varies along the sweep
        fixed = {k: v for k, v in fixed.items() if k not in dropped}
    return ", ".join(f"{k}={v}" for k, v in fixed.items())


# --------------------------------------------------------------------------- the report


def environment_line(rows: list[dict]) -> str:
    r = max(rows, key=lambda r: r["timestamp"])
    commit = r["commit"] + ("-dirty" if r.get("dirty") else "")
    parts = [f"**{r['device_name']}** ({r['device']})"]
    if r.get("driver"):
        parts.append(f"driver {r['driver']}")
    parts.append(f"torch {r['torch']}" + (f" (CUDA {r['cuda']})" if r.get("cuda") else ""))
    parts += [f"triton {r['triton']}", f"Python {r['python']}", f"commit {commit}"]
    if r["device"] == "cpu":
        parts.append(f"{r['cpu_threads']} threads, load {harness.fmt(r.get('load_avg_1m'), '.1f')} at the start")
    if r.get("copy_gbps"):
        parts.append(f"copy bandwidth {r['copy_gbps']:.1f} GB/s")
    runs = sorted({(x["timestamp"], "quick" if x.get("quick") else "full") for x in rows})
    text = " · ".join(parts) + "\n\nRuns merged here: " + ", ".join(f"{t} ({kind})" for t, kind in runs)
    if r["device"] == "cpu" and (r.get("load_avg_1m") or 0) > (r.get("cpu_threads") or 1):
        text += ("\n\nThe load exceeded the thread count: other work shared these cores, so absolute times and "
                 "spreads carry its noise; the ratios between implementations of one case are the figures to "
                 "read (on a CPU they are timed in turn, round after round, so the load falls on all alike).")  # fmt: skip
    return text


HOW_TO_READ = """\
How to read: *median ms* is the median over the timed runs, *p10-p90* their spread; *x eager*
= eager PyTorch's median / this median in the same run (> 1 is faster; *x compile*, *x eager-scan*
alike); *rate* is the bytes the op must move (or, for the lm_head ops, the FLOPs it must do) over
the median, and *of ceiling* sets it against the measured copy bandwidth (or matmul rate) of the
device; *peak MiB* is memory allocated beyond the inputs. *ok*: verified against the float64
oracle before timing; *inexact*: a baseline or peer out of tolerance (timed, flagged); *FAILED*:
one of ours out of tolerance or crashing (not timed); *skipped*: not installed or not served
here, with the reason."""


def report_markdown(rows: list[dict], plots: dict[tuple[str, str], Path], base: Path) -> str:
    first = rows[0]
    lines = [f"# rlhf_fast benchmark suite: {first['device_name']}, {first['date']}", "", environment_line(rows), "",
             HOW_TO_READ, ""]  # fmt: skip
    hl = highlights(rows)
    if hl:
        lines += ["## Highlights (headline shapes)", ""] + hl + [""]
    for op in ops_in(rows):
        lines += [f"## {op}: {TITLES.get(op, op)}", ""]
        for label, dtype, rs in cases_of(rows, op):
            lines += [case_heading(label, dtype, rs), "", case_table(rs), ""]
        if op == "policy_loss" and any(r.get("variant") for r in rows):
            lines += ["### Per objective: fwd+bwd over token_logprobs (issue 15's target)", "", objectives_table(rows), ""]
        for sweep in SWEEP_AXIS:
            if (op, sweep) in plots:
                rel = plots[op, sweep].relative_to(base).as_posix()
                lines += [f"![{op} vs {SWEEP_AXIS[sweep][1]}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(out_dir: Path | str, device_name: str, date: str) -> Path:
    """Rebuild <out>/<date>-<device>.md and its plots from the day's suite rows; returns the report's path."""
    out_dir = Path(out_dir)
    rows = day_rows(out_dir, device_name, date)
    slug = harness.device_slug(device_name)
    plots = {}
    for op in ops_in(rows):
        for sweep in SWEEP_AXIS:
            fixed = _fixed_dims(rows, op, sweep)
            title = f"{op} vs {SWEEP_AXIS[sweep][1]} ({fixed}; {rows[0]['device_name']}, {date})"
            path = plot_sweep(rows, op, sweep, out_dir / "plots" / f"{date}-{slug}-{op}-{sweep}.png", title)
            if path is not None:
                plots[op, sweep] = path
    report = out_dir / f"{date}-{slug}.md"
    report.write_text(report_markdown(rows, plots, out_dir) if rows else f"# no suite rows for {device_name} on {date}\n")
    return report


# --------------------------------------------------------------------------- README and summary


PEERS = ("liger", "cce", "trl")  # impl-name prefixes of the other libraries' rows


def compact_table(rows: list[dict]) -> str:
    """Headline case of every op: eager, the other PyTorch baselines, the peers and ours; fwd and fwd+bwd side by side."""
    out = []
    for op in ops_in(rows):
        rs = _headline(rows, op)
        impls = []
        for r in rs:
            keep = r["impl"] == "eager" or r["impl"].startswith(("eager-", "compile") + PEERS) or r.get("ours")
            if (keep and timed(r) and r["impl"] not in impls and not r["impl"].startswith("token_logprobs/")
                    and not r.get("variant")):  # fmt: skip
                impls.append(r["impl"])
        for impl in impls:
            fwd, both = _get(rs, impl, "fwd"), _get(rs, impl, "fwd+bwd")
            main = both or fwd
            out.append({
                "op": op, "shape": "x".join(map(str, rs[0]["shape"])), "dtype": rs[0]["dtype"], "impl": impl,
                "fwd": harness.fmt(fwd["median_ms"], ".4g") if fwd else "-",
                "x fwd": harness.fmt(fwd.get("ratio_vs_eager"), ".2f") if fwd else "-",
                "both": harness.fmt(both["median_ms"], ".4g") if both else "-",
                "x both": harness.fmt(both.get("ratio_vs_eager"), ".2f") if both else "-",
                "mem": harness.fmt(main.get("peak_mb"), ".4g"),
                "ceil": _pct(main.get("frac_ceiling")),
                "status": "ok" if main["status"] == "ok" else "inexact",
            })  # fmt: skip
    columns = [("op", lambda r: r["op"]), ("shape", lambda r: r["shape"]), ("dtype", lambda r: r["dtype"]),
               ("impl", lambda r: r["impl"]), ("fwd ms", lambda r: r["fwd"]), ("x eager", lambda r: r["x fwd"]),
               ("fwd+bwd ms", lambda r: r["both"]), ("x eager", lambda r: r["x both"]),
               ("peak MiB", lambda r: r["mem"]), ("of ceiling", lambda r: r["ceil"]),
               ("check", lambda r: r["status"])]  # fmt: skip
    note = "Peak memory and the fraction of the device ceiling are those of fwd+bwd (fwd where there is no backward)."
    return harness.markdown_table(out, columns) + "\n\n" + note if out else "(no rows)"


def readme_section(results_dir: Path | str, readme_dir: Path | str) -> str:
    results_dir, readme_dir = Path(results_dir), Path(readme_dir)
    latest = latest_days(results_dir)
    parts = []
    for kind, label in (("cuda", "GPU"), ("cpu", "CPU")):
        if kind not in latest:
            if kind == "cuda":
                parts.append("**GPU**: no GPU measurement yet (`bash bench/gpu_check.sh` on a CUDA machine).")
            continue
        name, date, rows = latest[kind]
        slug = harness.device_slug(name)
        report = results_dir / f"{date}-{slug}.md"
        link = report.relative_to(readme_dir).as_posix() if report.is_relative_to(readme_dir) else str(report)
        quick = " (quick run)" if all(r.get("quick") for r in rows) else ""
        block = [f"**{label}: {name}, {date}**{quick}; full tables: [{report.name}]({link})", "", compact_table(rows)]
        for plot in sorted((results_dir / "plots").glob(f"{date}-{slug}-logprobs-sweep-*.png")):
            rel = plot.relative_to(readme_dir).as_posix() if plot.is_relative_to(readme_dir) else str(plot)
            block += ["", f"![{label} token_logprobs, {plot.stem.rsplit('-', 1)[-1]} sweep, {name}, {date}]({rel})"]
        parts.append("\n".join(block))
    return "\n\n".join(parts)


def update_readme(readme: Path | str, results_dir: Path | str) -> bool:
    """Replace the text between the README's bench-suite markers; False when the markers are missing."""
    readme = Path(readme)
    text = readme.read_text()
    pattern = re.compile(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        return False
    section = readme_section(results_dir, readme.parent)
    readme.write_text(pattern.sub(lambda m: f"{README_BEGIN}\n{section}\n{README_END}", text))
    return True


def summary(results_dir: Path | str, device: str | None = None) -> str:
    out = []
    for kind, (name, date, rows) in sorted(latest_days(results_dir).items()):
        if device and kind != device:
            continue
        out += [f"## suite summary: {name}, {date}", ""] + highlights(rows) + ["", compact_table(rows), ""]
        if any(r.get("variant") for r in rows):
            out += ["### policy_loss per objective: fwd+bwd over token_logprobs (issue 15's target)", "",
                    objectives_table(rows), ""]  # fmt: skip
        bad = [r for r in rows if r["status"].startswith(("FAILED", "OOM"))]
        out += [f"- {r['op']} {r['label']} {r['impl']} {r['mode']}: {r['status']}" for r in bad]
    return "\n".join(out) if out else f"no suite results in {results_dir}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(harness.RESULTS_DIR), help="results directory (default bench/results)")
    p.add_argument("--summary", action="store_true", help="print highlights and headline tables of the newest runs")
    p.add_argument("--device", choices=("cpu", "cuda"), help="--summary: this device type only")
    p.add_argument("--readme", nargs="?", const=str(harness.REPO_ROOT / "README.md"), help="refresh this README's section")
    args = p.parse_args(argv)
    if args.summary:
        print(summary(args.out, args.device))
        return 0
    if args.readme:
        if not update_readme(args.readme, args.out):
            raise SystemExit(f"{args.readme} has no {README_BEGIN} ... {README_END} markers")
        print(f"updated {args.readme}")
        return 0
    for kind, (name, date, _) in latest_days(args.out).items():
        print(write_report(args.out, name, date))
    return 0


if __name__ == "__main__":
    sys.exit(main())
