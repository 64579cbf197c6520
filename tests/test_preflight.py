"""Bad input found before the weights load, each as exit 2 and one line: memory, prompt files, GGUF files."""

import json
import struct

import pytest
import torch
import transformers

from llmbench.memory import available_bytes, estimate_run
from tests.conftest import error_lines
from tests.tiny import tiny_llama_config

RUN = ("--benchmark", "--greedy", "--dtype", "float32", "--input-tokens", "8", "--max-new-tokens", "2",
       "--num-iter", "1", "--num-warmup", "0", "--quiet")


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Loading weights fails the test: what is checked here must be refused before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_kv_cache_estimate_counts_every_sequence_position_layer_and_head():
    config = tiny_llama_config(600)  # 2 layers, 2 key/value heads of 16
    need = estimate_run(config, 1000, torch.bfloat16, batch_size=3, num_beams=4, input_tokens=10, max_new_tokens=6)
    assert need.kv_cache == (3 * 4) * (10 + 6) * 2 * 2 * 2 * 16 * 2
    assert need.weights == 1000 and need.activations > 0
    assert need.total == need.weights + need.kv_cache + need.activations


def test_free_memory_is_known_on_cpu():
    free = available_bytes(torch.device("cpu"))
    assert free is not None and 0 < free


def sequences_beyond_free_memory() -> int:
    """Twice the number of sequences (batch x beams) of the tiny model that fit in this machine's free memory."""
    one = estimate_run(tiny_llama_config(600), 0, torch.float32, 1, 1, 8, 2).total
    return 2 * available_bytes(torch.device("cpu")) // one + 1


@pytest.mark.parametrize("flag", ["--batch-size", "--num-beams"])
def test_a_run_that_cannot_fit_is_refused_before_loading(run_main, tmp_path, tiny_llama, no_weight_loading, flag):
    results = tmp_path / "r.jsonl"
    extra = [flag, str(sequences_beyond_free_memory())] + (["--batch-size", "1"] if flag == "--num-beams" else [])
    status, _, err = run_main(*[a for a in RUN if a != "--greedy"], "-m", str(tiny_llama), "--results",
                              str(results), *extra)
    lines = error_lines(err)
    assert status == 2 and len(lines) == 1, err
    assert "KV cache" in lines[0] and "GiB free" in lines[0] and "needs about" in lines[0]
    assert not results.exists()


def test_dummy_weights_share_the_memory_check(run_main, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(tiny_llama_config(600).to_json_string())
    status, _, err = run_main(*RUN, "--dummy-weights", "-m", str(config), "--batch-size",
                              str(sequences_beyond_free_memory()),
                              "--results", str(tmp_path / "r.jsonl"))
    lines = error_lines(err)
    assert status == 2 and len(lines) == 1 and "KV cache" in lines[0], err


def test_prompt_longer_than_the_text_is_refused_before_loading(run_main, tmp_path, tiny_llama, no_weight_loading):
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"texts": {"en": "Only a few words here."}}))
    status, _, err = run_main(*RUN, "-m", str(tiny_llama), "--input-tokens", "64", "--prompt-file", str(short),
                              "--results", str(tmp_path / "r.jsonl"))
    lines = error_lines(err)
    assert status == 2 and len(lines) == 1 and "holds only" in lines[0], err


def test_context_overflow_is_refused_before_loading(run_main, tmp_path, tiny_llama, no_weight_loading):
    status, _, err = run_main(*RUN, "-m", str(tiny_llama), "--input-tokens", "500", "--max-new-tokens", "20",
                              "--results", str(tmp_path / "r.jsonl"))
    lines = error_lines(err)
    assert status == 2 and len(lines) == 1 and "exceeds the model's context of 512" in lines[0], err


def bad_prompt_file(tmp_path, kind):
    if kind == "folder":
        return tmp_path
    path = tmp_path / "prompt.json"
    path.write_text(json.dumps({"default_text": ["en"], "texts": {"en": "Some words."}}))
    return path


@pytest.mark.parametrize("kind, message", [("folder", "is a folder"), ("list default", "\"default_text\" must be")])
def test_a_malformed_prompt_file_is_refused_before_the_model_is_resolved(run_main, tmp_path, kind, message):
    # The model does not exist: the prompt file is refused first, before anything about the model is looked at.
    status, _, err = run_main(*RUN, "-m", "./no/such/model", "--prompt-file", str(bad_prompt_file(tmp_path, kind)),
                              "--results", str(tmp_path / "r.jsonl"))
    lines = error_lines(err)
    assert status == 2 and len(lines) == 1 and message in lines[0], err
    assert "Error" not in lines[0]  # no raw exception name (IsADirectoryError, TypeError)


def test_a_truncated_gguf_file_is_one_line_with_one_error_word(cli, tmp_path):
    gguf = tmp_path / "broken.gguf"
    # 100 bytes: a GGUF v3 header announcing one tensor and five metadata entries, cut short in the second entry
    # (the gguf reader fails with struct.error, whose class name is "error").
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 5) + struct.pack("<Q", 20) + b"general.architecture"
    head += struct.pack("<IQ", 8, 5) + b"llama" + struct.pack("<Q", 200)
    gguf.write_bytes((head + b"x" * 100)[:100])
    proc = cli(*RUN, "-m", str(gguf), "--results", str(tmp_path / "r.jsonl"),
               env={"LLMBENCH_CACHE": str(tmp_path / "cache")})
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("run_generation.py: error: cannot read GGUF file") and "error: error:" not in lines[0]
    assert "Traceback" not in proc.stderr
