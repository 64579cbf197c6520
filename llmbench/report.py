"""`python -m llmbench.report RESULTS...`: records -> summary.md, summary.csv and PNG plots.

RESULTS are JSONL files or folders holding them (a sweep's run folder). Only complete records are
summarized; the table shows the parameters that vary between them, then the metrics.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmbench.errors import UserError
from llmbench.plots import write_plots
from llmbench.printers import csv_text, markdown_table
from llmbench.records import read_records
from llmbench.rows import DIGITS, NOT_SHOWN, PARAMETERS, complete_records, sort_key, to_row, varying


def summary_table(rows: list[dict]) -> tuple[list[str], list[str]]:
    """(columns to show, parameters that are the same in every row)."""
    shown = varying(rows, PARAMETERS) or ["model"]
    metric_cols = [c for c in rows[0] if c not in PARAMETERS and c not in NOT_SHOWN] if rows else []
    for r in rows[1:]:
        metric_cols += [c for c in r if c not in PARAMETERS and c not in NOT_SHOWN and c not in metric_cols]
    metric_cols = [c for c in metric_cols if any(r.get(c) is not None for r in rows)]
    constant = [c for c in PARAMETERS if c not in shown and any(r.get(c) is not None for r in rows)]
    return shown + metric_cols, constant


def validity_notes(rows: list[dict], columns: list[str]) -> str:
    """Under a table: the runs marked valid=false and why, and how many predate validity (blank)."""
    if not any(r.get("valid") is not None for r in rows):
        return ""
    shown = [c for c in columns if c in PARAMETERS]
    lines = []
    for r in rows:
        if r.get("valid") is False:
            case = " ".join(f"{c}={r.get(c)}" for c in shown)
            lines.append(f"- NOT VALID, figures unreliable: {case}: {'; '.join(r.get('validity_reasons') or [])}")
    unknown = sum(r.get("valid") is None for r in rows)
    if unknown:
        lines.append(f"- {unknown} runs of unknown validity (recorded before validity was checked): valid is blank")
    return "\n" + "\n".join(lines) + "\n" if lines else ""


def render_tables(records: list[dict]) -> tuple[str, str, list[dict]]:
    """-> (markdown, csv, rows) for the complete records: one markdown table per mode, one CSV."""
    kept, incomplete = complete_records(records)
    if not kept:
        raise UserError(f"no complete records among {len(records)} ({incomplete} incomplete): nothing to summarize")
    rows = sorted((to_row(r) for r in kept), key=sort_key)
    modes = sorted({r["mode"] for r in rows}, key=lambda m: (m != "benchmark", m))
    sections, csv_columns = [], ["mode"] if len(modes) > 1 else []
    for mode in modes:
        part = [r for r in rows if r["mode"] == mode]
        columns, constant = summary_table(part)
        csv_columns += [c for c in columns if c not in csv_columns]
        known = ", ".join(f"{c}={next(r[c] for r in part if r.get(c) is not None)}" for c in constant if c != "mode")
        title = f"## {mode.capitalize()}\n\n" if len(modes) > 1 else ""
        sections.append(f"{title}{markdown_table(part, columns, DIGITS)}\n\n"
                        f"{len(part)} runs. Same in every run: {known or 'nothing'}.\n{validity_notes(part, columns)}")
    if incomplete:
        sections.append(f"{incomplete} incomplete records (interrupted runs) left out.\n")
    csv_columns = [c for c in PARAMETERS if c in csv_columns] + [c for c in csv_columns if c not in PARAMETERS]
    return "\n".join(sections), csv_text(rows, csv_columns), rows


def write_report(paths: list[Path], out: Path) -> str:
    """Write summary.md, summary.csv and the plots to `out`; returns the markdown."""
    records = read_records(paths)
    md, csv, _ = render_tables(records)
    out.mkdir(parents=True, exist_ok=True)
    kept, _ = complete_records(records)
    pngs = write_plots(kept, out)
    md += "".join(f"\n![{p.stem}]({p.name})\n" for p in pngs)
    (out / "summary.md").write_text(md, encoding="utf-8")
    (out / "summary.csv").write_text(csv, encoding="utf-8")
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmbench.report",
                                     description="Summary table (markdown, CSV) and PNG plots of benchmark records.")
    parser.add_argument("results", nargs="+", type=Path, help="JSONL results files or folders holding them")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: the first RESULTS folder, or the folder of the first file)")
    args = parser.parse_args(argv)
    first = args.results[0]
    out = args.out or (first if first.is_dir() else first.parent)
    try:
        md = write_report(args.results, out)
    except UserError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(md)
    print(f"Written to {out}: summary.md, summary.csv and the PNG plots", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
