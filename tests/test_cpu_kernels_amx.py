"""The CPU kernels' AMX path (bf16 steps of several rows and prefills on AMX tiles) and prefills through the kernels
(INT4 and INT8 prompts; 16-bit ones where torch emulates their GEMM)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmbench.backends import compile_settings, cpu_kernels
from llmbench.backends.kernel_linears import EMULATED_WIDE_ROWS, NATIVE_PROMPT_ROWS, native_prompt_kinds
from tests.test_cpu_kernels import quantized_linear, reference, siblings


def amx_expected() -> int:
    """The rows from which bf16 linears use AMX tiles here: LLMBENCH_AMX_MIN_ROWS as the process started, else 3
    (the default), where the CPU has AMX_BF16 and Linux grants tile data (5.16 on); else 0."""
    from llmbench.host import cpu_kind

    release = tuple(int(p) for p in os.uname().release.split(".")[:2])
    if "amx_bf16" not in cpu_kind().flags or release < (5, 16):
        return 0
    return compile_settings.amx_min_rows_env() if compile_settings.amx_min_rows_env() is not None else \
        compile_settings.AMX_DEFAULT_MIN_ROWS


@pytest.mark.parametrize("out_features", [16, 80, 560])  # 560: threads take 4, 3, 2 and 1 tiles at once
@pytest.mark.parametrize("in_features", [32, 96])
def test_bf16_steps_of_several_rows_on_amx_tiles(ops, out_features, in_features):
    assert ops.amx_rows_from() == amx_expected()  # on AMX hosts, rows 3-8 below run on tiles
    torch.manual_seed(out_features)
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
    for rows in (*range(1, 9), 17, 64):  # 17, 64: prefills (groups of 16 rows of x, the last one padded)
        if rows > 8 and not amx_expected():
            continue
        x = torch.randn(rows, in_features, dtype=torch.bfloat16)
        for bias in (None, torch.randn(out_features), torch.randn(out_features, dtype=torch.bfloat16)):
            expected = reference(x, weight, bias)
            tolerance = 2 * torch.finfo(torch.bfloat16).eps * expected.abs().max().item()
            assert (ops.linear_dense(x, weight, bias).float() - expected).abs().max().item() <= tolerance
    # oneDNN's own bf16 GEMMs (AMX where the CPU has it) in the same threads stay right after the tiles ran
    a = torch.randn(256, in_features, dtype=torch.bfloat16)
    expected = a.float() @ weight.float().t()
    assert ((a @ weight.t()).float() - expected).abs().max().item() <= 2 * 0.0079 * expected.abs().max().item()


def test_a_bad_amx_row_count_is_refused(ops, monkeypatch):
    from llmbench.errors import UserError

    for bad in ("three", "9", "-1"):
        monkeypatch.setenv("LLMBENCH_AMX_MIN_ROWS", bad)
        with pytest.raises(UserError, match="LLMBENCH_AMX_MIN_ROWS"):
            compile_settings.amx_min_rows_env()
    monkeypatch.setenv("LLMBENCH_AMX_MIN_ROWS", "0")
    assert compile_settings.amx_min_rows_env() == 0
    weight = torch.empty(16, 32)
    for bad in ("all", "65"):
        monkeypatch.setenv("LLMBENCH_AMX_MAX_ROWS", bad)
        with pytest.raises(UserError, match="LLMBENCH_AMX_MAX_ROWS"):
            compile_settings.amx_large_rows("bfloat16", weight)
    monkeypatch.setenv("LLMBENCH_AMX_MAX_ROWS", "8")  # decode steps only
    assert compile_settings.amx_large_rows("bfloat16", weight) == 0
    monkeypatch.delenv("LLMBENCH_AMX_MAX_ROWS")
    assert compile_settings.amx_large_rows("float32", weight) == 0
    assert compile_settings.amx_large_rows("bfloat16", torch.empty(24, 32)) == 0  # 24 rows: not whole tiles


def test_bf16_prefills_run_on_amx_tiles_and_let_go_of_their_outputs(ops):
    """Outside compiled steps (the prefill), bf16 linears of up to 64 rows run the kernels where the CPU has AMX or
    native bf16 without it (one call per fused group, its output dropped once each member has its part); where torch
    emulates bf16, the 512-bit kernels 64 rows a call; else the library's F.linear."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    parent = siblings(lambda out_features: torch.nn.Linear(128, out_features).to(torch.bfloat16))
    x = torch.randn(2, 20, 128, dtype=torch.bfloat16)  # 40 rows: a prompt, not a decode step
    expected = {name: reference(x, m.weight, m.bias) for name, m in parent.named_children()}
    cpu_kernels.use_kernel_linears(parent, cpu_kernels.MAX_ROWS)
    tiles = 64 if amx_expected() and os.environ.get("LLMBENCH_AMX_MAX_ROWS") is None else 0
    emulated = not tiles and compile_settings.emulated_gemm("bfloat16")  # 40 rows: float32 F.linear (below)
    wide = emulated and ops.wide_dense_built()  # 40 rows: the 512-bit kernels, in one call
    native = not tiles and "bfloat16" in native_prompt_kinds()  # avx512_bf16 without AMX: the kernels' vdpbf16ps
    assert parent.q_proj.forward.kernel.large_rows == (tiles or (EMULATED_WIDE_ROWS if wide else
                                                                 cpu_kernels.MAX_ROWS if emulated else
                                                                 NATIVE_PROMPT_ROWS["bfloat16"][0] if native else 0))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        outs = {name: getattr(parent, name)(x) for name in expected}
    calls = sum(e.count for e in prof.key_averages() if e.key == "llmbench_cpu::linear_dense")
    assert calls == (2 if tiles or native or wide else 0)  # q/k/v as one call, o_proj alone
    for name, out in outs.items():
        assert out.shape == expected[name].shape
        tolerance = 2 * torch.finfo(torch.bfloat16).eps * expected[name].abs().max().item()
        assert (out.float() - expected[name]).abs().max().item() <= tolerance, name
    assert parent.q_proj.forward.kernel._last is None  # all three members served: nothing held
    parent.q_proj(x)
    assert (parent.q_proj.forward.kernel._last is not None) == bool(tiles or wide or native)  # k, v: not yet theirs
    most = compile_settings.DENSE_CALL_MAX_ROWS  # the op's own limit (AMX tiles' too)
    with pytest.raises(RuntimeError, match=f"at most {most} rows"):
        ops.linear_dense(torch.randn(most + 1, 128, dtype=torch.bfloat16), parent.o_proj.weight, None)


def test_float32_prompts_take_the_kernels_where_the_library_gemm_is_slow(ops):
    """On AMD CPUs with the 512-bit kernels (MKL's sgemm took 1.4-4x their time there), float32 prompts of any
    length run the kernels (one call per fused group and 64 rows), the products of F.linear within float32 rounding;
    elsewhere the library's F.linear."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    parent = siblings(lambda out_features: torch.nn.Linear(128, out_features))
    kept = {name: (m.weight.detach().clone(), m.bias.detach().clone()) for name, m in parent.named_children()}
    cpu_kernels.use_kernel_linears(parent, cpu_kernels.MAX_ROWS)
    native = "float32" in native_prompt_kinds()
    assert native == (cpu_kernels.cpu_kind().amd and ops.wide_dense_built())
    most, chunk = NATIVE_PROMPT_ROWS["float32"]
    assert most == sys.maxsize  # any length
    for rows, calls in ((40, 2), (3 * chunk + 1, 8)):
        x = torch.randn(rows, 128)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            outs = {name: getattr(parent, name)(x) for name in kept}
        assert sum(e.count for e in prof.key_averages() if e.key == "llmbench_cpu::linear_dense") == \
            (calls if native else 0)
        for name, (weight, bias) in kept.items():
            expected = F.linear(x, weight, bias)
            assert (outs[name] - expected).abs().max() <= 1e-5 * expected.abs().max(), (rows, name)


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quantized_prefills_run_the_kernels_in_calls_of_many_rows(ops, scheme):
    """INT4 and INT8 prompts of up to quantized_prefill_rows (INT4: any; INT8 512 where the build has 16-row tiles and
    the CPU no AMX, else 128) take the kernels outside compiled steps (TorchAO's INT4 kernel is compute-bound),
    QUANTIZED_CHUNK rows a call, each row as it is alone; longer INT8 ones keep TorchAO's F.linear."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    parent = siblings(lambda out_features: quantized_linear(scheme, 32, in_features=128, out_features=out_features))
    alone = {name: cpu_kernels.kernel_call(module)[0] for name, module in parent.named_children()}
    cpu_kernels.use_kernel_linears(parent, cpu_kernels.MAX_ROWS)
    op = f"llmbench_cpu::linear_{scheme}{'_tiles' if scheme == 'int8' and ops.int8_tiles_built() else ''}"
    chunk = cpu_kernels.QUANTIZED_CHUNK
    most = cpu_kernels.quantized_prefill_rows(scheme)
    wide = ops.int8_tile_rows() == 16 and "amx_bf16" not in cpu_kernels.cpu_kind().flags
    assert most == (sys.maxsize if scheme == "int4" else 512 if wide else 128)
    cases = [(40, 2), (chunk + 3, 2 * 2)] if scheme == "int4" else [(40, 2), (most, 2 * -(-most // chunk)),
                                                                    (most + 1, 0)]
    for rows, calls in cases:  # calls: q/k/v as one, o_proj alone, per chunk
        x = torch.randn(rows, 128, dtype=torch.bfloat16)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            outs = {name: getattr(parent, name)(x) for name in alone}
        assert sum(e.count for e in prof.key_averages() if e.key == op) == calls, rows
        if calls:
            for name, call in alone.items():
                assert torch.equal(outs[name], torch.cat([call(row) for row in x.split(1)]))


EMULATED_PREFILL = """
import torch, torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from llmbench.backends import compile_settings, cpu_kernels
from llmbench.backends.kernel_linears import EMULATED_WIDE_ROWS
from tests.test_cpu_kernels import siblings
assert cpu_kernels.load() is None
built_wide = torch.ops.llmbench_cpu.wide_dense_built()  # 512-bit kernels: up to 256 rows, 64 a call
most, chunk = (EMULATED_WIDE_ROWS, compile_settings.DENSE_CALL_MAX_ROWS) if built_wide else (cpu_kernels.MAX_ROWS,) * 2
for dtype in (torch.bfloat16, torch.float16):
    assert compile_settings.emulated_gemm(str(dtype).removeprefix("torch."))
    torch.manual_seed(0)
    parent = siblings(lambda out_features: torch.nn.Linear(128, out_features).to(dtype))
    kept = {name: (m.weight.detach().clone(), m.bias.detach().clone()) for name, m in parent.named_children()}
    cpu_kernels.use_kernel_linears(parent, cpu_kernels.MAX_ROWS)
    assert parent.q_proj.forward.kernel.large_rows == most
    for rows, calls in ((chunk, 2), (40, 2 if built_wide else 0), (most, 2 * -(-most // chunk)), (most + 1, 0)):
        x = torch.randn(rows, 128, dtype=dtype)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            outs = {name: getattr(parent, name)(x) for name in kept}
        assert sum(e.count for e in prof.key_averages() if e.key == "llmbench_cpu::linear_dense") == calls
        for name, (weight, bias) in kept.items():
            wide = F.linear(x.float(), weight.float(), bias.float())
            assert outs[name].dtype == dtype
            if not calls:  # exactly torch's float32 product, rounded once
                assert torch.equal(outs[name], wide.to(dtype)), (dtype, rows, name)
            assert (outs[name].float() - wide).abs().max() <= 4 * torch.finfo(dtype).eps * wide.abs().max()
print("ok")
"""


def test_emulated_16_bit_prefills_take_the_kernels_or_float32(ops):
    """Where torch has no native bf16/fp16 GEMM (oneDNN held to AVX2 here, as on CPUs without avx512_bf16/fp16),
    16-bit prompts run the kernels (one call per fused group; with the 512-bit kernels up to EMULATED_WIDE_ROWS rows
    in calls of DENSE_CALL_MAX_ROWS, else up to MAX_ROWS in one) and longer ones F.linear in float32, not torch's
    emulated 16-bit GEMM."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "LLMBENCH_AMX_MAX_ROWS": "0", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", EMULATED_PREFILL], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
