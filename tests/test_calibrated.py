"""--woq-algo autoround: AutoRound calibrates INT4 on cpu, writes a standard checkpoint, and later runs load it."""

import json

import torch

from llmbench.compat import dtype_kwargs
from llmbench.ipex_woq import PACK, read_checkpoint
from llmbench.models import load_model
from llmbench.prompts import cut_prompt
from tests.conftest import error_lines

CPU = torch.device("cpu")

COMMON = ("--benchmark", "--greedy", "--dtype", "float32", "--input-tokens", "16", "--max-new-tokens", "8",
          "--num-iter", "1", "--num-warmup", "0", "--device", "cpu")


def test_autoround_calibrates_saves_and_reloads(run_main, tiny_llama, tmp_path):
    ckpt, results = tmp_path / "ar", tmp_path / "r.jsonl"
    flags = (*COMMON, "-m", str(tiny_llama), "--woq", "int4", "--woq-algo", "autoround", "--calib-dataset",
             "prompt.json", "--calib-iters", "2", "--woq-checkpoint", str(ckpt), "--results", str(results))
    status, _, err = run_main(*flags)
    assert status == 0, err[-3000:]
    assert "calibrating with AutoRound" in err
    saved = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert (saved["quant_method"], saved["bits"], saved["group_size"], saved["iters"]) == ("auto-round", 4, 32, 2)
    assert (saved["packing_format"], saved["sym"]) == ("auto_round:gptqmodel", False)
    status, _, err = run_main(*flags)  # the folder exists now: loaded, not calibrated again
    assert status == 0, err[-3000:]
    assert "calibrating with AutoRound" not in err
    first, second = [json.loads(line) for line in results.read_text().splitlines()]
    for record in (first, second):
        q = record["quantization"]
        assert q["library"].startswith("auto-round ") and q["algo"] == "autoround"
        assert (q["calibration"]["iters"], q["calibration"]["sym"], q["calibration"]["seqlen"]) == (2, False, 256)
        assert q["quantized_layers"] == 14 and q["skipped_layers"] == ["lm_head"]  # 2 layers x 7; the head stays
    assert first["output_token_ids"] == second["output_token_ids"]
    # packed INT4 buffers are counted in weight_bytes: below the float32 model's bytes
    assert second["weight_bytes"] < first["num_parameters"] * 4


def test_autoround_without_calibration_text_is_one_line(run_main, tiny_llama, tmp_path):
    status, _, err = run_main(*COMMON, "-m", str(tiny_llama), "--woq", "int4", "--woq-algo", "autoround",
                              "--woq-checkpoint", str(tmp_path / "ar"), "--results", str(tmp_path / "r.jsonl"))
    assert status == 2
    [line] = error_lines(err)
    assert "--calib-dataset" in line
    assert not (tmp_path / "ar").exists()


def gptq_weights(state: dict, layer: str) -> torch.Tensor:
    """The float weight [N, K] that a layer's tensors in GPTQ's original layout (zero points stored less one) encode."""
    shifts = torch.arange(PACK) * 4
    unpack = lambda packed: ((packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF)  # noqa: E731
    q = unpack(state[f"{layer}.qweight"].t()).flatten(1)  # [N, K]
    zeros = unpack(state[f"{layer}.qzeros"]).flatten(1) + 1  # [groups, N]
    scales = state[f"{layer}.scales"].float()  # [groups, N]
    group = q.shape[1] // scales.shape[0]
    return ((q.view(q.shape[0], -1, group) - zeros.t().unsqueeze(-1)) * scales.t().unsqueeze(-1)).flatten(1)


def test_autoround_checkpoint_as_ipex_reads_it_encodes_what_auto_round_runs(run_main, tiny_llama, tmp_path):
    """What the IPEX environment passes to ipex.llm.optimize (GPTQ's original layout, converted from AutoRound's
    asymmetric packing) must be the weights auto-round's own kernels compute with: same logits."""
    from transformers import AutoModelForCausalLM

    ckpt = tmp_path / "ar"
    status, _, err = run_main(*COMMON, "-m", str(tiny_llama), "--woq", "int4", "--woq-algo", "autoround",
                              "--calib-dataset", "prompt.json", "--calib-iters", "2", "--woq-checkpoint", str(ckpt),
                              "--results", str(tmp_path / "r.jsonl"))
    assert status == 0, err[-3000:]
    reference = load_model(str(tiny_llama), CPU, torch.float32)
    (state, quant_config), _ = read_checkpoint(ckpt, reference, "int4")
    layers = {key.removesuffix(".qweight") for key in state if key.endswith(".qweight")}
    assert len(layers) == 14 and quant_config["quant_method"] == "gptq"
    modules = dict(reference.model.named_modules())
    with torch.no_grad():
        for layer in layers:
            modules[layer].weight.copy_(gptq_weights(state, layer))
    ids = cut_prompt(reference.tokenizer, 16, 1, CPU).input_ids
    expected = reference.model(ids).logits
    got = AutoModelForCausalLM.from_pretrained(str(ckpt), **dtype_kwargs(torch.float32)).eval()(ids).logits.float()
    assert torch.allclose(got, expected, atol=2e-2 * expected.abs().max().item()), (got - expected).abs().max()
