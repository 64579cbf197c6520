"""The one-click drivers: env vars -> cases, validation before any work, interrupted and resumed sweeps."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmbench.errors import UserError
from llmbench.sweep_plan import case_command, make_plan

ROOT = Path(__file__).resolve().parent.parent
TINY_SIZES = {"input": "16 24", "bs": "1 2", "output": "3", "iter": "1", "warmup": "0", "beam": "1",
              "dtype": "float32", "device": "cpu"}


def driver_env(tmp_path: Path, **values: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("model", "bs", "input", "output", "iter", "warmup",
                                                             "beam", "dtype", "device", "backend", "woq", "task",
                                                             "np", "EXTRA_ARGS", "QUIET")}
    return {**env, "PYTHON": sys.executable, "RESULTS_DIR": str(tmp_path / "results"), **values}


def run_driver(tmp_path: Path, script: str = "run_benchmark.sh", timeout: float = 300, **values: str):
    return subprocess.run(["bash", str(ROOT / script)], cwd=tmp_path, env=driver_env(tmp_path, **values),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script, name, value", [
    ("run_benchmark.sh", "bs", "abc"),
    ("run_benchmark.sh", "dtype", "float8"),
    ("run_benchmark.sh", "backend", "turbo"),
    ("run_benchmark.sh", "input", "0"),
    ("run_benchmark_woq.sh", "woq", "int3"),
    ("run_accuracy.sh", "device", "tpu"),
    ("run_benchmark_ds.sh", "model", "./no-such-model"),
])
def test_bad_env_value_stops_before_any_work(tmp_path, script, name, value):
    done = run_driver(tmp_path, script, timeout=60, **{name: value})
    assert done.returncode == 2  # docs/sweeps.md: bad values exit 2 before any case
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{name}=" in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "results").exists()  # nothing was started


@pytest.mark.parametrize("extra, flag", [
    ("--batch-size 8", "--batch-size"),
    ("--num-beams=2", "--num-beams"),
    ("-m other", "(-m|--model-id)"),
    ("--quiet --results=elsewhere.jsonl", "--results"),
])
def test_extra_args_may_not_repeat_a_swept_flag(extra, flag):
    with pytest.raises(UserError, match=f"EXTRA_ARGS repeats {flag}"):
        make_plan("benchmark", {"EXTRA_ARGS": extra})


@pytest.mark.parametrize("extra", ["--num-bea 2", "--batch 8", "--no-such-flag", "--num-iter many"])
def test_extra_args_the_entry_script_would_refuse_stop_the_sweep_before_any_case(extra):
    """Abbreviations are not flags (the parsers take full names only), and the sweep checks EXTRA_ARGS with the
    entry scripts' own parser: a case never starts only to fail, or to run other settings than its record says."""
    with pytest.raises(UserError, match="EXTRA_ARGS="):
        make_plan("benchmark", {"EXTRA_ARGS": extra})
    assert make_plan("benchmark", {"EXTRA_ARGS": "--quiet --print-memory"}).extra_args == ["--quiet", "--print-memory"]


def test_abbreviated_flags_are_refused_by_the_entry_script(run_main):
    # (the model does not exist: were the prefix taken as --num-beams, the run would stop at once all the same)
    status, _, err = run_main("--benchmark", "-m", "./no/such/model", "--num-bea", "2")
    assert status == 2 and "unrecognized arguments: --num-bea" in err


def test_an_offline_hub_id_outside_the_cache_stops_the_sweep_before_any_case(tmp_path):
    env = {"model": "nobody/no-such-model", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    with pytest.raises(UserError, match="model=nobody/no-such-model: not a local file or folder, and not in the hub"):
        make_plan("benchmark", env)
    # In the cache it is accepted, and with --dummy-weights a built-in id needs no cache at all.
    snapshot = tmp_path / "hf" / "hub" / "models--nobody--no-such-model" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc")
    assert make_plan("benchmark", env).values["model"] == ["nobody/no-such-model"]
    assert make_plan("benchmark", {**env, "model": "facebook/opt-6.7b", "EXTRA_ARGS": "--dummy-weights"}).cases
    done = run_driver(tmp_path, timeout=60, model="nobody/other-model", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "results").exists()


def test_plan_is_the_product_of_the_lists_with_the_seed_defaults():
    plan = make_plan("benchmark", {"input": "32 64", "bs": "1 2 2", "model": ""})
    assert len(plan.cases) == 4  # the repeated 2 counts once
    cmd = case_command(plan, plan.cases[0], Path("r.jsonl"))
    assert "-m" not in cmd  # no model: the built-in default
    flags = dict(zip(cmd[4::2], cmd[5::2]))  # after python, script and the two mode flags
    assert flags["--num-beams"] == "4" and flags["--max-new-tokens"] == "128" and flags["--num-iter"] == "10"
    assert flags["--num-warmup"] == "3" and flags["--backend"] == "eager" and "--dtype" not in cmd
    assert make_plan("benchmark", {"input": "32 64", "bs": "1 2"}).folder_name() == plan.folder_name()
    assert make_plan("benchmark", {"input": "32 128", "bs": "1 2"}).folder_name() != plan.folder_name()


def test_distributed_and_accuracy_cases():
    plan = make_plan("ds-accuracy", {"np": "2", "task": "lambada_openai", "woq": "none int8"})
    assert len(plan.cases) == 2
    cmd = case_command(plan, plan.cases[1], Path("r.jsonl"))
    assert cmd[:4] == ["mpirun", "-np", "2", "--prepend-rank"]
    assert "--accuracy-only" in cmd and cmd[cmd.index("--woq") + 1] == "int8"
    assert "--woq" not in case_command(plan, plan.cases[0], Path("r.jsonl"))


def complete_records(results: Path) -> list[dict]:
    if not results.exists():
        return []
    records = []
    for line in results.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return [r for r in records if r.get("complete")]


def test_sweep_interrupted_after_one_case_resumes(tmp_path, tiny_llama):
    values = {"model": str(tiny_llama), **TINY_SIZES}
    out, err = (tmp_path / "out1.txt").open("w"), (tmp_path / "err1.txt").open("w")
    driver = subprocess.Popen(["bash", str(ROOT / "run_benchmark.sh")], cwd=tmp_path, stdout=out, stderr=err,
                              env=driver_env(tmp_path, **values), start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and driver.poll() is None:
        if any(complete_records(p) for p in (tmp_path / "results").glob("*/results.jsonl")):
            break
        time.sleep(0.2)
    assert driver.poll() is None, "the sweep ended before it could be interrupted"
    os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole foreground group
    assert driver.wait(timeout=60) == 130
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.killpg(driver.pid, 0)  # the running case was stopped too
    run_dir = Path((tmp_path / "out1.txt").read_text().strip().splitlines()[-1])
    first = complete_records(run_dir / "results.jsonl")
    assert len(first) == 1 and "case 1/4" in (tmp_path / "err1.txt").read_text()

    done = run_driver(tmp_path, **values)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip().splitlines()[-1]) == run_dir  # same sweep, same folder
    assert "case 1/4: input=16 bs=1: already recorded, skipped" in done.stderr
    records = complete_records(run_dir / "results.jsonl")
    assert len(records) == 4
    assert sorted((r["input_tokens"], r["batch_size"]) for r in records) == [(16, 1), (16, 2), (24, 1), (24, 2)]
    assert records[0]["timestamp"] == first[0]["timestamp"]  # the recorded case was not run again
    rows = list(csv.DictReader((run_dir / "summary.csv").open()))
    assert len(rows) == 4 and {r["input_tokens"] for r in rows} == {"16", "24"}
    assert all(float(r["next_token_ms"]) > 0 for r in rows)
    for png in ("next_token_latency_vs_input.png", "token_timeline.png", "throughput_vs_batch_size.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    assert len(list((run_dir / "logs").glob("*.log"))) >= 4


def test_failing_case_is_logged_and_counted(tmp_path, tiny_llama):
    # 600 input tokens do not fit the tiny model's 512 positions: the case fails, the sweep reports it.
    done = run_driver(tmp_path, model=str(tiny_llama), **{**TINY_SIZES, "input": "600", "bs": "1"})
    assert done.returncode == 1
    assert "case 1/1 failed" in done.stderr and "1 of 1 cases failed" in done.stderr
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    log = next((run_dir / "logs").glob("*.log")).read_text()
    assert "error" in log
