"""The weight-streaming CPU kernels (llmbench/backends/cpu_gemv.cpp), built for this host: every weight kind and row
count against torch's own linear, TorchAO's INT4 weights repacked with exactly their values, and bad calls refused."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmbench.backends import cpu_kernels, generated_kernels, huge_pages, int4_layout
from llmbench.backends.compile_settings import DENSE_CALL_MAX_ROWS, dedupe_pass
from llmbench.backends.huge_pages import HugePageArena


def reference(x, weight, bias):
    out = x.float() @ weight.float().t()
    return out + bias.float() if bias is not None else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 5, 8, 19])  # 19: passes of 8 over each block (a decode step's batch x beams)
# 72: not a multiple of 16, the 16-a-step paths' condition; 80: 16 more than whole lines (pair_stream's last step);
# 96: three steps of 32 bf16 values (two_chains' last step in one chain)
@pytest.mark.parametrize("in_features", [64, 72, 80, 96])
def test_dense_equals_linear(ops, dtype, rows, in_features, out_features=37):
    """37 weight rows: a last block of one row; fewer than the threads' blocks: threads with nothing to do."""
    torch.manual_seed(rows)
    weight = torch.randn(out_features, in_features).to(dtype)
    bias = torch.randn(out_features).to(dtype)
    x = torch.randn(rows, 1, in_features).to(dtype)
    out = ops.linear_dense(x, weight, bias)
    assert out.shape == (rows, 1, out_features) and out.dtype == dtype
    expected = reference(x, weight, bias)
    # float32 accumulation in another order, then one rounding to the output dtype
    tolerance = 1e-4 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * expected.abs().max().item()
    assert (out.float() - expected).abs().max().item() <= tolerance
    without_bias = ops.linear_dense(x, weight, None).float()
    assert (without_bias - reference(x, weight, None)).abs().max().item() <= tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dense_rows_of_x_of_calls_of_every_size_in_turn(ops, dtype):
    """Five or more rows of x are copied, per thread, into a buffer that the next calls reuse (cpu_gemv_avx512.h's
    packed_rows): calls that need more than the last one, then less, each against torch's linear; 200 weight rows,
    enough for every thread to take blocks."""
    torch.manual_seed(1)
    for rows, in_features in [(5, 64), (32, 576), (8, 96), (19, 1536), (6, 576)]:
        weight = torch.randn(200, in_features).to(dtype)
        x = torch.randn(rows, in_features).to(dtype)
        expected = reference(x, weight, None)
        tolerance = 1e-3 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * expected.abs().max().item()
        error = (ops.linear_dense(x, weight, None).float() - expected).abs().max().item()
        assert error <= tolerance, (rows, in_features)


def quantized_linear(scheme: str, group_size: int | None, in_features=128, out_features=40, dtype=torch.bfloat16):
    from torchao.quantization import quantize_

    from llmbench.quantize import torchao_config

    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=True).to(dtype)
    quantize_(linear, torchao_config(scheme, group_size, torch.device("cpu")))
    return linear


def dequantize_rows(rows, value_bytes, in_features, group_size, tile_rows):
    """The kernel layout's weights in float32: per tile of t rows (tile_rows, the last 8 where the rows are not a
    multiple of tile_rows) their groups' scales as [group][row], their zeros the same way, padding, then per 32
    weights four vectors of 4 t bytes, whose 4-byte lane r holds row r's weights 8j..8j+3 (low nibbles) and
    8j+4..8j+7 (high nibbles) of vector j; w = (q - 8) * scale + zero."""
    wide = rows.shape[0] - rows.shape[0] % tile_rows
    parts = [(rows[:wide], tile_rows), (rows[wide:], 8)]
    return torch.cat([dequantize_tiles(part, t, value_bytes, in_features, group_size)
                      for part, t in parts if len(part)])


def dequantize_tiles(rows, t, value_bytes, in_features, group_size):
    n, groups = rows.shape[0], in_features // group_size
    dtype = {2: torch.bfloat16, 4: torch.float32}[value_bytes]
    tiles = rows.reshape(n // t, -1)
    size = t * groups * value_bytes
    scale = tiles[:, :size].contiguous().view(dtype).float().reshape(n // t, groups, t).transpose(1, 2)
    zero = tiles[:, size:2 * size].contiguous().view(dtype).float().reshape(n // t, groups, t).transpose(1, 2)
    vectors = tiles[:, -in_features * t // 2:].reshape(n // t, in_features // 32, 4, t, 4)  # tile, block, j, row, byte
    q = torch.cat([vectors & 15, vectors >> 4], dim=-1)  # tile, block, j, row, 8 weights
    q = q.permute(0, 3, 1, 2, 4).reshape(n, groups, group_size).float()
    scale, zero = scale.reshape(n, groups), zero.reshape(n, groups)
    return ((q - 8) * scale[..., None] + zero[..., None]).reshape(n, in_features)


# 256 and 320 inputs in groups of 32: 8 and 10 groups (the offset term's eight-at-a-time loop, and its tail);
# bfloat16 models keep bfloat16 scales and zeros, float32 ones float32
@pytest.mark.parametrize("group_size, in_features, dtype", [
    (32, 256, torch.bfloat16), (32, 320, torch.bfloat16), (64, 256, torch.bfloat16), (128, 256, torch.bfloat16),
    (32, 320, torch.float32), (128, 256, torch.float32)])
def test_int4_repacks_torchao_exactly_and_computes_its_linear(ops, group_size, in_features, dtype):
    linear = quantized_linear("int4", group_size, in_features=in_features, out_features=48, dtype=dtype)
    rows, (size, value_bytes) = int4_layout.int4_from_torchao(linear.weight, ops.int4_tile_rows())
    assert size == group_size and value_bytes == dtype.itemsize and rows.dtype == torch.uint8
    meta_bytes = 2 * (in_features // group_size) * value_bytes
    assert rows.shape == (48, in_features // 2 + meta_bytes + -meta_bytes % 32) and rows.shape[1] % 32 == 0
    # TorchAO's own kernel on an identity matrix gives its dequantized weight: the repacked values are the same
    # (up to float32 rounding in another order of operations)
    torchao_weight = torch.ops.aten._weight_int4pack_mm_for_cpu(
        torch.eye(in_features), linear.weight.qdata, group_size, linear.weight.scale_and_zero.float()).t()
    assert torch.allclose(dequantize_rows(rows, value_bytes, in_features, group_size, ops.int4_tile_rows()),
                          torchao_weight, rtol=1e-6, atol=1e-7)
    call, kind = cpu_kernels.kernel_call(linear)
    assert kind == "int4"
    x = torch.randn(3, in_features).to(dtype)
    expected = reference(x, torchao_weight, linear.bias)
    # x is quantized to int8 per 32 values on AVX2 CPUs (its step is 1/127 of each block's largest value): within
    # 3% of the largest output, where a wrong nibble, scale or zero is off by tens of percent
    assert (call(x).float() - expected).abs().max().item() <= 0.03 * expected.abs().max().item()


@pytest.mark.parametrize("meta", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("x_rows", [1, 5, 8, 13, 64])
def test_int4_tiles_of_any_rows_of_x(ops, meta, x_rows):
    """56 outputs: seven tiles of eight rows (or, where the build's tiles have 16, three of 16 and one of 8), shared
    out among threads in whole tiles; more than 8 rows of x (prompts) 8 at a time over each tile, every row as it is
    alone."""
    torch.manual_seed(x_rows)
    q = torch.randint(0, 16, (56, 192))
    scale, zero = torch.rand(56, 6).to(meta) / 8, torch.randn(56, 6).to(meta) / 4
    rows, value_bytes = int4_layout.int4_rows(q, scale, zero, ops.int4_tile_rows())
    weight = dequantize_rows(rows, value_bytes, 192, 32, ops.int4_tile_rows())
    expected_weight = (q.view(56, 6, 32) - 8) * scale.float()[..., None] + zero.float()[..., None]
    assert torch.equal(weight, expected_weight.view(56, 192))
    x = torch.randn(x_rows, 192)
    expected = reference(x, weight, None)
    out = ops.linear_int4(x, rows, 32, value_bytes, None)
    assert (out - expected).abs().max().item() <= 0.03 * expected.abs().max().item()
    alone = torch.cat([ops.linear_int4(row, rows, 32, value_bytes, None) for row in x.split(1)])
    assert torch.equal(out, alone)


def test_int4_layout_takes_whole_tiles_only(ops):
    with pytest.raises(ValueError, match="8 rows of a multiple of 32 weights, not 47 rows of 192"):
        int4_layout.int4_rows(torch.zeros(47, 192, dtype=torch.long), torch.ones(47, 6), torch.zeros(47, 6), 16)
    with pytest.raises(ValueError, match="INT4 tiles have 8 or 16 rows, not 12"):
        int4_layout.int4_rows(torch.zeros(48, 192, dtype=torch.long), torch.ones(48, 6), torch.zeros(48, 6), 12)
    with pytest.raises(RuntimeError, match="output size must be a multiple of 8, got 4"):
        ops.linear_int4(torch.randn(1, 64), torch.zeros(4, 64, dtype=torch.uint8), 32, 2, None)


def test_linear_work_switch_zeros_every_kernel_linear_until_switched_back(ops):
    """benchmarks/step_split.py's switch: off, every kernel linear returns zeros of its output's shape and dtype
    without reading its weights; on again, the same outputs as before; the switch returns its previous state."""
    torch.manual_seed(0)
    x = torch.randn(3, 1, 64, dtype=torch.bfloat16)
    dense = torch.randn(40, 64, dtype=torch.bfloat16)
    int4, value_bytes = int4_layout.int4_rows(torch.randint(0, 16, (40, 64)), torch.rand(40, 2), torch.rand(40, 2),
                                              ops.int4_tile_rows())
    int8 = quantized_linear("int8", None, in_features=64)
    calls = [lambda: ops.linear_dense(x, dense, None), lambda: ops.linear_int4(x, int4, 32, value_bytes, None),
             lambda: int8(x)]
    cpu_kernels.use_kernel_linears(int8, cpu_kernels.MAX_ROWS)
    before = [call() for call in calls]
    assert all(out.abs().sum() > 0 for out in before)
    try:
        assert ops.set_linear_work(False) is True
        for call, out in zip(calls, before):
            off = call()
            assert off.shape == out.shape and off.dtype == out.dtype and not off.any()
    finally:
        assert ops.set_linear_work(True) is False
    assert all(torch.equal(call(), out) for call, out in zip(calls, before))


def siblings(make) -> torch.nn.Module:
    parent = torch.nn.Module()
    for name, out_features in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32), ("o_proj", 128)):
        setattr(parent, name, make(out_features))
    return parent


@pytest.mark.parametrize("scheme", ["int4", "int8", "float32"])
def test_siblings_share_one_kernel_call_with_the_same_outputs(ops, scheme):
    def make(out_features):
        if scheme == "float32":
            return torch.nn.Linear(128, out_features)
        return quantized_linear(scheme, 32, in_features=128, out_features=out_features)

    torch.manual_seed(0)
    parent = siblings(make)
    x = torch.randn(5, 128).to(next(parent.parameters()).dtype)
    alone = {name: cpu_kernels.kernel_call(module)[0] for name, module in parent.named_children()}
    expected = {name: torch.cat([call(chunk) for chunk in x.split(cpu_kernels.MAX_ROWS)])
                for name, call in alone.items()}
    counts = cpu_kernels.use_kernel_linears(parent, cpu_kernels.MAX_ROWS)
    assert counts == {scheme: 4, "fused groups": 1}
    if scheme == "float32":  # q/k/v now slices of one concatenated weight: no second copy
        bases = {parent.q_proj.weight.untyped_storage().data_ptr(), parent.v_proj.weight.untyped_storage().data_ptr()}
        assert len(bases) == 1
    assert cpu_kernels.score_with_kernels(parent)
    for name in alone:
        assert torch.equal(getattr(parent, name)(x), expected[name]), name


@pytest.mark.parametrize("sizes", [(64, 32, 40), (64, 40, 40)])
def test_int4_siblings_fuse_where_only_the_last_ends_in_a_short_tile(ops, monkeypatch, sizes):
    """With 16-row INT4 tiles a member of 40 rows ends in a tile of 8, which the kernel takes only at the end of a
    call's rows: q/k/v fuse where only v_proj does (every build), stay three calls where k_proj does (8-row builds
    fuse them); the outputs are each member's alone either way. (TorchAO packs only multiples of 16 rows, so the
    members' INT4 weights are packed here directly.)"""
    torch.manual_seed(0)
    parent, packed = torch.nn.Module(), {}
    for name, out_features in zip(("q_proj", "k_proj", "v_proj"), sizes):
        setattr(parent, name, torch.nn.Linear(128, out_features, bias=False).to(torch.bfloat16))
        scale = torch.rand(out_features, 4, dtype=torch.bfloat16) / 8
        packed[out_features, name] = int4_layout.int4_rows(torch.randint(0, 16, (out_features, 128)), scale, scale,
                                                           ops.int4_tile_rows())[0]
    monkeypatch.setattr(cpu_kernels, "kernel_parts", lambda m: ("int4", (packed[m.out_features, next(
        n for n, c in parent.named_children() if c is m)],), (32, 2)))
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    expected = {name: ops.linear_int4(x, packed[n, name], 32, 2, None) for (n, name) in packed}
    counts = cpu_kernels.use_kernel_linears(parent, cpu_kernels.MAX_ROWS)
    fused = sizes[1] % ops.int4_tile_rows() == 0
    assert counts == {"int4": 3, **({"fused groups": 1} if fused else {})}
    for name in expected:
        assert torch.equal(getattr(parent, name)(x), expected[name]), name


@pytest.mark.parametrize("scheme", ["int4", "int8", "bfloat16"])
def test_kernel_weights_move_into_huge_page_slabs_with_the_same_outputs(ops, scheme):
    def make(out_features):
        if scheme == "bfloat16":
            return torch.nn.Linear(128, out_features).to(torch.bfloat16)
        return quantized_linear(scheme, 32, in_features=128, out_features=out_features)

    torch.manual_seed(0)
    parent = siblings(make)
    x = torch.randn(3, 128).to(next(parent.parameters()).dtype)
    expected = {name: cpu_kernels.kernel_call(module)[0](x) for name, module in parent.named_children()}
    arena = HugePageArena(slab_bytes=4 << 20)
    cpu_kernels.use_kernel_linears(parent, cpu_kernels.MAX_ROWS, arena)
    assert len(arena.slabs) == 1 and arena.placed_bytes > 0
    start, end = arena.slabs[0].data_ptr(), arena.slabs[0].data_ptr() + arena.slabs[0].numel()
    read = [cell.cell_contents for m in parent.children() for cell in m.forward.kernel.call.__closure__
            if isinstance(cell.cell_contents, torch.Tensor)]  # the tensors each op call reads
    assert read and all(start <= t.data_ptr() < end and t.data_ptr() % 64 == 0 for t in read)
    if scheme == "bfloat16":  # the modules' own weights are the kernels' copies (no second copy)
        assert all(start <= m.weight.data_ptr() < end for m in parent.children())
    assert cpu_kernels.score_with_kernels(parent)
    for name, want in expected.items():
        assert torch.equal(getattr(parent, name)(x), want), name
    if huge_pages.thp_mode() in ("always", "madvise"):  # the kernel may back the slab with huge pages
        assert arena.describe().endswith("madvised for huge pages")
        eligible, inside, first_placed = None, False, min(t.data_ptr() for t in read)  # the advised part
        for line in Path("/proc/self/smaps").read_text().splitlines():
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header: its address range
                low, high = (int(v, 16) for v in first.split("-"))
                inside = low <= first_placed < high
            elif inside and first == "THPeligible:":
                eligible = line.split()[1]
        assert eligible in (None, "1")  # None: a kernel too old to say


def test_dedupe_pass_keeps_one_of_identical_kernel_calls(ops):
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(x, weight):  # as in inductor's graphs: ops by overload, the weight one input
        a = torch.ops.llmbench_cpu.linear_dense(x, weight, None)
        b = torch.ops.llmbench_cpu.linear_dense(x, weight, None)
        c = torch.ops.llmbench_cpu.linear_dense(x + 1, weight, None)
        return a[..., :8] + b[..., 8:] + c[..., :8]

    module = make_fx(step)(torch.randn(1, 64), torch.randn(16, 64))
    graph = module.graph
    assert sum(n.op == "call_function" and "llmbench_cpu" in str(n.target) for n in graph.nodes) == 3
    dedupe_pass()(graph)
    calls = [n for n in graph.nodes if n.op == "call_function" and "llmbench_cpu" in str(n.target)]
    assert len(calls) == 2


def test_bad_calls_are_refused(ops):
    weight = torch.randn(8, 64)
    # the op's limit (cpu_gemv.cpp's kDenseMaxRows), the one compiled steps and prompts are built for (INT4/8: any)
    with pytest.raises(RuntimeError, match=f"at most {DENSE_CALL_MAX_ROWS} rows"):
        ops.linear_dense(torch.randn(DENSE_CALL_MAX_ROWS + 1, 64), weight, None)
    with pytest.raises(RuntimeError, match="input size 32 != weight input size 64"):
        ops.linear_dense(torch.randn(1, 32), weight, None)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ops.linear_dense(torch.randn(1, 64), weight.double(), None)
    with pytest.raises(RuntimeError, match="a packed row of 40 bytes is not 32 weight bytes after 32 bytes"):
        ops.linear_int4(torch.randn(1, 64), torch.zeros(8, 40, dtype=torch.uint8), 32, 2, None)
    with pytest.raises(RuntimeError, match="not 3 bytes"):
        ops.linear_int4(torch.randn(1, 64), torch.zeros(8, 64, dtype=torch.uint8), 32, 3, None)
    if ops.int8_tiles_built():
        with pytest.raises(RuntimeError, match="a packed row of 64 bytes is not 64 weights after 1 float32 scales"):
            ops.linear_int8_tiles(torch.randn(1, 64), torch.zeros(8, 64, dtype=torch.uint8), 1, None)


def test_the_host_build_says_whether_it_has_the_512_bit_paths(ops):
    assert cpu_kernels.wide_build() == ("avx512f" in cpu_kernels.cpu_kind().flags)


def test_layers_the_kernels_cannot_take_keep_their_forward():
    odd = torch.nn.Linear(30, 8)  # input size not a multiple of 8
    assert cpu_kernels.kernel_call(odd) == (None, "input size not a multiple of 8")


AMD_BUILD = ["-DLLMBENCH_PREFETCH_LOCALITY=1", "-DLLMBENCH_TILE_PREFETCH_LOCALITY=0",
             "-DLLMBENCH_WIDE_TILE_PREFETCH_LOCALITY=1", "-DLLMBENCH_PREFETCH_TILES=1",
             "-DLLMBENCH_NEXT_PASS_PREFETCH=1", "-DLLMBENCH_EVEN_SPLIT_ROWS=8", "-DLLMBENCH_ONE_ROW_STREAMS=1"]


@pytest.mark.parametrize("model_name, family, flags, hint, build", [
    ("AMD EPYC 7B13", 25, "avx2 fma", "t2, next pass t0, tiles nta 1 ahead", AMD_BUILD),
    ("AMD EPYC", 25, "avx2 fma avx512f avx512_bf16", "t2, next pass t0, tiles nta 1 ahead", AMD_BUILD),
    ("AMD EPYC", None, "avx2 fma avx512f avx512_bf16", "t2, next pass t0, tiles nta 1 ahead", AMD_BUILD),
    ("AMD EPYC", 26, "avx2 fma avx512f avx512_bf16", "t2, next pass t0, tiles nta 1 ahead, 16-row INT4 tiles t0",
     [f.replace("WIDE_TILE_PREFETCH_LOCALITY=1", "WIDE_TILE_PREFETCH_LOCALITY=3") for f in AMD_BUILD]
     + ["-DLLMBENCH_HALF_STREAM_ROWS=2"]),
    ("Intel(R) Xeon(R) Platinum 8481C", 6, "avx2 fma", "t0, tiles t2",
     ["-DLLMBENCH_PREFETCH_LOCALITY=3", "-DLLMBENCH_TILE_PREFETCH_LOCALITY=1", "-DLLMBENCH_EVEN_SPLIT_ROWS=8"])])
def test_prefetch_schedule_and_one_row_choice_follow_the_cpu_kind(monkeypatch, model_name, family, flags, hint,
                                                                  build):
    """Per vendor, and for AMD per family (from 26, INT4's 16-row tiles prefetched to every level and fp16 streams up
    to 2 rows of x; a cpuinfo without the family keeps the earlier choices)."""
    from llmbench.host import parse_cpuinfo

    generation = f"cpu family : {family}\nmodel : 2\n" if family else ""
    monkeypatch.setattr(cpu_kernels, "cpu_kind", lambda: parse_cpuinfo(f"model name : {model_name}\n{generation}"
                                                                       f"flags : {flags}"))
    monkeypatch.delenv("LLMBENCH_ONE_ROW_DENSE", raising=False)
    assert cpu_kernels.prefetch_hint() == hint
    assert cpu_kernels.build_flags() == build
    assert cpu_kernels.schedule() == ("even shares, one-row streams" if "AMD" in model_name else "even shares")
    for wide in (False, True):  # the kernels' build: 256-bit or 512-bit paths
        monkeypatch.setattr(cpu_kernels, "wide_build", lambda: wide)
        # Intel: the kernels; AMD: for bf16, fp16 built without AVX-512 or from family 26, float32 built with it
        fp16 = not wide or (family or 0) >= 26
        for dtype, amd_kernels in ((torch.bfloat16, True), (torch.float16, fp16), (torch.float32, wide)):
            assert cpu_kernels.dense_one_row_kernels(dtype) == ("AMD" not in model_name or amd_kernels)
    monkeypatch.setenv("LLMBENCH_ONE_ROW_DENSE", "reductions")
    assert not cpu_kernels.dense_one_row_kernels(torch.bfloat16)
    monkeypatch.setenv("LLMBENCH_ONE_ROW_DENSE", "kernels")
    assert cpu_kernels.dense_one_row_kernels(torch.float32)
    monkeypatch.setenv("LLMBENCH_ONE_ROW_DENSE", "fast")
    from llmbench.errors import UserError

    with pytest.raises(UserError, match="use kernels or reductions"):
        cpu_kernels.dense_one_row_kernels(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# (16, 12, 2): six query heads a cached head, and enough rows that each thread takes whole cached heads
@pytest.mark.parametrize("rows, heads, kv_heads", [(1, 9, 3), (8, 4, 4), (3, 8, 2), (16, 12, 2)])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("dim", [64, 128, 40])  # 64, 128: the vector path where the CPU has it; 40: portable loops
# 40 positions: on one thread (llmbench_cpu's serial_work); 300: rows' positions in parts on several, merged
@pytest.mark.parametrize("length", [40, 300])
def test_decode_attention_equals_sdpa_over_a_static_cache(ops, dtype, rows, heads, kv_heads, mask_kind, dim, length):
    """One query position per row against a static cache, of which each row sees its own first positions (the rest
    is the cache's unused tail, or left padding in row 0); grouped-query heads share a cached head."""
    torch.manual_seed(rows + heads)
    query = torch.randn(rows, 1, heads, dim).to(dtype).transpose(1, 2)  # (rows, heads, 1, dim) as a strided view
    key, value = (torch.randn(rows, kv_heads, length, dim).to(dtype) for _ in range(2))
    keep = torch.zeros(rows, 1, 1, length + 3, dtype=torch.bool)  # longer than the cache, as transformers' may be
    for r in range(rows):
        keep[r, ..., 2 * (r == 0): length // 2 + r] = True
    mask = keep if mask_kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    out = ops.decode_attention(query, key, value, mask, 0.125)
    group = heads // kv_heads
    expected = F.scaled_dot_product_attention(
        query.float(), key.float().repeat_interleave(group, 1), value.float().repeat_interleave(group, 1),
        attn_mask=keep[..., :length], scale=0.125).transpose(1, 2)
    assert out.shape == (rows, 1, heads, dim) and out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)
    with pytest.raises(RuntimeError, match="key/value heads must divide"):
        ops.decode_attention(query, key[:, :1].expand(rows, 5, length, dim), value[:, :1].expand(rows, 5, length, dim),
                             mask, 0.125)
    with pytest.raises(RuntimeError, match="bool or float32"):
        ops.decode_attention(query, key, value, mask.to(torch.int32), 0.125)


def test_attention_kernel_choice_follows_its_switch_and_the_head_size(ops, monkeypatch):
    from llmbench.errors import UserError

    monkeypatch.delenv("LLMBENCH_CPU_KERNELS", raising=False)
    monkeypatch.setenv("LLMBENCH_ATTENTION_KERNEL", "1")
    vectorized = ops.attention_vectorized()
    flags = cpu_kernels.cpu_kind().flags  # a vector path for AVX-512, and for AVX2 with FMA and F16C
    assert vectorized == ("avx512f" in flags or {"avx2", "fma", "f16c"} <= flags)
    assert cpu_kernels.attention_vectorized() == vectorized
    assert generated_kernels.attention_kernel(64, vectorized) == vectorized
    assert not generated_kernels.attention_kernel(40, True)  # portable loops: inductor's form stays
    monkeypatch.setenv("LLMBENCH_CPU_KERNELS", "0")  # none of the suite's kernels
    assert not cpu_kernels.attention_vectorized()
    monkeypatch.setenv("LLMBENCH_ATTENTION_KERNEL", "0")
    assert not generated_kernels.attention_kernel(64, True)
    monkeypatch.setenv("LLMBENCH_ATTENTION_KERNEL", "fast")
    with pytest.raises(UserError, match="use 1 .* or 0"):
        generated_kernels.attention_kernel(64, True)
