"""The CPU kernels' INT8 linears (llmbench/backends/cpu_gemv_int8.h): TorchAO's int8 weights as stored and as tiles
of eight rows, against x quantized to int8 per 32 values, and the choice between the two."""

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


def test_int8_weights_run_as_tiles_where_the_build_and_shapes_allow(ops, monkeypatch):
    """Whole tiles of eight rows in groups of a multiple of 32 weights take the tiles (their values exactly TorchAO's,
    in the tiles' order); LLMBENCH_INT8_TILES=0, or rows that are not whole tiles, keep the weights as stored."""
    linear = quantized_linear("int8", None)
    qdata, scale = cpu_kernels._int8_parts(linear.weight)
    kind, tensors, groups = cpu_kernels.kernel_parts(linear)
    if not ops.int8_tiles_built():
        assert (kind, groups) == ("int8", 0)
        return
    assert kind == "int8" and groups == 1 and tensors[0].shape == (40, 4 + 128)
    tiles = tensors[0].reshape(5, 8 * (4 + 128))
    assert torch.equal(tiles[:, :32].contiguous().view(torch.float32), scale.reshape(5, 8))
    weights = tiles[:, 32:].contiguous().view(torch.int8).reshape(5, 4, 8, 8, 4)  # tile, block, vector, row, lane byte
    assert torch.equal(weights.permute(0, 3, 1, 2, 4).reshape(40, 128), qdata)
    monkeypatch.setenv("LLMBENCH_INT8_TILES", "0")
    assert cpu_kernels.kernel_parts(linear)[2] == 0
    monkeypatch.delenv("LLMBENCH_INT8_TILES")
    assert cpu_kernels.kernel_parts(quantized_linear("int8", None, out_features=44))[2] == 0
