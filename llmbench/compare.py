"""`python -m llmbench.compare A B`: two result sets side by side, with B/A ratios per matching case.

Cases match on the parameters that say what was measured (model, dtype, batch size, input length, ...),
except those that tell the two sets apart: by default the parameters that take one value in A and another
in B (two backends, two devices, ...); `--by` names them instead. The commit and host never take part.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from llmbench.errors import UserError
from llmbench.placement import moved
from llmbench.printers import markdown_table
from llmbench.records import read_records
from llmbench.rows import CASE_PARAMETERS, PARAMETERS, complete_records, to_row, varying

COMPARED = ("first_token_ms", "next_token_ms", "p90_next_token_ms", "tokens_per_s", "peak_mem_gib")
SET_LABELS = ("git_commit", "device_name", "hostname")


def set_rows(path: Path) -> list[dict]:
    kept, _ = complete_records(read_records(path))
    if not kept:
        raise UserError(f"{path} holds no complete records")
    return [to_row(r) for r in kept]


def differing(a: list[dict], b: list[dict]) -> list[str]:
    """Parameters with no value in common between the two sets (what the comparison is about)."""
    return [c for c in CASE_PARAMETERS if not {str(r.get(c)) for r in a} & {str(r.get(c)) for r in b}]


def metric_columns(rows: list[dict]) -> list[str]:
    """The compared latency/throughput figures, then any accuracy metric (not its standard error)."""
    accuracy = [c for r in rows if r["mode"] == "accuracy" for c, v in r.items()
                if c not in PARAMETERS and isinstance(v, (int, float)) and "stderr" not in c]
    return [c for c in (*COMPARED, *dict.fromkeys(accuracy)) if any(r.get(c) is not None for r in rows)]


def not_valid(ra: dict, rb: dict) -> str | None:
    """'A', 'B' or 'A, B': the sides of a pair whose record is not valid (unknown validity is not 'not valid'); or
    'CPUs placed otherwise (A 62 ns, B 305 ns)' where the two were measured with the CPUs placed otherwise
    (llmbench.placement: a hypervisor that moves a guest's CPUs makes two machines of it)."""
    sides = [side for side, r in (("A", ra), ("B", rb)) if r.get("valid") is False]
    if sides:
        return f"{', '.join(sides)} not valid"
    a_ns, b_ns = ra.get("cpu_placement_ns"), rb.get("cpu_placement_ns")
    return f"CPUs placed otherwise (A {a_ns:.0f} ns, B {b_ns:.0f} ns)" if moved(a_ns, b_ns) else None


def compare(a: list[dict], b: list[dict], by: list[str] | None = None,
            valid_only: bool = False) -> tuple[list[dict], list[str], dict]:
    """-> (table rows, table columns, facts) with A, B and B/A for each metric of each matching case.
    A pair involving a record that is not valid is flagged; with `valid_only` its ratios are refused (left
    empty, out of the geometric mean)."""
    by = differing(a, b) if by is None else by
    unknown = [c for c in by if c not in CASE_PARAMETERS]
    if unknown:
        raise UserError(f"--by {','.join(unknown)} is not a case parameter: choose from {', '.join(CASE_PARAMETERS)}")
    keys = [c for c in CASE_PARAMETERS if c not in by]
    index_b = {tuple(str(r.get(k)) for k in keys): r for r in b}
    pairs = [(ra, index_b[key]) for ra in a if (key := tuple(str(ra.get(k)) for k in keys)) in index_b]
    if not pairs:
        raise UserError("no case of A matches one of B" + (f" (ignoring {', '.join(by)})" if by else "") +
                        ": pass --by with the parameters that differ between the two sets")
    shown_keys = varying([ra for ra, _ in pairs], keys) or ["model"]
    metrics = metric_columns([r for pair in pairs for r in pair])
    rows, columns = [], list(shown_keys)
    for m in metrics:
        columns += [f"{m} A", f"{m} B", f"{m} B/A"]
    flagged = refused = 0
    for ra, rb in pairs:
        row = {k: ra.get(k) for k in shown_keys}
        bad = not_valid(ra, rb)
        for m in metrics:
            va, vb = ra.get(m), rb.get(m)
            row[f"{m} A"], row[f"{m} B"] = va, vb
            row[f"{m} B/A"] = vb / va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va else None
            if bad and valid_only:
                row[f"{m} B/A"] = None
        if bad:
            flagged += 1
            refused += int(valid_only)
            row["validity"] = f"{'refused: ' if valid_only else ''}{bad}"
        rows.append(row)
    if flagged:
        columns.append("validity")
    if valid_only and refused == len(pairs):
        raise UserError(f"--valid-only: each of the {len(pairs)} matching cases involves a record that is not valid "
                        "(see the records' validity.reasons) or two placements of the CPUs: rerun them on a quiet "
                        "machine")
    geomean = {shown_keys[0]: "geomean"}
    for m in metrics:
        ratios = [r[f"{m} B/A"] for r in rows if r[f"{m} B/A"] and r[f"{m} B/A"] > 0]
        geomean[f"{m} B/A"] = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None
    if len(rows) > 1:
        rows.append(geomean)
    unknown = sum(ra.get("valid") is None or rb.get("valid") is None for ra, rb in pairs
                  if ra.get("mode") == "benchmark")
    facts = {"by": by, "matched": len(pairs), "only_a": len(a) - len(pairs),
             "only_b": len(b) - len({id(rb) for _, rb in pairs}), "not_valid": flagged, "refused": refused,
             "unknown_validity": unknown}
    return rows, columns, facts


def describe(rows: list[dict], by: list[str]) -> str:
    """What a set is: its values of the differing parameters, then its commit/device/host when single."""
    parts = []
    for c in (*by, *SET_LABELS):
        values = sorted({str(r.get(c)) for r in rows if r.get(c) is not None})
        if len(values) == 1:
            parts.append(f"{c}={values[0]}")
    return ", ".join(parts)


def validity_note(facts: dict) -> str:
    notes = []
    if facts["refused"]:
        notes.append(f"{facts['refused']} cases refused (--valid-only): a record of theirs is not valid, or the two "
                     "were measured with the CPUs placed otherwise")
    elif facts["not_valid"]:
        notes.append(f"{facts['not_valid']} cases involve a record that is not valid, or two records measured with "
                     "the CPUs placed otherwise by the hypervisor (column validity; docs/validity.md): their ratios "
                     "are unreliable; --valid-only refuses them")
    if facts["unknown_validity"]:
        notes.append(f"{facts['unknown_validity']} cases involve records of unknown validity (recorded before "
                     "validity was checked)")
    return "".join(f"\n\n{n}." for n in notes)


def render(path_a: Path, path_b: Path, by: list[str] | None, valid_only: bool = False) -> str:
    a, b = set_rows(path_a), set_rows(path_b)
    rows, columns, facts = compare(a, b, by, valid_only)
    digits = {c: 3 if c.endswith("B/A") else 2 for c in columns}
    lines = [f"A: {path_a} ({describe(a, facts['by'])})", "",
             f"B: {path_b} ({describe(b, facts['by'])})", "",
             markdown_table(rows, columns, digits), "",
             f"{facts['matched']} matching cases" + (f" (ignoring {', '.join(facts['by'])})" if facts["by"] else "") +
             f"; {facts['only_a']} only in A, {facts['only_b']} only in B. B/A < 1: B is lower (faster for latency, "
             "slower for tokens_per_s)." + validity_note(facts)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmbench.compare",
                                     description="Compare two result sets (JSONL files or run folders): B/A ratios.")
    parser.add_argument("a", type=Path, help="baseline results (file or folder)")
    parser.add_argument("b", type=Path, help="results compared against the baseline")
    parser.add_argument("--by", default=None,
                        help="comma-separated parameters that differ between A and B and are not matched "
                             "(e.g. backend, device, dtype); default: those with no value in common")
    parser.add_argument("--valid-only", action="store_true",
                        help="refuse the ratios of cases where a record is not valid (valid: false)")
    args = parser.parse_args(argv)
    by = [c.strip() for c in args.by.split(",") if c.strip()] if args.by is not None else None
    try:
        print(render(args.a, args.b, by, args.valid_only), end="")
    except UserError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
