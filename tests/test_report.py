"""The report and compare commands on fixed result sets (tests/fixtures, written by make_fixtures.py)."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from llmbench.compare import compare, render, set_rows
from llmbench.errors import UserError
from llmbench.report import write_report

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ROOT = FIXTURES.parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("next_token_latency_vs_input.png", "token_timeline.png", "throughput_vs_batch_size.png",
         "accuracy_vs_precision.png")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    write_report([FIXTURES / "results.jsonl"], out)
    return out


def test_summary_tables_hold_the_values_and_only_varying_columns(report):
    md = (report / "summary.md").read_text()
    bench = md.split("## Accuracy")[0]
    # eager, bf16, batch 1, 512 input tokens: next token 30 * (1 + 512/512) = 60 ms, first token 1024 ms
    assert "| bfloat16 | eager | 1 | 512 | 1024.00 | 60.00 |" in bench
    header = bench.split("\n")[2]
    assert "backend" in header and "input_tokens" in header and "batch_size" in header
    assert "| model |" not in header and "num_beams" not in header  # the same in every run: left out
    assert "num_beams=1" in bench and "model=SmolLM2-135M-Instruct" in bench
    assert "1 incomplete records" in md  # the interrupted 1024-token run is left out
    assert "| 1024 |" not in md
    accuracy = md.split("## Accuracy")[1]
    assert "| bfloat16 | int4 | 0.38 |" in accuracy
    rows = list(csv.DictReader((report / "summary.csv").open()))
    assert len(rows) == 12 + 1 + 4  # benchmark grid + the sparse record + accuracy
    eager_512 = [r for r in rows if r["backend"] == "eager" and r["input_tokens"] == "512" and r["batch_size"] == "1"]
    assert float(eager_512[0]["next_token_ms"]) == pytest.approx(60.0)


@pytest.mark.parametrize("name", PLOTS)
def test_plots_are_pngs_with_drawn_content(report, name):
    path = report / name
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 500
    assert float(np.var(pixels[..., :3])) > 1e-3  # not a blank canvas
    colored = np.abs(pixels[..., 0] - pixels[..., 2]) > 0.2  # lines/bars in colour, not only black axes
    assert colored.mean() > 0.001


def test_no_accuracy_plot_without_accuracy_records(tmp_path):
    write_report([FIXTURES / "compare_a.jsonl"], tmp_path)
    assert (tmp_path / "next_token_latency_vs_input.png").exists()
    assert not (tmp_path / "accuracy_vs_precision.png").exists()


def test_report_command_writes_next_to_a_folder_and_rejects_missing_input(tmp_path):
    (tmp_path / "results.jsonl").write_bytes((FIXTURES / "compare_b.jsonl").read_bytes())
    done = subprocess.run([sys.executable, "-m", "llmbench.report", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| 512 |" in done.stdout and (tmp_path / "summary.md").exists()
    missing = subprocess.run([sys.executable, "-m", "llmbench.report", str(tmp_path / "nope.jsonl")], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


def test_compare_ratios_per_matching_case():
    a, b = set_rows(FIXTURES / "compare_a.jsonl"), set_rows(FIXTURES / "compare_b.jsonl")
    rows, columns, facts = compare(a, b)
    assert facts["by"] == ["backend"]  # detected: eager in A, compile in B
    assert facts["matched"] == 2 and facts["only_b"] == 1
    cases = {r["input_tokens"]: r for r in rows}
    assert cases[32]["next_token_ms B/A"] == pytest.approx(0.5)
    assert cases[128]["first_token_ms B/A"] == pytest.approx(0.5)
    assert cases[32]["tokens_per_s B/A"] > 1.9
    assert cases["geomean"]["next_token_ms B/A"] == pytest.approx(0.5)
    md = render(FIXTURES / "compare_a.jsonl", FIXTURES / "compare_b.jsonl", None)
    assert "backend=eager" in md and "backend=compile" in md and "0.500" in md


def test_compare_by_names_the_differing_parameter():
    a, b = set_rows(FIXTURES / "compare_a.jsonl"), set_rows(FIXTURES / "compare_b.jsonl")
    with pytest.raises(UserError, match="--by"):
        compare(a, b, by=[])  # matching on the backend too: nothing in common
    rows, _, facts = compare(a, b, by=["backend"])
    assert facts["matched"] == 2
