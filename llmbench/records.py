"""The record: one JSON line per run (benchmark) or per task and filter (accuracy), its fields, and the one reader.

What was asked and what ran are named apart: `config` holds the settings as requested (RunConfig.to_record(): the
flags, with None where a default is chosen at run time), the top level what ran (the resolved device and dtype, the
prompt length actually measured, the quantization applied). Readers take the top level, except to match a request
(a sweep resuming: `requested`).

Version history (readers accept every version up to RECORD_VERSION; a record without one is version 1):
  1  the first published format.
  2  adds `backend_overrides`; `config` gains `compile_mode`.

This module needs neither torch nor transformers: report, compare and the sweeps read records without them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, TypedDict

from llmbench.errors import UserError

RECORD_VERSION = 2
_reported: set[tuple[str, int]] = set()  # each unreadable line is reported once per process


class Iteration(TypedDict):
    e2e_latency_s: float
    generated_tokens: int
    token_latencies_s: list[float]  # first token, then each next token (empty without --token-latency)


class Record(TypedDict, total=False):
    """Both modes. Benchmark records add BenchmarkRecord's fields, accuracy records AccuracyRecord's."""

    record_version: int
    timestamp: str  # UTC, ISO 8601
    mode: Literal["benchmark", "accuracy"]
    complete: bool  # False: interrupted or failed after some iterations (benchmark), kept for the record
    # what ran
    model: str  # the model's name: a hub id, folder, GGUF stem or the default model's name
    model_source: str  # default | gguf | folder | hub | dummy
    device: str  # cpu | cuda | xpu, resolved from --device
    dtype: str  # resolved from --dtype
    dtype_reason: str
    backend: str  # a name in llmbench.backends.BACKENDS
    backend_details: dict  # the backend's own facts (compile mode, kernels, compile times, ...)
    backend_overrides: dict[str, str]  # environment variables that overrode the backend's options (version 2)
    quantization: dict | None  # the weight-only quantization applied (scheme, group_size, algo, layout, ...) or
    #                            a checkpoint's own (scheme "checkpoint"); None: unquantized
    batch_size: int  # prompts per batch (accuracy: lm-eval's batch size)
    seed: int
    world_size: int  # ranks of a tensor-parallel run, else 1
    tensor_parallel: dict | None  # how the model was sharded (distributed runs only)
    dummy_weights: bool
    num_parameters: int
    weight_bytes: int
    load_time_s: float
    prepare_time_s: float
    environment: dict  # python, torch, transformers, llmbench, device_name, cpu, cpu_kind, threads, hostname, ...
    # what was asked
    config: dict  # RunConfig.to_record()
    metrics: dict


class BenchmarkRecord(Record, total=False):
    # generation settings: only benchmark records have them (they do not affect accuracy scores)
    num_beams: int
    input_tokens: int  # the prompt's length as measured (--prompt text: its token count)
    prompt_source: str
    max_new_tokens: int
    num_iter: int
    num_warmup: int
    token_latency: bool
    # metrics: first/next/p50/p90/p99 token latencies (s), e2e_latency_s, throughput_tokens_per_s,
    # peak_memory_bytes, weight_bandwidth_gb_s, roofline_next_token_s, roofline_fraction,
    # roofline_fraction_at_run_bandwidth (cpu), roofline_fraction_at_placement_bandwidth (cpu, where the CPUs sat
    # where the host reads less at best), spreads (_stddev_, _cv)
    iterations: list[Iteration]
    output_text: str | None
    output_token_ids: list[int]
    roofline: dict
    valid: bool
    validity: dict
    energy: dict
    profile: dict


class AccuracyRecord(Record, total=False):
    task: str
    filter: str  # lm-eval's filter name ("none")
    limit: int | None
    num_samples: int | None
    num_fewshot: int | None
    task_version: float | str | None
    scored_with: str  # the module lm-eval scored (llmbench.backends.base.Backend.scored_with)
    data_files: dict  # local task data: {split: {path, sha256}}
    dataset_path: str  # or a hub dataset
    dataset_name: str | None
    # metrics: lm-eval's metrics of the task and filter (acc, acc_stderr, perplexity, ...)


def version_of(record: dict) -> int:
    version = record.get("record_version", 1)
    return version if isinstance(version, int) else 1


def requested(record: dict, key: str):
    """The setting `key` as the run asked for it (record["config"]); the top-level value for records whose config
    lacks it, and for world_size, which no flag sets (the launcher does)."""
    config = record.get("config") or {}
    return record.get(key) if key == "world_size" or key not in config else config[key]


def _report(path: Path, number: int, why: str) -> None:
    if (str(path), number) not in _reported:
        _reported.add((str(path), number))
        print(f"warning: {path}:{number} {why}", file=sys.stderr)


def read_file(path: Path) -> list[dict]:
    """Every record of one JSONL file. A line that is not a record (cut short by a crash, hand-edited) or that a
    newer llmbench wrote is reported on stderr with its file and line number, never skipped silently."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                _report(path, number, f"is not a JSON record (left out): {line.strip()[:60]!r}")
            elif version_of(record) > RECORD_VERSION:
                _report(path, number, f"is a version {version_of(record)} record, newer than this llmbench reads "
                                      f"({RECORD_VERSION}), so it is left out: update llmbench to read it")
            else:
                records.append(record)
    return records


def read_records(paths: Path | str | Iterable[Path | str], missing_ok: bool = False) -> list[dict]:
    """Every record of the given JSONL files and folders (a folder: its *.jsonl files, else any below it), in
    order. A path that does not exist is a UserError, or no records with `missing_ok` (a sweep's first case)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.jsonl")) or sorted(path.rglob("*.jsonl"))
            if not found and not missing_ok:
                raise UserError(f"{path} holds no .jsonl results file")
            files += found
        elif path.is_file():
            files.append(path)
        elif not missing_ok:
            raise UserError(f"{path} does not exist: give JSONL results files or folders holding them")
    return [record for file in files for record in read_file(file)]
