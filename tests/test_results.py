"""Results files: appends are all or nothing, a cut-short line is repaired, readers say which lines they left out,
and a run that cannot write its record refuses before loading or shows the record on stdout."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmbench.compare import set_rows
from llmbench.records import read_records
from llmbench.report import write_report
from llmbench.results import append_record
from tests.conftest import ROOT, error_lines

# Runs `code` in a child whose files may not grow past LIMIT bytes (RLIMIT_FSIZE): a disk that is full at that
# size. SIGXFSZ is ignored, so an oversized write fails with EFBIG (or writes short) instead of killing the child.
# The suite's modules are imported before (the disk fills after start-up): with torch 2.8 and transformers 4.51 the
# imports write files of their own (a generated torch module, joblib's semaphore probe).
LIMITED = textwrap.dedent("""
    import resource, runpy, signal, sys
    import llmbench.main
    limit = int(sys.argv.pop(1))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
""")


def run_limited(limit: int, body: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    code = LIMITED + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code, str(limit), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_a_failed_append_leaves_the_file_as_it_was_and_the_next_one_is_readable(tmp_path):
    results = tmp_path / "r.jsonl"
    append_record(results, {"run": 1, "pad": "x" * 3900})
    before = results.read_bytes()
    # The next record would cross the limit part-way: nothing of it may stay behind.
    done = run_limited(len(before) + 100, """
        from llmbench.results import append_record
        try:
            append_record(sys.argv[1], {"run": 2, "pad": "y" * 4000})
        except OSError as exc:
            print("failed:", exc)
    """, str(results))
    assert "failed:" in done.stdout, done.stderr
    assert results.read_bytes() == before
    append_record(results, {"run": 3})  # space is back
    assert [r["run"] for r in read_records(results)] == [1, 3]


def test_ctrl_c_while_a_written_record_is_synced_keeps_the_record(tmp_path):
    """Ctrl-C reaching a sweep's case while it syncs its record (the line already written) must not erase it."""
    results = tmp_path / "r.jsonl"
    append_record(results, {"run": 1})
    code = textwrap.dedent("""
        import os, signal, sys
        from llmbench import results as r
        real_fsync = os.fsync
        def fsync_then_ctrl_c(fd):
            real_fsync(fd)
            os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt as fsync returns
        r.os.fsync = fsync_then_ctrl_c
        try:
            r.append_record(sys.argv[1], {"run": 2})
        except KeyboardInterrupt:
            print("interrupted")
    """)
    done = subprocess.run([sys.executable, "-c", code, str(results)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert "interrupted" in done.stdout, done.stderr
    assert [r["run"] for r in read_records(results)] == [1, 2]


def test_a_file_cut_short_by_an_older_writer_is_repaired_and_the_fragment_reported(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps({"run": 1}) + "\n" + '{"run": 2, "metr')
    append_record(results, {"run": 3})
    assert "ended in an unfinished line" in capsys.readouterr().err
    assert [r["run"] for r in read_records(results)] == [1, 3]  # the new record did not run into the fragment
    assert f"{results}:2 is not a JSON record" in capsys.readouterr().err


def test_every_reader_reports_unreadable_lines_with_file_and_number(tmp_path, capsys):
    record = {"mode": "benchmark", "model": "m", "complete": True, "metrics": {"next_token_latency_s": 0.01}}
    for name in ("records", "report", "compare"):  # the sweeps resume through read_records
        results = tmp_path / name / "results.jsonl"
        results.parent.mkdir()
        results.write_text(json.dumps(record) + "\nnot json\n" + "[1, 2]\n")
        capsys.readouterr()
        read = {"records": read_records, "report": lambda p: write_report([p], p.parent), "compare": set_rows}[name]
        assert read(results)
        err = capsys.readouterr().err
        assert f"{results}:2 is not a JSON record" in err and f"{results}:3 is not a JSON record" in err, name


def test_report_command_names_the_unreadable_line(tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps({"mode": "benchmark", "model": "m", "metrics": {"next_token_latency_s": 0.01}})
                       + '\n{"cut sho\n')
    done = subprocess.run([sys.executable, "-m", "llmbench.report", str(results), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{results}:2 is not a JSON record" in done.stderr


@pytest.mark.parametrize("make", ["folder", "missing parent under a file"])
def test_a_results_path_that_cannot_take_a_record_is_refused_before_loading(run_main, tmp_path, make):
    if make == "folder":
        results = tmp_path / "out"
        results.mkdir()
    else:
        (tmp_path / "plain").write_text("")
        results = tmp_path / "plain" / "r.jsonl"
    # The model does not exist: the results path is refused first, so it was checked before any loading.
    status, _, err = run_main("--benchmark", "-m", "./no/such/model", "--results", str(results))
    lines = error_lines(err)
    assert status == 2 and len(lines) == 1 and f"--results {results}" in lines[0], err


def test_a_record_that_cannot_be_written_at_the_end_is_shown_on_stdout(tmp_path, tiny_llama):
    results = tmp_path / "r.jsonl"
    append_record(results, {"run": "earlier"})
    size = results.stat().st_size
    args = ["--benchmark", "-m", str(tiny_llama), "--greedy", "--dtype", "float32", "--input-tokens", "8",
            "--max-new-tokens", "3", "--num-iter", "1", "--num-warmup", "0", "--quiet", "--results", str(results)]
    done = run_limited(size + 10, """
        sys.argv = ["run_generation.py", *sys.argv[1:]]
        runpy.run_path("run_generation.py", run_name="__main__")
    """, *args)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "could not append the record to" in lines[0], done.stderr[-2000:]
    assert results.stat().st_size == size  # the earlier record is intact, no fragment
    shown = json.loads(done.stdout.strip().splitlines()[-1])
    assert shown["model"] == str(tiny_llama) and len(shown["output_token_ids"]) == 3
    assert "Inference latency" in done.stdout  # the figures too
    assert read_records(Path(results)) == [{"run": "earlier"}]
