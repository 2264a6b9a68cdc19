"""Compare the reports of a run on ``sample_data/`` with the golden reports in ``tests/golden/``.

The golden reports are the sample studies' ``report.json`` with the fields that change on every run removed
(``generated_at``, ``timings_s``, ``software``, and ``study.input_hash``, which fingerprints the files' modification
times and so differs in every checkout). A refactoring must leave them identical; a change that is meant to
change a report (a new field, a new threshold) regenerates them on purpose and says so in its commit:

    modicscan run sample_data/ -o /tmp/out && python tests/report_compare.py /tmp/out            # compare
    modicscan run sample_data/ -o /tmp/out && python tests/report_compare.py /tmp/out --update   # regenerate
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden"
VOLATILE = ("generated_at", "timings_s", "software")  # differ on every run or machine, nothing else may


def normalise_report(report: dict) -> dict:
    """The report without its volatile fields."""
    out = {k: v for k, v in report.items() if k not in VOLATILE}
    if isinstance(out.get("study"), dict):
        out["study"] = {k: v for k, v in out["study"].items() if k != "input_hash"}
    return out


def differences(a, b, path: str = "", rel: float = 1e-6) -> list[str]:
    """Where two JSON values differ (numbers within ``rel`` relative tolerance count as equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in {'first' if k in a else 'second'}" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += differences(a[k], b[k], f"{path}.{k}", rel)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]", rel)]
    numeric = (int, float)
    if isinstance(a, numeric) and isinstance(b, numeric) and not isinstance(a, bool) and not isinstance(b, bool):
        return [] if math.isclose(a, b, rel_tol=rel, abs_tol=1e-12) else [f"{path}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def run_reports(out_dir: Path) -> dict[str, dict]:
    """key -> normalised report of every analysed study under ``out_dir``."""
    return {p.parent.name: normalise_report(json.loads(p.read_text())) for p in sorted(out_dir.glob("*/report.json"))}


def compare_with_golden(out_dir: Path) -> list[str]:
    """Every difference between the run's reports and the golden ones (empty: identical)."""
    got = run_reports(out_dir)
    want = {p.stem: json.loads(p.read_text()) for p in sorted(GOLDEN.glob("*.json"))}
    out = [f"{k}: missing from the run" for k in sorted(set(want) - set(got))]
    out += [f"{k}: not in the golden reports" for k in sorted(set(got) - set(want))]
    for k in sorted(set(want) & set(got)):
        out += [f"{k}{d}" for d in differences(want[k], got[k])]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path, help="output folder of `modicscan run sample_data/ -o OUT`")
    ap.add_argument("--update", action="store_true", help="replace the golden reports by this run's")
    a = ap.parse_args(argv)
    if a.update:
        GOLDEN.mkdir(exist_ok=True)
        for old in GOLDEN.glob("*.json"):
            old.unlink()
        for key, report in run_reports(a.out_dir).items():
            (GOLDEN / f"{key}.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        return 0
    diffs = compare_with_golden(a.out_dir)
    print("\n".join(diffs) if diffs else "identical")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
