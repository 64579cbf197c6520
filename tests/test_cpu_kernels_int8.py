"""The CPU kernels' INT8 linears (llmbench/backends/cpu_gemv_int8.h): TorchAO's int8 weights as stored and as tiles
of 8 or 16 rows, against x quantized to int8 per 32 values, and the choice between the two."""

import pytest
import torch
import torch.nn.functional as F

from llmbench.backends import cpu_kernels
from tests.test_cpu_kernels import quantized_linear, reference


@pytest.mark.parametrize("group_size", [None, 32])
def test_int8_equals_torchao(ops, group_size):
    linear = quantized_linear("int8", group_size)
    call, kind = cpu_kernels.kernel_call(linear)
    assert kind == "int8"
    x = torch.randn(3, 128).to(torch.bfloat16)
    expected = F.linear(x, linear.weight, linear.bias).float()
    assert (call(x).float() - expected).abs().max().item() <= 0.02 * expected.abs().max().item()


def int8_expected(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What the INT8 kernel computes on AVX2 CPUs: x quantized to int8 per 32 values (d = max |x| / 127, q = x / d
    rounded to nearest even), exact integer dot products per block, then d and the weight's per-group scale."""
    rows, k = x.shape
    blocks = x.float().reshape(rows, k // 32, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(blocks * torch.where(d > 0, 1 / d, 0)).double()
    ints = torch.einsum("mbt,nbt->mnb", xq, q.double().reshape(q.shape[0], k // 32, 32))  # exact in float64
    per_block = ints * d.double().squeeze(-1)[:, None, :]
    group_blocks = k // 32 // scale.shape[1]
    return (per_block.reshape(rows, q.shape[0], scale.shape[1], group_blocks).sum(-1) * scale.double()).sum(-1)


def check_int8_integer_path(ops) -> None:
    """Both INT8 kernels (rows as stored; tiles of eight rows where the build has AVX2) equal int8_expected, per row
    or group, for 1 to 8 rows of x (decode steps) and more (prompts), weights -128..127, and each row of x gives what
    it gives alone."""
    for rows, group_size in ((1, None), (3, 32), (8, 64), (5, None), (13, 32), (64, None)):
        torch.manual_seed(rows)
        q = torch.randint(-128, 128, (44, 256), dtype=torch.int8)  # 44 rows: a last block of fewer than four
        scale = torch.rand(44, 256 // group_size if group_size else 1) / 64
        x = torch.randn(rows, 256)
        x[0, :32] = 0  # an all-zero block (d = 0)
        expected = int8_expected(x, q, scale)
        calls = [(44, lambda v: ops.linear_int8(v, q, scale, None))]
        if ops.int8_tiles_built():  # whole tiles: the first 40 rows
            tiles = cpu_kernels.int8_tiles(q[:40], scale[:40])
            calls.append((40, lambda v: ops.linear_int8_tiles(v, tiles, scale.shape[1], None)))
        for n, call in calls:
            out = call(x)
            assert torch.allclose(out.double(), expected[:, :n], rtol=1e-5, atol=1e-5 * expected.abs().max().item()), \
                (rows, group_size, n)
            assert torch.equal(out, torch.cat([call(row) for row in x.split(1)]))


def test_int8_is_an_integer_dot_product_of_x_quantized_per_32_values(ops):
    if "avx2" not in cpu_kernels.cpu_kind().flags:  # the kernel widens weights to float32 instead
        x, q, scale = torch.randn(3, 256), torch.randint(-128, 128, (44, 256), dtype=torch.int8), torch.rand(44, 1)
        assert torch.allclose(ops.linear_int8(x, q, scale, None), reference(x, q.float() * scale, None), rtol=1e-4)
        return
    check_int8_integer_path(ops)


def unpack_int8_tiles(packed: torch.Tensor, groups: int, tile_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(qdata, scale) back from int8_tiles' layout: tiles of tile_rows rows, the last 8 where the rows are an odd
    multiple of 8; each tile's scales as [group][row], then per 32 weights eight vectors whose 4-byte lane r holds four
    of row r's weights."""
    n, k = packed.shape[0], packed.shape[1] - 4 * groups
    qs, scales, start = [], [], 0
    while start < n:
        t = tile_rows if n - start >= tile_rows else 8
        tile = packed[start:start + t].reshape(t * (4 * groups + k))
        scales.append(tile[:4 * t * groups].view(torch.float32).reshape(groups, t).T)
        qs.append(tile[4 * t * groups:].view(torch.int8).reshape(k // 32, 8, t, 4).permute(2, 0, 1, 3).reshape(t, k))
        start += t
    return torch.cat(qs), torch.cat(scales)


@pytest.mark.parametrize("tile_rows", [8, 16])
def test_int8_tiles_hold_torchaos_values(tile_rows):
    """Tiles of 8 or 16 rows hold the weights and scales as given (40 rows: in 16-row tiles, a last tile of 8; 8 rows:
    only that one), per row or per group, the scales a slice of a wider tensor or not."""
    for rows, groups, sliced in ((40, 2, False), (8, 2, False), (40, 1, True), (40, 2, True)):
        q = torch.randint(-128, 128, (rows, 128), dtype=torch.int8)
        scale = torch.rand(rows, 4)[:, :groups] if sliced else torch.rand(rows, groups)
        packed = cpu_kernels.int8_tiles(q, scale, tile_rows)
        assert packed.shape == (rows, 4 * groups + 128) and packed.dtype == torch.uint8
        assert all(torch.equal(a, b) for a, b in zip(unpack_int8_tiles(packed, groups, tile_rows), (q, scale)))
        if tile_rows == 16 and rows == 40:  # the 16-row layout differs from the 8-row one
            assert not torch.equal(packed, cpu_kernels.int8_tiles(q, scale, 8))


def test_int8_weights_run_as_tiles_where_the_build_and_shapes_allow(ops, monkeypatch):
    """Whole tiles of eight rows in groups of a multiple of 32 weights take the tiles of the build's size
    (int8_tile_rows: 16 where AVX-512 VNNI is built in, else 8; their values exactly TorchAO's); LLMBENCH_INT8_TILES=0,
    or rows that are not whole tiles, keep the weights as stored."""
    linear = quantized_linear("int8", None)
    qdata, scale = cpu_kernels._int8_parts(linear.weight)
    kind, tensors, groups = cpu_kernels.kernel_parts(linear)
    if not ops.int8_tiles_built():
        assert (kind, groups) == ("int8", 0)
        return
    wide = {"avx512f", "avx512bw", "avx512_vnni"} <= set(cpu_kernels.cpu_kind().flags)
    assert ops.int8_tile_rows() == (16 if wide else 8)
    assert kind == "int8" and groups == 1 and tensors[0].shape == (40, 4 + 128)
    assert all(torch.equal(a, b) for a, b in zip(unpack_int8_tiles(tensors[0], 1, ops.int8_tile_rows()),
                                                 (qdata, scale)))
    monkeypatch.setenv("LLMBENCH_INT8_TILES", "0")
    assert cpu_kernels.kernel_parts(linear)[2] == 0
    monkeypatch.delenv("LLMBENCH_INT8_TILES")
    assert cpu_kernels.kernel_parts(quantized_linear("int8", None, out_features=44))[2] == 0


@pytest.mark.parametrize("sizes", [(64, 32, 40), (64, 40, 40)])
def test_int8_siblings_fuse_where_only_the_last_ends_in_a_short_tile(ops, sizes):
    """TorchAO INT8 q/k/v of these sizes: with 16-row tiles a member of 40 rows ends in a tile of 8, which the kernel
    takes only at the end of a call's rows, so they fuse into one call where only v_proj does (every build) and stay
    three where k_proj does too (8-row builds fuse them); each member's outputs equal its own call's either way."""
    parent = torch.nn.Module()
    for name, out_features in zip(("q_proj", "k_proj", "v_proj"), sizes):
        setattr(parent, name, quantized_linear("int8", None, out_features=out_features))
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    expected = {name: cpu_kernels.kernel_call(m)[0](x) for name, m in parent.named_children()}
    counts = cpu_kernels.use_kernel_linears(parent, cpu_kernels.MAX_ROWS)
    fused = not ops.int8_tiles_built() or sizes[1] % ops.int8_tile_rows() == 0
    assert counts == {"int8": 3, **({"fused groups": 1} if fused else {})}
    for name in expected:
        assert torch.equal(getattr(parent, name)(x), expected[name]), name
