"""Reports, comparisons and sweeps respect `valid`; records from before it (no `valid` key) are 'unknown'."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmbench.compare import compare, render, set_rows
from llmbench.errors import UserError
from llmbench.report import render_tables, write_report
from llmbench.sweep_plan import is_recorded, make_plan
from tests.test_sweep import TINY_SIZES, run_driver

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ROOT = FIXTURES.parent.parent
REASON = "other processes used 83% of the CPUs during measurement"


def with_validity(src: Path, dst: Path, valid_by_input: dict) -> Path:
    """A copy of a fixture set whose records get `valid` by input length (absent: left without the key)."""
    lines = []
    for line in src.read_text().splitlines():
        record = json.loads(line)
        valid = valid_by_input.get(record["input_tokens"])
        if valid is not None:
            record["valid"] = valid
            record["validity"] = {"reasons": [] if valid else [REASON]}
        lines.append(json.dumps(record))
    dst.write_text("\n".join(lines) + "\n")
    return dst


def test_report_marks_invalid_rows_and_unknown_ones(tmp_path):
    path = with_validity(FIXTURES / "compare_b.jsonl", tmp_path / "b.jsonl", {32: True, 128: False})
    md, csv, rows = render_tables([json.loads(line) for line in path.read_text().splitlines()])
    header = md.splitlines()[0]
    assert "| valid |" in header
    by_input = {r["input_tokens"]: r["valid"] for r in rows}
    assert by_input == {32: True, 128: False, 512: None}  # 512: recorded before validity existed
    assert "| 128 | false |" in md and "| 32 | true |" in md
    assert f"NOT VALID, figures unreliable: input_tokens=128: {REASON}" in md
    assert "1 runs of unknown validity" in md
    assert "valid" in csv.splitlines()[0].split(",")
    write_report([path], tmp_path / "out")  # plots and files still written
    assert (tmp_path / "out" / "summary.md").exists()


def test_report_of_old_records_has_no_validity_column():
    md, _, _ = render_tables([json.loads(line) for line in (FIXTURES / "compare_b.jsonl").read_text().splitlines()])
    assert "valid" not in md.splitlines()[0] and "NOT VALID" not in md


def test_compare_flags_and_refuses_invalid_records(tmp_path):
    a = set_rows(with_validity(FIXTURES / "compare_a.jsonl", tmp_path / "a.jsonl", {32: True, 128: True}))
    b = set_rows(with_validity(FIXTURES / "compare_b.jsonl", tmp_path / "b.jsonl", {32: True, 128: False}))
    rows, columns, facts = compare(a, b)
    cases = {r["input_tokens"]: r for r in rows}
    assert "validity" in columns and cases[128]["validity"] == "B not valid" and "validity" not in cases[32]
    assert cases[128]["next_token_ms B/A"] == pytest.approx(0.5)  # flagged, still shown
    assert facts["not_valid"] == 1 and facts["refused"] == 0
    rows, _, facts = compare(a, b, valid_only=True)
    cases = {r["input_tokens"]: r for r in rows}
    assert cases[128]["next_token_ms B/A"] is None and cases[128]["validity"] == "refused: B not valid"
    assert cases[32]["next_token_ms B/A"] == pytest.approx(0.5) and facts["refused"] == 1
    assert cases["geomean"]["next_token_ms B/A"] == pytest.approx(0.5)
    md = render(tmp_path / "a.jsonl", tmp_path / "b.jsonl", None, valid_only=True)
    assert "1 cases refused (--valid-only)" in md


def test_compare_flags_records_from_two_placements_of_the_cpus(tmp_path):
    """Two valid records measured with the CPUs placed otherwise by the hypervisor (round trips more than 1.8x
    apart, llmbench.placement) come from two machines: their pair is flagged, and refused with --valid-only."""
    def placed(src: Path, dst: Path, ns_by_input: dict) -> list[dict]:
        with_validity(src, dst, {32: True, 128: True})
        records = [json.loads(line) for line in dst.read_text().splitlines()]
        for r in records:
            if r["input_tokens"] in ns_by_input:
                r["validity"]["placement"] = {"before_ns": ns_by_input[r["input_tokens"]],
                                              "after_ns": ns_by_input[r["input_tokens"]]}
        dst.write_text("\n".join(map(json.dumps, records)) + "\n")
        return set_rows(dst)

    a = placed(FIXTURES / "compare_a.jsonl", tmp_path / "a.jsonl", {32: 61.0, 128: 61.0})
    b = placed(FIXTURES / "compare_b.jsonl", tmp_path / "b.jsonl", {32: 305.0, 128: 64.0})
    rows, columns, facts = compare(a, b)
    cases = {r["input_tokens"]: r for r in rows}
    assert cases[32]["validity"] == "CPUs placed otherwise (A 61 ns, B 305 ns)" and "validity" not in cases[128]
    assert facts["not_valid"] == 1 and cases[32]["next_token_ms B/A"] == pytest.approx(0.5)
    rows, _, facts = compare(a, b, valid_only=True)
    assert {r["input_tokens"]: r["next_token_ms B/A"] for r in rows}[32] is None and facts["refused"] == 1
    assert "placed otherwise by the hypervisor" in render(tmp_path / "a.jsonl", tmp_path / "b.jsonl", None)


def test_compare_valid_only_with_nothing_valid_is_an_error(tmp_path):
    with_validity(FIXTURES / "compare_a.jsonl", tmp_path / "a.jsonl", {32: False, 128: False})
    a, b = set_rows(tmp_path / "a.jsonl"), set_rows(FIXTURES / "compare_b.jsonl")
    with pytest.raises(UserError, match="--valid-only"):
        compare(a, b, valid_only=True)
    done = subprocess.run([sys.executable, "-m", "llmbench.compare", str(tmp_path / "a.jsonl"),
                           str(FIXTURES / "compare_b.jsonl"), "--valid-only"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


def test_compare_of_old_records_counts_them_as_unknown_not_invalid():
    a, b = set_rows(FIXTURES / "compare_a.jsonl"), set_rows(FIXTURES / "compare_b.jsonl")
    rows, columns, facts = compare(a, b, valid_only=True)
    assert "validity" not in columns and facts["refused"] == 0 and facts["unknown_validity"] == 2
    assert {r["input_tokens"]: r["next_token_ms B/A"] for r in rows}[32] == pytest.approx(0.5)


def test_resume_counts_invalid_records_only_without_rerun_invalid():
    plan = make_plan("benchmark", {"input": "32", "bs": "1", "iter": "3"})
    case = plan.cases[0]
    config = {"model_id": None, "num_beams": 4, "input_tokens": 32, "max_new_tokens": 128, "batch_size": 1,
              "num_iter": 3, "num_warmup": 3, "dtype": None, "device": "auto", "backend": "eager"}
    invalid = {"mode": "benchmark", "complete": True, "valid": False, "config": config}
    old = {"mode": "benchmark", "complete": True, "config": config}  # no `valid`: unknown, counts as recorded
    assert is_recorded(plan, case, [invalid])
    rerun = make_plan("benchmark", {"input": "32", "bs": "1", "iter": "3", "RERUN_INVALID": "1"})
    assert rerun.folder_name() == plan.folder_name()  # the same sweep, the same folder
    assert not is_recorded(rerun, case, [invalid])
    assert is_recorded(rerun, case, [invalid, {**invalid, "valid": True}])
    assert is_recorded(rerun, case, [old])
    with pytest.raises(UserError, match="RERUN_INVALID"):
        make_plan("benchmark", {"RERUN_INVALID": "yes"})


def test_sweep_reruns_invalid_cases_on_resume(tmp_path, tiny_llama):
    # No warm-up makes every record `valid: false` (its first iteration includes one-time costs).
    values = {"model": str(tiny_llama), **TINY_SIZES, "input": "16", "bs": "1", "warmup": "0"}
    first = run_driver(tmp_path, **values)
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = Path(first.stdout.strip().splitlines()[-1])
    notes = [line for line in first.stderr.splitlines() if line.startswith("case 1/1: not valid (")]
    assert len(notes) == 1 and "no warm-up iteration ran" in notes[0], first.stderr[-2000:]
    assert "NOT VALID" in (run_dir / "summary.md").read_text()
    again = run_driver(tmp_path, **values)
    assert "already recorded, skipped" in again.stderr
    rerun = run_driver(tmp_path, **values, RERUN_INVALID="1")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "recorded as not valid: running it again" in rerun.stderr
    records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["valid"] is False for r in records)
