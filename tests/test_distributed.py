"""Tensor-parallel runs over 2 MPI ranks on the CPU, against the single-process run of the same tiny models."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import BloomConfig, GPTJConfig, OPTConfig, Phi3Config, Qwen2Config

from llmbench.distributed import inductor_keeps_marked_ops, shm_allreduce_wanted
from llmbench.errors import UserError
from llmbench.ranks import World, discover_world
from llmbench.records import read_records
from tests.conftest import ROOT, run_cli
from tests.tiny import save_tiny_model, tiny_llama_config

# The MPICH runtime from requirements.txt lives beside this interpreter (on PATH or not).
_BESIDE = Path(sys.executable).parent / "mpirun"
MPIRUN = str(_BESIDE) if _BESIDE.exists() else (shutil.which("mpirun") or "mpirun")


LAUNCH_TIMEOUT_S = 300
INDUCTOR_KEEPS_MARKED_OPS = inductor_keeps_marked_ops()
SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}


def family_configs(vocab: int) -> dict:
    """One tiny config per family AutoTP (or transformers' plan) shards: 2 layers, hidden 64, 4 heads."""
    return {
        "llama": tiny_llama_config(vocab),
        "qwen2": Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=False, **SPECIAL_IDS),
        "opt": OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=64, max_position_embeddings=512, **SPECIAL_IDS),
        "bloom": BloomConfig(vocab_size=vocab, hidden_size=64, n_layer=2, n_head=4, **SPECIAL_IDS),
        "gptj": GPTJConfig(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512,
                           **SPECIAL_IDS),
        "phi3": Phi3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=False, **SPECIAL_IDS),
    }


def mpirun(*args: str, timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    # requirements.txt installs MPICH: a missing mpirun fails every distributed test here, it never skips one.
    assert shutil.which(MPIRUN), f"{MPIRUN} not found: bash setup.sh installs MPICH (requirements.txt: mpich)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([MPIRUN, "-np", "2", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.mark.parametrize("environ, expected", [
    ({}, World()),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}, World(1, 2, 1, 2, "mpich")),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, World(3, 4, 1, 2, "openmpi")),
    ({"PALS_RANKID": "5", "PMI_SIZE": "8", "PALS_LOCAL_RANKID": "1", "PALS_LOCAL_SIZE": "4"},
     World(5, 8, 1, 4, "pals")),
    ({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, World(2, 4, 0, 2, "torchrun")),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2"}, World(1, 2, 1, 2, "deepspeed")),
])
def test_rank_and_size_come_from_every_launchers_variables(environ, expected):
    assert discover_world(environ) == expected


def test_a_rank_outside_the_job_is_refused():
    with pytest.raises(UserError, match="PMI_RANK=2"):
        discover_world({"PMI_RANK": "2", "PMI_SIZE": "2"})


@pytest.mark.parametrize("value, wanted", [("1", True), ("0", False)])
def test_the_cpu_allreduce_can_be_chosen(monkeypatch, value, wanted):
    monkeypatch.setenv("LLMBENCH_DS_SHM_ALLREDUCE", value)
    assert shm_allreduce_wanted() is wanted


def test_a_bad_cpu_allreduce_choice_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("LLMBENCH_DS_SHM_ALLREDUCE", "yes")
    with pytest.raises(UserError, match="expected 1 .* or 0"):
        shm_allreduce_wanted()


def test_every_family_sharded_over_two_ranks_generates_what_one_process_does(tmp_path, tokenizer):
    """Greedy and beam-4 ids equal the unsharded model's; each rank holds half of every sharded linear layer."""
    folders = [save_tiny_model(tmp_path / name, config, tokenizer)
               for name, config in family_configs(len(tokenizer)).items()]
    out = tmp_path / "findings.json"
    run = mpirun(sys.executable, "tests/tp_check.py", str(out), *map(str, folders))
    assert run.returncode == 0, run.stderr[-3000:]
    # the one family that falls back to transformers' plan says so on the console, once (rank 0)
    assert run.stderr.count("note: sharded with transformers' tensor-parallel plan, not DeepSpeed AutoTP: "
                            "AutoTP splits phi3's fused projections") == 1, run.stderr[-3000:]
    by_rank = json.loads(out.read_text())
    assert len(by_rank) == 2
    for rank, findings in enumerate(by_rank):
        assert [f["family"] for f in findings] == list(family_configs(8))
        for f in findings:
            expected = "transformers-tp-plan" if f["family"] == "phi3" else "deepspeed-autotp"
            assert f["method"] == expected, (rank, f["family"])
            assert f["tp_greedy"] == f["greedy"], (rank, f["family"])
            assert f["tp_beam"] == f["beam"], (rank, f["family"])
            assert len(f["greedy"]) == 8
            layers = {name: share for name, share in f["fractions"].items() if name != "lm_head"}
            # at least the attention output and MLP down projections of both layers
            assert len(layers) >= 4, (rank, f["family"], f["fractions"])
            assert set(layers.values()) == {0.5}, (rank, f["family"], f["fractions"])
    for family_rank0, family_rank1 in zip(*by_rank):
        # AutoTP splits the output head in blocks of 64 columns (one block at hidden size 64): the two ranks'
        # parts still make exactly one whole head
        head = [family_rank0["fractions"].get("lm_head"), family_rank1["fractions"].get("lm_head")]
        assert head == [None, None] or sum(head) == 1.0, (family_rank0["family"], head)


def single_and_tensor_parallel(common: list[str], tmp_path) -> tuple[dict, dict, subprocess.CompletedProcess]:
    """The same flags through run_generation.py and the seed's `mpirun -np 2 --prepend-rank` form:
    -> (the single-process record, the tensor-parallel record, the mpirun process)."""
    single = run_cli(*common, "--results", str(tmp_path / "single.jsonl"))
    assert single.returncode == 0, single.stderr[-2000:]
    tp = mpirun("--prepend-rank", sys.executable, "run_generation_with_deepspeed.py", *common,
                "--results", str(tmp_path / "tp.jsonl"))
    assert tp.returncode == 0, tp.stderr[-3000:]
    [reference] = read_records(tmp_path / "single.jsonl")
    [record] = read_records(tmp_path / "tp.jsonl")
    return reference, record, tp


def test_seed_launch_form_writes_one_record_with_the_single_process_output(tmp_path, tiny_llama):
    common = ["--benchmark", "-m", str(tiny_llama), "--greedy", "--dtype", "float32", "--input-tokens", "24",
              "--max-new-tokens", "12", "--num-iter", "2", "--num-warmup", "1", "--token-latency"]
    segments = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    reference, record, tp = single_and_tensor_parallel(common, tmp_path)
    assert record["world_size"] == 2
    assert record["output_token_ids"] == reference["output_token_ids"]
    assert record["tensor_parallel"]["method"] == "deepspeed-autotp"
    # DeepSpeed's shared-memory all-reduce never unlinks its /dev/shm buffers (69 MB a rank): the job removes them
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= segments
    # DeepSpeed's shared-memory all-reduce where it is compiled already, gloo elsewhere
    assert record["tensor_parallel"]["cpu_allreduce"] == ("deepspeed-shm" if shm_allreduce_wanted() else "gloo")
    assert len(record["tensor_parallel"]["rank_peak_memory_bytes"]) == 2
    assert all(b > 0 for b in record["tensor_parallel"]["rank_peak_memory_bytes"])
    assert all(len(it["token_latencies_s"]) == 12 for it in record["iterations"])
    # The roofline: the single run's cached bandwidth; every rank's shard counted (replicated tensors once per rank)
    if "not_cached" in reference["roofline"]:  # measured on a busy host, so there was nothing for the ranks to find
        assert record["roofline"]["read_bandwidth_gb_s"] is None and "no cached" in record["roofline"]["error"]
    else:
        assert record["roofline"]["read_bandwidth_gb_s"] == reference["roofline"]["read_bandwidth_gb_s"]
    assert record["roofline"]["kv_cache_bytes_read_per_token"] == reference["roofline"]["kv_cache_bytes_read_per_token"]
    assert record["roofline"]["weight_bytes_read_per_token"] >= reference["roofline"]["weight_bytes_read_per_token"]
    # rank 0 alone reports: the seed's labels appear once, tagged with rank 0
    latency_lines = [line for line in tp.stdout.splitlines() if "Inference latency:" in line]
    assert len(latency_lines) == 1 and latency_lines[0].startswith("[0]"), tp.stdout


FAIL_ON_RANK_1 = """
import os, sys
import llmbench.backends.base as base
from llmbench.launcher import main
if os.environ.get("PMI_RANK") == "1":
    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")
    base.hf_generate = broken
sys.exit(main(sys.argv[1:], prog="run_generation_with_deepspeed.py"))
"""


def test_a_failing_rank_ends_the_whole_job_with_one_clear_line(tiny_llama, tmp_path):
    """Rank 1 fails while rank 0 waits in an all-reduce: the job ends, not hangs, and says which rank failed."""
    start = time.monotonic()
    run = mpirun("--prepend-rank", sys.executable, "-c", FAIL_ON_RANK_1, "--benchmark", "-m", str(tiny_llama),
                 "--greedy", "--dtype", "float32", "--input-tokens", "16", "--max-new-tokens", "4", "--num-iter", "1",
                 "--results", str(tmp_path / "r.jsonl"), timeout=240)
    assert run.returncode != 0
    assert time.monotonic() - start < 240
    error = ("run_generation_with_deepspeed.py: error: RuntimeError: injected failure "
             "(set LLMBENCH_DEBUG=1 for the traceback)")
    notice = "run_generation_with_deepspeed.py: rank 1 of 2 failed (exit 1); ending the job"
    # Every message of the job (progress bars aside): rank 1's error in one line, then the notice, nothing else.
    # (mpirun may glue another rank's "[0] " prefix to the end of a line: a message ends at the next "[".)
    messages = [(rank, text.strip()) for rank, text in
                re.findall(r"\[(\d)\] (run_generation_with_deepspeed\.py: [^\r\n\[]*)", run.stderr)]
    assert messages == [("1", error), ("1", notice)], (run.stdout[-2000:], run.stderr[-3000:])
    after = [line.strip() for line in re.split(r"[\r\n]|(?=\[\d\] )", run.stderr.split(error, 1)[1])
             if line.strip() not in ("", "[0]", "[1]") and "it/s]" not in line and "%|" not in line]
    assert after == [f"[1] {notice}"], run.stderr[-3000:]  # no traceback or second line after the error
    assert "Traceback" not in run.stderr + run.stdout
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("shm", ["0", "1"])
def test_the_compile_backend_runs_tensor_parallel_as_one_process_does(tiny_llama, tmp_path, monkeypatch, shm):
    """Compiled decode steps over two ranks, over gloo or DeepSpeed's shared-memory all-reduce. The latter's ops are
    marked as having side effects: without that, rank 1 (whose output head gets no columns of the final hidden
    state) compiled a step without the last layer's all-reduces, and rank 0 waited forever."""
    monkeypatch.setenv("LLMBENCH_DS_SHM_ALLREDUCE", shm)
    common = ["--benchmark", "-m", str(tiny_llama), "--greedy", "--dtype", "float32", "--backend", "compile",
              "--input-tokens", "8", "--max-new-tokens", "6", "--num-iter", "2", "--num-warmup", "1"]
    if shm == "1" and not INDUCTOR_KEEPS_MARKED_OPS:  # torch 2.8 (the IPEX environment): refused in one line
        tp = mpirun("--prepend-rank", sys.executable, "run_generation_with_deepspeed.py", *common)
        assert tp.returncode != 0 and "LLMBENCH_DS_SHM_ALLREDUCE=1: torch" in tp.stderr, tp.stderr[-3000:]
        assert "Traceback" not in tp.stderr
        return
    reference, record, _ = single_and_tensor_parallel(common, tmp_path)
    assert record["world_size"] == 2 and record["backend"] == "compile"
    assert record["output_token_ids"] == reference["output_token_ids"]
    assert record["tensor_parallel"]["cpu_allreduce"] == ("deepspeed-shm" if shm == "1" else "gloo")
    assert record["backend_details"]["compile_time_s"]


@pytest.mark.parametrize("value, wanted", [("0", False), ("1", True)])
def test_compiled_steps_take_the_chosen_allreduce(monkeypatch, value, wanted):
    """torch 2.13's inductor keeps ops marked as having side effects (torch._library.utils.is_impure); torch 2.8's
    may drop them, so compiled steps there keep gloo and refuse the shared-memory all-reduce."""
    monkeypatch.setenv("LLMBENCH_DS_SHM_ALLREDUCE", value)
    if wanted and not INDUCTOR_KEEPS_MARKED_OPS:
        with pytest.raises(UserError, match="may drop DeepSpeed's all-reduce"):
            shm_allreduce_wanted(compiled=True)
        return
    assert shm_allreduce_wanted(compiled=True) is wanted


def test_accuracy_under_tensor_parallelism_equals_the_single_process_accuracy(tmp_path, tiny_llama):
    lambada = ROOT.parent / "shared" / "data" / "lambada_openai"
    common = ["--accuracy-only", "-m", str(tiny_llama), "--dtype", "float32", "--acc-data-dir", str(lambada),
              "--acc-limit", "12", "--acc-batch-size", "4", "--quiet"]
    reference, record, _ = single_and_tensor_parallel(common, tmp_path)
    assert record["world_size"] == 2 and record["tensor_parallel"]["method"] == "deepspeed-autotp"
    assert record["num_samples"] == reference["num_samples"] == 12
    assert record["metrics"]["acc"] == reference["metrics"]["acc"]
    assert record["metrics"]["perplexity"] == pytest.approx(reference["metrics"]["perplexity"], rel=1e-4)


def test_int8_weight_only_quantization_applies_to_each_ranks_shard(tmp_path, tiny_llama):
    run = mpirun("--prepend-rank", sys.executable, "run_generation_with_deepspeed.py", "--benchmark", "-m",
                 str(tiny_llama), "--greedy", "--dtype", "float32", "--woq", "int8", "--input-tokens", "16",
                 "--max-new-tokens", "8", "--num-iter", "1", "--num-warmup", "0", "--quiet",
                 "--results", str(tmp_path / "tp.jsonl"))
    assert run.returncode == 0, run.stderr[-3000:]
    [record] = read_records(tmp_path / "tp.jsonl")
    tp, quantization = record["tensor_parallel"], record["quantization"]
    assert record["world_size"] == 2 and len(record["output_token_ids"]) == 8
    assert quantization["scheme"] == "int8" and quantization["skipped_layers"] == []
    # every sharded projection of both layers, and rank 0's columns of the output head
    assert quantization["quantized_layers"] == tp["sharded_linear_layers"] == 15
    # beyond the replicated fp32 embedding, rank 0 holds int8 weights (1 byte each, plus scales): less than a
    # quarter of the fp32 bytes of the layers and head
    layer_params = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128  # q, o; k, v (2 kv heads); gate, up, down
    embedding_bytes = head_bytes = 4 * 600 * 64
    linear_fp32_bytes = 4 * 2 * layer_params + head_bytes
    assert tp["rank_weight_bytes"][0] - embedding_bytes < linear_fp32_bytes / 4
