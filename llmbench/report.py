"""`python -m llmbench.report RESULTS...`: records -> summary.md, summary.csv and PNG plots.

RESULTS are JSONL files or folders holding them (a sweep's run folder). Only complete records are
summarized; the table shows the parameters that vary between them, then the metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmbench.errors import UserError
from llmbench.printers import csv_text, markdown_table
from llmbench.results import read_records

# Parameters that tell runs apart, in table order: (column, where it is in a record).
PARAMETERS = ("mode", "model", "device", "device_name", "dtype", "woq", "backend", "world_size", "batch_size",
              "num_beams", "input_tokens", "max_new_tokens", "task", "filter", "limit", "num_iter", "num_warmup",
              "git_commit", "hostname")
# The parameters that say what was measured (not where, when or how often): cases match on these.
CASE_PARAMETERS = ("mode", "model", "device", "dtype", "woq", "backend", "world_size", "batch_size", "num_beams",
                   "input_tokens", "max_new_tokens", "task", "filter", "limit")
# Benchmark metrics: (column, key in record["metrics"], scale, decimals).
BENCH_METRICS = (
    ("first_token_ms", "first_token_latency_s", 1e3, 2),
    ("next_token_ms", "next_token_latency_s", 1e3, 2),
    ("p90_next_token_ms", "p90_next_token_latency_s", 1e3, 2),
    ("e2e_s", "e2e_latency_s", 1.0, 3),
    ("tokens_per_s", "throughput_tokens_per_s", 1.0, 2),
    ("weight_gb_s", "weight_bandwidth_gb_s", 1.0, 2),
    ("peak_mem_gib", "peak_memory_bytes", 1 / 2**30, 3),
)
BENCH_SOURCE_KEYS = {key for _, key, _, _ in BENCH_METRICS} | {"p50_next_token_latency_s", "p99_next_token_latency_s"}
SPREAD_SUFFIXES = ("_stddev_s", "_stddev_tokens_per_s", "_cv")  # in the records, not in the tables
DIGITS = {col: d for col, _, _, d in BENCH_METRICS}
NOT_SHOWN = ("precision", "validity_reasons")  # row keys for plots and notes, not table columns


def validity_of(record: dict) -> bool | None:
    """A benchmark record's `valid`; None (unknown) for accuracy records and records from before it existed."""
    value = record.get("valid")
    return value if isinstance(value, bool) and record.get("mode", "benchmark") == "benchmark" else None


def load_records(paths: list[Path]) -> list[dict]:
    """Every record of the given JSONL files and folders (a folder: its *.jsonl files, else any below it)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.jsonl")) or sorted(path.rglob("*.jsonl"))
            if not found:
                raise UserError(f"{path} holds no .jsonl results file")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path} does not exist: give JSONL results files or folders holding them")
    records = []
    for file in files:
        records += read_records(file)  # an unreadable line is reported on stderr with its file and number
    return records


def precision_of(record: dict) -> str | None:
    """Weight precision: 'int4-g32/bfloat16' when quantized (scheme/compute dtype), else the dtype."""
    woq = woq_of(record)
    dtype = record.get("dtype") or (record.get("config") or {}).get("dtype")
    if woq and woq != "none":
        return f"{woq}/{dtype}" if dtype else woq
    return dtype


def woq_of(record: dict) -> str | None:
    """'int4-g32' (scheme, group size, algorithm when not rtn); 'none' for a record that says it is not quantized."""
    quant = record.get("quantization")
    if isinstance(quant, dict):
        scheme = quant.get("scheme") or quant.get("woq") or quant.get("weight_dtype") or quant.get("bits")
        if scheme:
            group, algo = quant.get("group_size"), quant.get("algo")
            return f"{scheme}" + (f"-g{group}" if group else "") + (f"-{algo}" if algo and algo != "rtn" else "")
    if isinstance(quant, str) and quant:
        return quant
    config = record.get("config") or {}
    if config.get("woq"):
        return config["woq"]
    return "none" if "quantization" in record or config else None


def _flat_numbers(metrics: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_numbers(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def to_row(record: dict) -> dict:
    """One flat table row: parameters, then metrics in display units; missing keys stay None."""
    env = record.get("environment") or {}
    config = record.get("config") or {}
    task = record.get("task") or (config.get("acc_tasks") if record.get("mode") == "accuracy" else None)
    row = {
        "mode": record.get("mode", "benchmark"),
        "model": record.get("model") or config.get("model_id"),
        "device": record.get("device"),
        "device_name": env.get("device_name"),
        "dtype": record.get("dtype"),
        "woq": woq_of(record),
        "backend": record.get("backend"),
        "world_size": record.get("world_size", 1),
        "batch_size": record.get("batch_size"),
        "num_beams": record.get("num_beams"),
        "input_tokens": record.get("input_tokens"),
        "max_new_tokens": record.get("max_new_tokens"),
        "task": ",".join(task) if isinstance(task, list) else task,
        "filter": record.get("filter") if record.get("filter") != "none" else None,
        "limit": record.get("limit"),
        "num_iter": record.get("num_iter"),
        "num_warmup": record.get("num_warmup"),
        "git_commit": (env.get("git_commit") or "")[:12] or None,
        "hostname": env.get("hostname"),
    }
    if row["mode"] == "accuracy":
        for key in ("batch_size", "num_beams", "input_tokens", "max_new_tokens", "num_iter", "num_warmup"):
            row[key] = None  # not what an accuracy run varies
    row["valid"] = validity_of(record)
    row["validity_reasons"] = (record.get("validity") or {}).get("reasons") if row["valid"] is False else None
    metrics = record.get("metrics") or {}
    for col, key, scale, _ in BENCH_METRICS:
        value = metrics.get(key)
        row[col] = value * scale if isinstance(value, (int, float)) else None
    row.update({k: v for k, v in _flat_numbers(metrics).items()
                if k not in BENCH_SOURCE_KEYS and not k.endswith(SPREAD_SUFFIXES)})
    row["precision"] = precision_of(record)
    return row


def complete_records(records: list[dict]) -> tuple[list[dict], int]:
    """(complete records, the latest of each identical case, number left out as incomplete)."""
    kept: dict[tuple, dict] = {}
    incomplete = 0
    for record in records:
        if not record.get("complete", True):
            incomplete += 1
            continue
        row = to_row(record)
        kept[tuple(str(row[p]) for p in PARAMETERS)] = record
    return list(kept.values()), incomplete


def sort_key(row: dict) -> tuple:
    return tuple((row.get(p) is None, row.get(p) if isinstance(row.get(p), (int, float)) else str(row.get(p)))
                 for p in PARAMETERS)


def varying(rows: list[dict], columns: tuple[str, ...] | list[str]) -> list[str]:
    """The columns holding more than one known value (a missing value is not a different one)."""
    return [c for c in columns if len({json.dumps(r.get(c), default=str) for r in rows if r.get(c) is not None}) > 1]


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
    from llmbench.plots import write_plots

    records = load_records(paths)
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
