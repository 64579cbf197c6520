"""The CPU kernels' ops as inductor's C++ wrapper calls them in a compiled graph: through their C entries
(cpu_gemv_entries.h, declared by compile_settings.direct_entries from the ops' schemas), with the outputs the
dispatcher's calls give, recorded for torch.profiler under the ops' names; without the entries, through the
dispatcher."""

import pickle

import pytest
import torch
from torch._inductor.utils import run_and_get_cpp_code
from torch.profiler import ProfilerActivity, profile

from llmbench.backends import cpu_kernels, int4_layout
from llmbench.backends.compile_settings import ENTRY_OPS, direct_entries


def calls(ops) -> dict:
    """{op: (a function calling it, its tensor inputs)}: every op with a C entry that this build runs."""
    torch.manual_seed(0)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    bias = torch.randn(48, dtype=torch.bfloat16)
    q4 = int4_layout.int4_rows(torch.randint(0, 16, (48, 64)), torch.rand(48, 2), torch.rand(48, 2),
                               ops.int4_tile_rows())
    qdata, scale = torch.randint(-128, 128, (48, 64), dtype=torch.int8), torch.rand(48, 2) / 64
    out = {
        # act 1: SiLU of the first half times the second, and a bias
        "linear_dense": (lambda x, w, b: ops.linear_dense(x, w, b, 1), (x, torch.randn(48, 64, dtype=x.dtype), bias)),
        "linear_int8": (lambda x, q, s: ops.linear_int8(x, q, s, None), (x, qdata, scale)),
        "linear_int4": (lambda x, p, b: ops.linear_int4(x, p, 32, q4[1], b), (x, q4[0], bias)),
        "argmax_rows": (lambda s, b: ops.argmax_rows(s, b), (torch.randn(4, 100), torch.zeros(100))),
        "decode_attention": (lambda q, k, v, m: ops.decode_attention(q, k, v, m, 0.125),
                             (torch.randn(2, 4, 1, 64), torch.randn(2, 2, 10, 64), torch.randn(2, 2, 10, 64),
                              torch.arange(10).expand(2, 1, 1, 10) < torch.tensor([6, 10]).view(2, 1, 1, 1))),
    }
    if ops.int8_tiles_built():  # AVX2 builds
        out["linear_int8_tiles"] = (lambda x, p: ops.linear_int8_tiles(x, p, 2, None),
                                    (x, cpu_kernels.int8_tiles(qdata, scale)))
    return out


def compiled_call(fn, inputs, entries):
    """fn compiled as the compile backend compiles a cpu step's graph (C++ wrapper) -> (outputs, C++ code)."""
    torch._dynamo.reset()
    step = torch.compile(fn, fullgraph=True, dynamic=False,
                         options={"cpp_wrapper": True, "aot_inductor.custom_ops_to_c_shims": entries})
    return step, *run_and_get_cpp_code(step, *inputs)


@pytest.mark.parametrize("name", ENTRY_OPS)
def test_each_op_is_called_through_its_c_entry_with_the_dispatchers_outputs(ops, name):
    entries = direct_entries()
    assert sorted(op.name() for op in entries) == sorted(f"llmbench_cpu::{op}" for op in ENTRY_OPS)
    cases = calls(ops)
    if name not in cases:
        assert name == "linear_int8_tiles" and not ops.int8_tiles_built()
        return
    fn, inputs = cases[name]
    expected = fn(*inputs)
    step, out, code = compiled_call(fn, inputs, entries)
    assert f"aoti_torch_cpu_{name}(" in code and "aoti_torch_call_dispatcher" not in code
    assert torch.equal(out, expected)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(*inputs)
    assert sum(e.count for e in prof.key_averages() if e.key == f"llmbench_cpu::{name}") == 1


def test_without_the_entries_the_dispatcher_calls_the_op(ops, monkeypatch):
    monkeypatch.setenv("LLMBENCH_DIRECT_OPS", "0")
    assert direct_entries() == {}
    fn, inputs = calls(ops)["linear_int4"]
    _, out, code = compiled_call(fn, inputs, direct_entries())
    assert "aoti_torch_call_dispatcher" in code and "aoti_torch_cpu_linear_int4(" not in code
    assert torch.equal(out, fn(*inputs))


def test_the_entries_pickle_by_the_ops_names_for_inductors_cache_key(ops):
    entries = direct_entries()
    assert pickle.loads(pickle.dumps(entries)) == {str(op): declarations for op, declarations in entries.items()}
