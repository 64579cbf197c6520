"""A gated MLP's SiLU and multiply in its gate/up kernel call: the kernels' act=1 against their own act=0 outputs for
every weight kind, the graph pass on the forms models write (and not on others), and whole compiled models with the
same ids as eager, fused or not (llmbench/backends/glu_epilogue.py, cpu_gemv_run.h)."""

import pytest
import torch
import torch.nn.functional as F

from llmbench.backends import cpu_kernels, get_backend, glu_epilogue, int4_layout
from llmbench.models import load_model
from llmbench.prompts import cut_prompt

CPU = torch.device("cpu")


def silu_mul_of(full: torch.Tensor) -> torch.Tensor:
    """What inductor's kernel after the linear computes: silu(first half) * second half in float32, rounded once."""
    half = full.shape[-1] // 2
    gate, up = full[..., :half].float(), full[..., half:].float()
    return (gate / (1 + torch.exp(-gate)) * up).to(full.dtype)


def check_act(call, dtype: torch.dtype) -> None:
    full, fused = call(0), call(1)
    expected = silu_mul_of(full)
    assert fused.shape == expected.shape and fused.dtype == dtype
    # the exponential's last bit may differ from torch's, then the rounding of one value to the output dtype
    ulp = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert (fused.float() - expected.float()).abs().max().item() <= ulp * expected.abs().max().item()
    if dtype != torch.float32:  # and few values rounded otherwise
        assert (fused != expected).float().mean().item() < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 19])  # 19: more rows than one pass takes (the threads claim chunks)
def test_dense_act_is_silu_of_the_first_half_times_the_second(ops, dtype, rows):
    torch.manual_seed(rows)
    weight, bias = torch.randn(256, 96).to(dtype), torch.randn(256).to(dtype)
    x = torch.randn(rows, 1, 96).to(dtype)
    for b in (None, bias):
        check_act(lambda act: ops.linear_dense(x, weight, b, act), dtype)


@pytest.mark.parametrize("meta", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 13])
def test_int4_act(ops, meta, rows):
    torch.manual_seed(rows)
    q = torch.randint(0, 16, (256, 192))
    scale, zero = torch.rand(256, 6).to(meta) / 8, torch.randn(256, 6).to(meta) / 4
    packed, value_bytes = int4_layout.int4_rows(q, scale, zero, ops.int4_tile_rows())
    x = torch.randn(rows, 192).to(torch.bfloat16)
    check_act(lambda act: ops.linear_int4(x, packed, 32, value_bytes, None, act), torch.bfloat16)


def test_int8_act(ops):
    torch.manual_seed(0)
    q, scale = torch.randint(-128, 128, (256, 128), dtype=torch.int8), torch.rand(256, 4) / 64
    x = torch.randn(3, 128)
    check_act(lambda act: ops.linear_int8(x, q, scale, None, act), torch.float32)
    if ops.int8_tiles_built():
        tiles = cpu_kernels.int8_tiles(q, scale)
        check_act(lambda act: ops.linear_int8_tiles(x, tiles, scale.shape[1], None, act), torch.float32)


def test_act_refuses_other_values_and_halves_of_part_blocks(ops):
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="act must be 0"):
        ops.linear_dense(x, torch.randn(32, 64), None, 2)
    with pytest.raises(RuntimeError, match="act 1 needs the gate's and the up projection's rows in blocks of"):
        ops.linear_dense(x, torch.randn(36, 64), None, 1)  # halves of 18 rows: blocks of 4 split


def fusions(monkeypatch) -> list[int]:
    """The pass's fusions per compiled graph, as the pass runs."""
    seen, fuse = [], glu_epilogue.fuse_silu_mul
    monkeypatch.setattr(glu_epilogue, "fuse_silu_mul", lambda graph: seen.append(fuse(graph)) or seen[-1])
    return seen


def llama_mlp(x, weight):
    y = torch.ops.llmbench_cpu.linear_dense(x, weight, None)
    half = y.shape[-1] // 2
    return F.silu(y.narrow(-1, 0, half)) * y.narrow(-1, half, half)


def phi3_mlp(x, weight):  # gate_up_proj, chunk, then up * act(gate)
    gate, up = torch.ops.llmbench_cpu.linear_dense(x, weight, None).chunk(2, dim=-1)
    return up * F.silu(gate)


def gelu_mlp(x, weight):
    gate, up = torch.ops.llmbench_cpu.linear_dense(x, weight, None).chunk(2, dim=-1)
    return F.gelu(gate) * up


def gate_used_twice(x, weight):
    gate, up = torch.ops.llmbench_cpu.linear_dense(x, weight, None).chunk(2, dim=-1)
    return F.silu(gate) * up + gate.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn, rows, fused", [(llama_mlp, 256, 1), (phi3_mlp, 256, 1), (gelu_mlp, 256, 0),
                                             (gate_used_twice, 256, 0), (llama_mlp, 192, 0)])  # 192: halves of 96
def test_the_pass_fuses_silu_times_up_only(ops, tmp_path, monkeypatch, dtype, fn, rows, fused):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    x, weight = torch.randn(1, 1, 64).to(dtype), torch.randn(rows, 64).to(dtype)
    seen = fusions(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, options={"post_grad_custom_pre_pass": glu_epilogue.kernel_passes()})
    out = compiled(x, weight)
    assert seen == [fused]
    expected = fn(x, weight)
    tolerance = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert (out.float() - expected.float()).abs().max().item() <= tolerance * expected.abs().max().item()


@pytest.mark.parametrize("woq", [None, "int4"])
def test_compiled_model_fuses_each_layer_and_gives_the_same_ids(tiny_llama, ops, tmp_path, monkeypatch, woq):
    """fp32 (one-row steps through the kernels on every CPU kind): each step fuses every layer's MLP (prompts take
    torch's GEMM) and gives eager's ids; INT4 (TorchAO's weights in the kernels): prompts and steps fuse every layer
    and give the ids of the same steps unfused (LLMBENCH_FUSED_GLU=0)."""
    from llmbench.cli import parse_config
    from llmbench.quantize import quantize_model

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("LLMBENCH_ONE_ROW_DENSE", "kernels")
    ids = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("LLMBENCH_FUSED_GLU", setting)
        loaded = load_model(str(tiny_llama), CPU, torch.float32)
        if woq:
            quantize_model(loaded, parse_config(["--woq", woq, "--quiet"]), CPU, torch.float32)
        inputs = cut_prompt(loaded.tokenizer, 16, 1, CPU)
        seen = fusions(monkeypatch)
        backend = get_backend("compile")
        backend.prepare(loaded.model, CPU, torch.float32, None)
        backend.warm_up_shapes(inputs, 12, 1)
        ids[setting] = backend.generate(inputs, 12, 1)
        layers = loaded.model.config.num_hidden_layers
        every = {layers} if woq else {0, layers}
        assert (max(seen) == layers and set(seen) <= every) if setting == "1" else seen == [], seen
        assert backend.details["gate_up_activation"].startswith(
            "SiLU and multiply in" if setting == "1" else "inductor's kernel")
    assert torch.equal(ids["1"], ids["0"])
    if woq is None:
        eager = get_backend("eager")
        eager.prepare(loaded.model, CPU, torch.float32, None)
        assert torch.equal(ids["1"], eager.generate(inputs, 12, 1))
