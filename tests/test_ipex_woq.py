"""IPEX weight-only quantization (--ipex --woq), its low-precision checkpoints, and --ipex under DeepSpeed.

Opt-in (marker ipex): they run in the IPEX environment (bash setup.sh --ipex DIR) with LLMBENCH_IPEX_TESTS=1;
elsewhere tests/conftest.py deselects them. The two tests at the end need no IPEX and run everywhere.
"""

import json
import sys

import pytest
import torch

from llmbench.models import load_model
from llmbench.prompts import cut_prompt
from tests.conftest import error_lines, run_cli

CPU = torch.device("cpu")
IPEX = pytest.mark.ipex
COMMON = ("--benchmark", "--greedy", "--dtype", "float32", "--input-tokens", "16", "--max-new-tokens", "12",
          "--num-iter", "1", "--num-warmup", "0", "--device", "cpu")


def one_record(path) -> dict:
    [record] = [json.loads(line) for line in path.read_text().splitlines()]
    return record


def ipex_run(tiny_llama, tmp_path, name: str, *flags: str) -> dict:
    proc = run_cli(*COMMON, "-m", str(tiny_llama), "--ipex", *flags, "--results", str(tmp_path / f"{name}.jsonl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return one_record(tmp_path / f"{name}.jsonl")


@IPEX
def test_ipex_int4_record_names_ipex_and_counts_every_layer(tiny_llama, tmp_path):
    record = ipex_run(tiny_llama, tmp_path, "int4", "--woq", "int4")
    q = record["quantization"]
    assert q["library"].startswith("intel-extension-for-pytorch 2.")
    assert (q["scheme"], q["group_size"], q["lowp_mode"], q["algo"]) == ("int4", 32, "int8", "rtn")
    assert q["quantized_layers"] == 15 and q["skipped_layers"] == []  # 2 layers x 7 linears, and the head
    assert record["backend_details"]["woq_lowp_mode"] == "int8"
    # the packed INT4 weights are counted: less than the float32 linears, more than nothing
    linear_bytes = sum(m.weight.numel() * 4 for m in load_model(str(tiny_llama), CPU, torch.float32).model.modules()
                       if isinstance(m, torch.nn.Linear))
    embedding_bytes = 600 * 64 * 4
    assert embedding_bytes + linear_bytes / 8 < record["weight_bytes"] < embedding_bytes + linear_bytes / 2


@IPEX
def test_ipex_checkpoint_is_ipex_rounding_saved_once_and_reloaded(tiny_llama, tmp_path):
    """--woq-checkpoint: the first run writes IPEX's rounding in GPTQ layout, the second loads it; both give the
    tokens of IPEX quantizing by itself (same rounding, same kernels)."""
    ckpt = tmp_path / "ckpt"
    own = ipex_run(tiny_llama, tmp_path, "own", "--woq", "int4", "--woq-lowp-mode", "none")
    written = ipex_run(tiny_llama, tmp_path, "written", "--woq", "int4", "--woq-lowp-mode", "none",
                       "--woq-checkpoint", str(ckpt))
    saved = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert (saved["quant_method"], saved["bits"], saved["group_size"]) == ("gptq", 4, 32)
    reloaded = ipex_run(tiny_llama, tmp_path, "reloaded", "--woq", "int4", "--woq-lowp-mode", "none",
                        "--woq-checkpoint", str(ckpt))
    assert own["output_token_ids"] == written["output_token_ids"] == reloaded["output_token_ids"]
    assert reloaded["quantization"]["checkpoint"] == str(ckpt)
    assert reloaded["backend_details"]["low_precision_checkpoint"] == str(ckpt)


@IPEX
def test_gptq_layout_loads_into_ipex_as_the_weights_it_encodes(tiny_llama):
    """A GPTQ-layout checkpoint (what AutoRound writes) holds q, zero points and scales; IPEX computing in float32
    with it must give the logits of the float model whose weights are (q - zero) * scale."""
    import intel_extension_for_pytorch as ipex
    from intel_extension_for_pytorch.quantization import WoqLowpMode, WoqWeightDtype

    from llmbench.ipex_woq import IPEX_BLOCK_N, ipex_rtn, pack_gptq
    from llmbench.woq_inputs import linear_layers

    reference = load_model(str(tiny_llama), CPU, torch.float32)
    state = {}
    for name, mod in linear_layers(reference.model).items():
        if mod.out_features % IPEX_BLOCK_N:  # the 600-token head: IPEX would end the process
            continue
        q, zeros, scales = ipex_rtn(mod.weight.detach(), 32)
        state.update({f"{name}.{k}": v for k, v in pack_gptq(q, zeros, scales, 32).items()})
        scales16 = scales.to(torch.float16).float()  # the layout keeps float16 scales
        groups = (q.float().view(q.shape[0], -1, 32) - zeros.unsqueeze(-1)) * scales16.unsqueeze(-1)
        mod.weight.data = groups.view_as(mod.weight)
    ids = cut_prompt(reference.tokenizer, 16, 1, CPU).input_ids
    expected = reference.model(ids).logits
    quantized = load_model(str(tiny_llama), CPU, torch.float32)
    qconfig = ipex.quantization.get_weight_only_quant_qconfig_mapping(
        weight_dtype=WoqWeightDtype.INT4, lowp_mode=WoqLowpMode.NONE, group_size=32)
    model = ipex.llm.optimize(quantized.model.eval(), dtype=torch.float32, quantization_config=qconfig, inplace=True,
                              deployment_mode=False, low_precision_checkpoint=(
                                  state, {"quant_method": "gptq", "group_size": 32, "desc_act": False, "bits": 4}))
    got = model(ids).logits
    assert len(state) == 14 * 4  # 2 layers x 7 linears: qweight, qzeros, scales, g_idx
    assert torch.allclose(got, expected, atol=1e-3 * expected.abs().max().item()), (got - expected).abs().max()


@IPEX
@pytest.mark.parametrize("woq", [(), ("--woq", "int4", "--woq-lowp-mode", "none")], ids=["bf16-weights", "woq-int4"])
def test_seed_deepspeed_form_with_ipex_writes_one_record(tokenizer, tmp_path, woq):
    from transformers import LlamaConfig

    from tests.test_distributed import SPECIAL_IDS, mpirun
    from tests.tiny import save_tiny_model

    # hidden size 128: AutoTP splits in blocks of 64, and IPEX cannot run a rank's empty shard
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, **SPECIAL_IDS)
    model = save_tiny_model(tmp_path / "model", config, tokenizer)
    results = tmp_path / "tp.jsonl"
    proc = mpirun("--prepend-rank", sys.executable, "run_generation_with_deepspeed.py", *COMMON, "-m",
                  str(model), "--ipex", *woq, "--results", str(results))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = one_record(results)
    assert record["world_size"] == 2 and record["backend"] == "ipex"
    assert record["tensor_parallel"]["method"] == "deepspeed-autotp"
    if woq:
        assert record["quantization"]["library"].startswith("intel-extension-for-pytorch")
        assert record["quantization"]["quantized_layers"] > 0
    assert len(record["output_token_ids"]) == 12


@pytest.mark.parametrize("flags, says", [
    (("--woq", "int4", "--woq-lowp-mode", "int8"), "--woq-lowp-mode sets IPEX's compute precision"),
    (("--woq", "int4", "--calib-iters", "5"), "--calib-iters applies to --woq-algo autoround"),
    (("--woq", "int4", "--woq-algo", "autoround", "--calib-dataset", "prompt.json"), "pass --woq-checkpoint DIR"),
])
def test_bad_ipex_and_autoround_flags_are_one_line(run_main, tiny_llama, tmp_path, flags, says):
    status, _, err = run_main(*COMMON, "-m", str(tiny_llama), *flags, "--results", str(tmp_path / "r.jsonl"))
    assert status == 2
    [line] = error_lines(err)
    assert says in line and "Traceback" not in err
