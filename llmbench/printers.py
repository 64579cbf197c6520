"""Tables of rows (dicts) as markdown or CSV: the column list decides what is shown, in what order."""

from __future__ import annotations

import csv
import io
import math


def format_value(value, digits: int = 2) -> str:
    """Numbers for reading: fixed decimals for floats, as-is otherwise; missing values are empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != 0 and (abs(value) < 10 ** -digits or abs(value) >= 1e6):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str], digits: dict[str, int] | None = None) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    digits = digits or {}
    cells = [[format_value(r.get(c), digits.get(c, 2)).replace("|", "\\|") for c in columns] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns]
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def csv_text(rows: list[dict], columns: list[str]) -> str:
    """CSV with full-precision numbers (for spreadsheets and scripts)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
    return out.getvalue()
