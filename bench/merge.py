"""Merge benchmark rows measured elsewhere (gpu_check.sh's tarball) into bench/results.

    python -m rlhf_fast.bench.merge DIR [DIR ...] [--out bench/results] [--commit SHA] [--no-readme]

Each DIR holds result files as a run writes them (<date>-<device>-suite.json, ...-rl_step.json).
Their rows join the day's rows in --out (same key: replaced, as a new run's would be), suite rows
are appended to suite.csv, the day's reports and plots are rebuilt, then the README's tables.
--commit overrides the rows' commit (and marks them clean): for rows from a copied tree whose
commit the run could not read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from . import bench_rl_step, harness, report, suite

KEYS = {suite.BENCH: suite.KEY_FIELDS, bench_rl_step.BENCH: bench_rl_step.KEY_FIELDS}


def merge(src: Path, out: Path, commit: str | None = None) -> set[tuple[str, str]]:
    """Merge the rows of ``src`` into ``out``; returns the (device name, date) of the suite rows merged."""
    days = set()
    for bench, key_fields in KEYS.items():
        for path in sorted(src.glob(f"*-{bench}.json")):
            rows = harness.load_rows([path])
            if not rows:
                continue
            if commit:
                for r in rows:
                    r["commit"], r["dirty"] = commit, False
            harness.write_results(rows, out, bench=bench, key_fields=key_fields)
            print(f"merged {len(rows)} rows of {path}")
            if bench == suite.BENCH:
                harness.append_csv(rows, out / "suite.csv", report.CSV_FIELDS)
                days |= {(r["device_name"], r["date"]) for r in rows}
    return days


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="directories of result files")
    p.add_argument("--out", type=Path, default=harness.RESULTS_DIR, help="results directory (default bench/results)")
    p.add_argument("--commit", help="commit to record in the merged rows")
    p.add_argument("--no-readme", action="store_true", help="leave the README's tables as they are")
    args = p.parse_args(argv)
    days = set()
    for src in args.dirs:
        days |= merge(src, args.out, args.commit)
    for name, date in sorted(days):
        print(report.write_report(args.out, name, date))
    if not args.no_readme and days:
        readme = harness.REPO_ROOT / "README.md"
        if report.update_readme(readme, args.out):
            print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
