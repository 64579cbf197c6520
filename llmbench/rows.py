"""Records -> flat table rows: the parameters that tell runs apart and the metrics in display units. The report,
its plots and compare all see records through these rows."""

from __future__ import annotations

import json

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
NOT_SHOWN = ("precision", "validity_reasons", "cpu_placement_ns")  # row keys for plots and notes, not table columns


def validity_of(record: dict) -> bool | None:
    """A benchmark record's `valid`; None (unknown) for accuracy records and records from before it existed."""
    value = record.get("valid")
    return value if isinstance(value, bool) and record.get("mode", "benchmark") == "benchmark" else None


def precision_of(record: dict) -> str | None:
    """Weight precision: 'int4-g32/bfloat16' when quantized (scheme/compute dtype), else the dtype."""
    woq = woq_of(record)
    dtype = record.get("dtype")
    if woq and woq != "none":
        return f"{woq}/{dtype}" if dtype else woq
    return dtype


def woq_of(record: dict) -> str | None:
    """'int4-g32' (scheme, group size, algorithm when not rtn); 'none' for a record that says it is not quantized."""
    quant = record.get("quantization")
    if isinstance(quant, dict) and quant.get("scheme"):
        group, algo = quant.get("group_size"), quant.get("algo")
        return quant["scheme"] + (f"-g{group}" if group else "") + (f"-{algo}" if algo and algo != "rtn" else "")
    return "none" if "quantization" in record else None


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
    row = {
        "mode": record.get("mode", "benchmark"),
        "model": record.get("model"),
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
        "task": record.get("task"),
        "filter": record.get("filter") if record.get("filter") != "none" else None,
        "limit": record.get("limit"),
        "num_iter": record.get("num_iter"),
        "num_warmup": record.get("num_warmup"),
        "git_commit": (env.get("git_commit") or "")[:12] or None,
        "hostname": env.get("hostname"),
    }
    if row["mode"] == "accuracy":
        row["batch_size"] = None  # lm-eval's batch size: it does not change the scores (no generation field is set)
    row["valid"] = validity_of(record)
    row["validity_reasons"] = (record.get("validity") or {}).get("reasons") if row["valid"] is False else None
    # where the CPUs sat after the measured iterations (llmbench.placement): records from two placements of a guest's
    # CPUs come from two machines
    row["cpu_placement_ns"] = ((record.get("validity") or {}).get("placement") or {}).get("after_ns")
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


