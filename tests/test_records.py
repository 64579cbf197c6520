"""The record schema and its one reader: records of every version read, unreadable or too new lines are reported,
and records written by version 1 (tests/fixtures/records_v1.jsonl, two real runs of the default model) still load
in report and compare."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from llmbench.cli import RunConfig, parse_config
from llmbench.compare import render
from llmbench.records import RECORD_VERSION, read_records, requested
from llmbench.report import write_report

V1 = Path(__file__).resolve().parent / "fixtures" / "records_v1.jsonl"


def test_run_config_defaults_are_the_flags_defaults():
    assert parse_config([]) == RunConfig()
    assert parse_config(["--greedy", "--backend", "compile"]) == replace(RunConfig(), num_beams=1, backend="compile")


def test_version_1_records_read_with_what_was_asked_apart_from_what_ran():
    bench, acc = read_records(V1)
    assert bench["record_version"] == acc["record_version"] == 1
    assert (bench["mode"], acc["mode"]) == ("benchmark", "accuracy")
    assert bench["dtype"] == "bfloat16" and requested(bench, "dtype") is None  # ran bfloat16; asked for the default
    assert requested(bench, "world_size") == 1
    assert "input_tokens" not in acc  # an accuracy record has no generation fields


def test_version_1_records_load_in_report(tmp_path):
    md = write_report([V1], tmp_path)
    assert "## Benchmark" in md and "## Accuracy" in md
    assert "lambada_openai" in md and "woq=none" in md
    assert (tmp_path / "summary.csv").read_text().count("\n") == 3  # header and one row per record


def test_version_1_records_load_in_compare():
    text = render(V1, V1, by=None)
    assert "2 matching cases" in text and "0 only in A, 0 only in B" in text


def test_a_record_newer_than_this_reader_is_reported_not_read(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    lines = [{"record_version": RECORD_VERSION, "mode": "benchmark"},
             {"record_version": RECORD_VERSION + 1, "mode": "benchmark"}]
    results.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert read_records(results) == lines[:1]
    assert f"{results}:2 is a version {RECORD_VERSION + 1} record, newer than this llmbench reads" \
        in capsys.readouterr().err


def test_unreadable_lines_are_reported_with_file_and_number_never_skipped_silently(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    results.write_text('{"mode": "benchmark"}\n{"cut sho\n\n[1, 2]\n')
    assert read_records([tmp_path]) == [{"mode": "benchmark"}]  # a folder: its .jsonl files
    err = capsys.readouterr().err
    assert f"{results}:2 is not a JSON record" in err and f"{results}:4 is not a JSON record" in err


def test_missing_paths_are_refused_unless_allowed(tmp_path):
    from llmbench.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        read_records(tmp_path / "none.jsonl")
    assert read_records(tmp_path / "none.jsonl", missing_ok=True) == []
