"""Print a retrieval comparison table from ``python -m distill.evaluate --out`` result JSONs.

    python examples/compare.py OUT/results/teacher.json OUT/results/student.json [...]

One row per file (labelled by the file name without ``.json``) with the metrics of the first file
(Recall@1/5/10 in both directions and RSUM), each row's RSUM relative to the first row (the
reference, normally the teacher) and the number of test images. Exits with status 2, naming the
file, when one is missing or malformed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence


class ResultError(ValueError):
    """An evaluation JSON is missing, unreadable or lacks a metric."""


def load_result(path: Path, columns: Sequence[str] = ("rsum",)) -> dict[str, Any]:
    """Read one evaluation JSON; :class:`ResultError` naming the file if a metric of ``columns`` is missing."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ResultError(f"cannot read evaluation result {path}: {e}") from e
    metrics = result.get("metrics") if isinstance(result, dict) else None
    missing = [k for k in columns if not isinstance(metrics, dict) or k not in metrics]
    if missing:
        raise ResultError(f"{path} is not a distill.evaluate result (missing metrics {missing})")
    return result


def format_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Header, separator and one line per ``(label, result)``: the first row's metrics in its order
    (``i2t_R@1`` ... ``rsum``), RSUM relative to the first row, and the number of test images."""
    columns = list(rows[0][1]["metrics"])
    width = max(12, *(len(label) for label, _ in rows))
    head = f"{'model':<{width}}" + "".join(f"{c:>10}" for c in columns) + f"{'rsum %':>9}{'images':>8}"
    lines = [head, "-" * len(head)]
    ref = rows[0][1]["metrics"]["rsum"]
    for label, result in rows:
        m = result["metrics"]
        rel = f"{100.0 * m['rsum'] / ref:>9.1f}" if ref else f"{'n/a':>9}"
        lines.append(f"{label:<{width}}" + "".join(f"{m[c]:>10.2f}" for c in columns)
                     + rel + f"{result.get('num_images', ''):>8}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="evaluation JSONs; the first one is the reference")
    args = ap.parse_args(argv)
    try:
        columns = list(load_result(args.results[0])["metrics"])
        rows = [(p.name.removesuffix(".json"), load_result(p, columns)) for p in args.results]
    except ResultError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    table = format_table(rows)
    print(table)
    return table


if __name__ == "__main__":
    main()
