"""Sharding into whole attention heads: which rank counts work, the refusal of a fallback that cannot, and the
default model at the distributed sweep's defaults (2 ranks, beam 4, bf16)."""

from __future__ import annotations

import re
import sys

import pytest
from transformers import LlamaConfig, Phi3Config, Qwen2Config

from llmbench.records import read_records
from llmbench.tp_heads import (
    AUTOTP,
    TP_PLAN,
    Heads,
    describe_counts,
    head_counts,
    plan_splits_heads,
    whole_heads,
    working_rank_counts,
)
from tests.test_distributed import mpirun
from tests.tiny import save_tiny_model, tiny_llama_config

DEFAULT_MODEL_HEADS = Heads(9, 3)  # SmolLM2-135M: 9 attention heads of 64, 3 key/value heads


def test_the_default_models_heads_are_read_from_its_config():
    from transformers import AutoConfig

    from llmbench.models import converted_gguf_folder, default_gguf_path

    assert head_counts(AutoConfig.from_pretrained(converted_gguf_folder(default_gguf_path()))) == DEFAULT_MODEL_HEADS


@pytest.mark.parametrize("heads, ranks, autotp, tp_plan", [
    (DEFAULT_MODEL_HEADS, 2, True, False),  # AutoTP: 2 + 1 key/value heads (6 + 3 query heads); the plan: 4.5 heads
    (DEFAULT_MODEL_HEADS, 3, True, True),
    (DEFAULT_MODEL_HEADS, 4, True, False),  # AutoTP: one rank holds no head, and computes no attention
    (Heads(32, 8), 16, True, False),
    (Heads(32, 8), 8, True, True),
])
def test_whole_heads_by_method(heads, ranks, autotp, tp_plan):
    assert whole_heads(heads, ranks, AUTOTP) is autotp
    assert whole_heads(heads, ranks, TP_PLAN) is tp_plan
    assert whole_heads(heads, ranks, TP_PLAN, plan_splits=False)  # a plan that gathers q/k/v on every rank


def test_which_plans_split_heads():
    assert plan_splits_heads(LlamaConfig()) and plan_splits_heads(Qwen2Config())
    assert not plan_splits_heads(Phi3Config())  # its fused qkv output is gathered ("colwise_gather_output")


def test_the_rank_counts_that_work_are_named():
    assert working_rank_counts(DEFAULT_MODEL_HEADS, TP_PLAN) == [1, 3]
    assert describe_counts([1, 3]) == "1 or 3"
    assert describe_counts(working_rank_counts(Heads(4, 4), AUTOTP)) == "1 to 4"
    assert describe_counts([1]) == "1"


# run_generation_with_deepspeed.py with AutoTP failing on every rank, so the run falls back to transformers' plan
AUTOTP_FAILS = """
import sys
import llmbench.distributed as distributed
from llmbench.launcher import main
def failing(*args, **kwargs):
    raise RuntimeError("injected AutoTP failure")
distributed.autotp = failing
sys.exit(main(sys.argv[1:], prog="run_generation_with_deepspeed.py"))
"""


def test_a_fallback_that_cannot_hold_whole_heads_is_refused_in_one_line(tmp_path, tokenizer):
    """3 heads cannot be split evenly over 2 ranks: where AutoTP fails, the fallback to transformers' plan is
    refused before it loads (it would stop at the attention reshape), naming the rank counts that work."""
    config = tiny_llama_config(len(tokenizer))
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads = 48, 3, 3
    folder = save_tiny_model(tmp_path / "three-heads", config, tokenizer)
    results = tmp_path / "r.jsonl"
    run = mpirun("--prepend-rank", sys.executable, "-c", AUTOTP_FAILS, "--benchmark", "-m", str(folder), "--greedy",
                 "--dtype", "float32", "--input-tokens", "8", "--max-new-tokens", "2", "--num-iter", "1",
                 "--num-warmup", "0", "--results", str(results))
    assert run.returncode == 2, run.stderr[-3000:]
    expected = (f"run_generation_with_deepspeed.py: error: -m {folder} has 3 attention heads and 3 key/value heads: "
                "AutoTP failed: injected AutoTP failure; the fallback is transformers' tensor-parallel plan, which "
                "cannot give each of 2 ranks whole heads; run it on 1 or 3 ranks")
    # mpirun interleaves the ranks' streams (one rank's line can continue on another's): take each rank's message
    message = r"\[\d+\] (run_generation_with_deepspeed\.py: error: [^\[\n]*)"
    errors = [m.strip() for m in re.findall(message, run.stderr)]
    assert errors and all(line == expected for line in errors), run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "note: sharded with" not in run.stderr
    assert not results.exists()


def test_default_model_at_the_distributed_sweeps_defaults(tmp_path):
    """What `bash run_benchmark_ds.sh` runs first: the default model (bf16 on cpu) over 2 ranks with 4 beams (the
    sweep's 1024 input tokens cost minutes here; the fallback this guards against fails at every prompt length).
    AutoTP's uneven split keeps whole heads on each rank; its check against the unsharded output must not mistake
    bf16 rounding for a wrong split (the even split it would fall back to gives each rank 4.5 heads)."""
    results = tmp_path / "tp.jsonl"
    run = mpirun("--prepend-rank", sys.executable, "run_generation_with_deepspeed.py", "--benchmark", "--num-beams",
                 "4", "--dtype", "bfloat16", "--input-tokens", "64", "--max-new-tokens", "2", "--num-iter", "1",
                 "--num-warmup", "0", "--token-latency", "--results", str(results), timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    [record] = read_records(results)
    assert (record["dtype"], record["num_beams"], record["input_tokens"], record["world_size"]) == (
        "bfloat16", 4, 64, 2)
    assert record["complete"] is True and len(record["output_token_ids"]) == 2
    assert record["tensor_parallel"]["method"] == AUTOTP
    assert record["tensor_parallel"]["fallback_reason"] is None
    assert "note: sharded with" not in run.stderr
