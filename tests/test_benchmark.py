"""The single-instance benchmark, end to end through run_generation.py, on real (tiny and default) models."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from llmbench.errors import UserError
from llmbench.prompts import cut_prompt, load_prompt_text
from llmbench.records import read_records
from tests.conftest import ROOT, error_lines

SEED_LABELS = ("Inference latency:", "First token average latency:", "Average 2... latency:",
               "P90 2... latency:", "P99 2... latency:")


def bench_args(model, results, *extra) -> list[str]:
    args = ["--benchmark", "--device", "cpu", "--results", str(results), *extra]
    return args + (["-m", str(model)] if model is not None else [])


def only_record(path):
    records = read_records(path)
    assert len(records) == 1
    return records[0]


def assert_consistent(record, n_new):
    """Exactly n_new tokens per iteration; first + next-token latencies add up to the end-to-end time."""
    for it in record["iterations"]:
        assert it["generated_tokens"] == n_new
        assert len(it["token_latencies_s"]) == n_new
        assert all(t > 0 for t in it["token_latencies_s"])
        total = sum(it["token_latencies_s"])
        assert total <= it["e2e_latency_s"]
        assert total >= 0.95 * it["e2e_latency_s"] - 0.002, (total, it["e2e_latency_s"])


def test_default_model_end_to_end(cli, tmp_path):
    """The check a user would run first: no -m, bf16 greedy, 3 iterations of exactly 16 tokens."""
    results = tmp_path / "R.jsonl"
    proc = cli(*bench_args(None, results, "--dtype", "bfloat16", "--greedy", "--input-tokens", "32",
                           "--max-new-tokens", "16", "--num-iter", "3", "--num-warmup", "1", "--token-latency",
                           "--print-memory"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for label in SEED_LABELS:
        assert label in proc.stdout
    assert "Traceback" not in proc.stderr
    record = only_record(results)
    assert record["model"] == "SmolLM2-135M-Instruct"
    assert record["num_parameters"] == 134_515_008
    assert (record["dtype"], record["num_beams"], record["input_tokens"]) == ("bfloat16", 1, 32)
    assert len(record["iterations"]) == 3 and record["complete"] is True
    assert_consistent(record, 16)
    metrics = record["metrics"]
    next_tokens = [t for it in record["iterations"] for t in it["token_latencies_s"][1:]]
    assert metrics["next_token_latency_s"] == pytest.approx(sum(next_tokens) / len(next_tokens))
    assert metrics["p50_next_token_latency_s"] <= metrics["p90_next_token_latency_s"] \
        <= metrics["p99_next_token_latency_s"] <= max(next_tokens)
    assert metrics["weight_bandwidth_gb_s"] == pytest.approx(
        record["weight_bytes"] / metrics["next_token_latency_s"] / 1e9)
    assert metrics["peak_memory_bytes"] > record["weight_bytes"]
    # The model works: its text is printed and kept, and is real words.
    assert isinstance(record["output_text"], str) and len(record["output_text"].split()) >= 3
    assert f"Output: {record['output_text']!r}" in proc.stdout
    env = record["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] >= 1 and env["cpu"]


@pytest.mark.parametrize("beams,batch", [(1, 1), (4, 1), (1, 2), (4, 2)])
def test_tiny_llama_greedy_and_beam(run_main, tmp_path, tiny_llama, beams, batch):
    results = tmp_path / "r.jsonl"
    status, _, err = run_main(*bench_args(tiny_llama, results, "--dtype", "float32", "--num-beams", str(beams),
                                          "--batch-size", str(batch), "--input-tokens", "24", "--max-new-tokens",
                                          "12", "--num-iter", "2", "--num-warmup", "1", "--token-latency", "--quiet"))
    assert status == 0, err
    record = only_record(results)
    assert (record["num_beams"], record["batch_size"], record["input_tokens"]) == (beams, batch, 24)
    assert_consistent(record, 12)
    assert len(record["output_token_ids"]) == 12
    # Random weights emit EOS early when allowed; the run still produced exactly 12 tokens.
    per_token = record["metrics"]["throughput_tokens_per_s"]
    assert per_token == pytest.approx(batch * 12 * 2 / sum(it["e2e_latency_s"] for it in record["iterations"]))


def test_plain_generate_without_token_latency(run_main, tmp_path, tiny_llama):
    results = tmp_path / "r.jsonl"
    status, out, err = run_main(*bench_args(tiny_llama, results, "--greedy", "--input-tokens", "8",
                                            "--max-new-tokens", "5", "--num-iter", "2", "--num-warmup", "0", "--quiet"))
    assert status == 0, err
    assert "Inference latency:" in out and "First token" not in out
    record = only_record(results)
    assert record["metrics"]["first_token_latency_s"] is None
    assert [it["generated_tokens"] for it in record["iterations"]] == [5, 5]


@pytest.mark.parametrize("n", [1, 7, 64, 300])
def test_prompt_cut_to_exact_length(tokenizer, n):
    inputs = cut_prompt(tokenizer, n, 3, torch.device("cpu"))
    assert inputs.input_ids.shape == (3, n)
    assert torch.equal(inputs.input_ids[0], inputs.input_ids[2])
    text, key = load_prompt_text()
    assert key == "en" and text.startswith(inputs.text.strip()[:20])


def test_user_prompt_is_used_whole(run_main, tmp_path, tiny_llama, tokenizer):
    results = tmp_path / "r.jsonl"
    prompt = "The harbour lights came on one by one"
    status, _, err = run_main(*bench_args(tiny_llama, results, "--greedy", "--prompt", prompt, "--max-new-tokens",
                                          "3", "--num-iter", "1", "--num-warmup", "0", "--quiet"))
    assert status == 0, err
    record = only_record(results)
    assert record["input_tokens"] == len(tokenizer(prompt)["input_ids"])
    assert record["prompt_source"] == "--prompt"


def test_prompt_longer_than_text_is_refused(tokenizer, tmp_path):
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"texts": {"en": "Only a few words here."}}))
    with pytest.raises(UserError, match="holds only"):
        cut_prompt(tokenizer, 50, 1, torch.device("cpu"), short)


BAD_INPUTS = {
    "missing model folder": (["-m", "./no/such/model"], "no such file or folder"),
    "missing gguf": (["-m", "missing.gguf"], "no such GGUF file"),
    "absent device": (["--device", "cuda"], "no CUDA device"),
    "absent xpu": (["--device", "xpu"], "no Intel GPU"),
    "unknown dtype": (["--dtype", "float8"], "invalid choice"),
    "zero iterations": (["--num-iter", "0"], "positive integer"),
    "negative batch": (["--batch-size", "-2"], "non-negative integer"),
    "non-numeric input": (["--input-tokens", "many"], "expected an integer"),
    "both modes": (["--accuracy-only"], "two different runs"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_line(run_main, tmp_path, case):
    args, message = BAD_INPUTS[case]
    status, _, err = run_main(*bench_args(None, tmp_path / "r.jsonl", *args))
    assert status == 2
    lines = error_lines(err)
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "r.jsonl").exists()


def test_bad_input_from_a_real_process_has_no_traceback(cli, tmp_path):
    proc = cli(*bench_args("./no/such/model", tmp_path / "r.jsonl"))
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == ["run_generation.py: error: -m ./no/such/model: no such file or folder"]


def test_bad_input_needing_the_model(run_main, tmp_path, tiny_llama):
    broken = tmp_path / "broken.json"
    broken.write_text('{"texts": {"en": "unterminated')
    cases = [
        (["--input-tokens", "600"], "exceeds the model's context of 512"),
        (["--prompt-file", str(broken)], "is not valid JSON"),
        (["--prompt-file", str(tmp_path / "absent.json")], "not found"),
    ]
    for args, message in cases:
        status, _, err = run_main(*bench_args(tiny_llama, tmp_path / "r.jsonl", "--greedy", *args))
        assert status == 2
        lines = error_lines(err)
        assert len(lines) == 1 and message in lines[0], err


def test_interrupted_run_keeps_earlier_records_and_its_iterations(tmp_path, tiny_llama):
    results = tmp_path / "r.jsonl"
    earlier = {"model": "earlier", "metrics": {}}
    results.write_text(json.dumps(earlier) + "\n")
    cmd = [sys.executable, str(ROOT / "run_generation.py"), "--benchmark", "-m", str(tiny_llama), "--greedy",
           "--input-tokens", "16", "--max-new-tokens", "64", "--num-iter", "100000", "--num-warmup", "0",
           "--token-latency", "--results", str(results)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    seen = ""
    while time.time() < deadline and "Output:" not in seen:  # printed after the first measured iteration
        seen += proc.stdout.readline()
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    records = read_records(results)
    assert records[0] == earlier
    assert len(records) == 2 and records[1]["complete"] is False
    assert records[1]["valid"] is False and "the run stopped after" in records[1]["validity"]["reasons"][-1]
    assert len(records[1]["iterations"]) >= 1
    assert all(it["generated_tokens"] == 64 for it in records[1]["iterations"])
    # (the message may follow the progress bar on its line)
    assert stderr.endswith(f"run_generation.py: interrupted; the {len(records[1]['iterations'])} iteration(s) "
                           f"measured so far were recorded in {results}\n"), stderr[-500:]
