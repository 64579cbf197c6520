"""The INT4 weight layout of the CPU decode kernels (`cpu_gemv.cpp`'s linear_int4), and its making from TorchAO's
CPU INT4 weights (`Int4OpaqueTensor`, packed for aten's kernel in an opaque tile layout) with exactly the same
values: per tile of output rows (8, or 16 where the kernels' build has 512-bit integer dot products: its
`int4_tile_rows()`) one run of bytes, their groups' scales and zeros as stored, then two weights per byte,
interleaved so that the kernel's vector lanes are the tile's rows."""

from __future__ import annotations

import torch

INT4_ALIGN = 32  # bytes: a row's share of its tile's scales and zeros is padded to a multiple of this
TILE_ROWS = 8  # output rows per tile (the kernel's kTile); builds with wide tiles take 2 * TILE_ROWS


def int4_rows(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, tile_rows: int) -> tuple[torch.Tensor, int]:
    """The INT4 kernel's weight layout from integer weights q (n, k), n a multiple of TILE_ROWS and k of 32, in
    0..15, and a scale and zero per group (n, groups), w = (q - 8) * scale + zero, for a build whose tiles have
    tile_rows (TILE_ROWS or twice that; the last tile TILE_ROWS where n is not a multiple of tile_rows): per tile of
    T output rows one run of T rows' bytes (rows of the tensor, each `stride` bytes) holding the tile's scales as
    [group][row], its zeros the same way (bfloat16 when both are bfloat16, else float32), zero bytes up to T times a
    multiple of INT4_ALIGN, then per 32 weights 16 T bytes: four vectors j of 4 T bytes whose 4-byte lane r holds row
    r's weights 8j..8j+3 (low nibbles) and 8j+4..8j+7 (high nibbles). A tile is one stream for the kernel to read,
    and the integer dot products of its rows land in the lanes of one vector. -> (rows, bytes per scale or zero)."""
    n, k = q.shape
    if tile_rows not in (TILE_ROWS, 2 * TILE_ROWS):
        raise ValueError(f"INT4 tiles have {TILE_ROWS} or {2 * TILE_ROWS} rows, not {tile_rows}")
    if n % TILE_ROWS or k % 32:
        raise ValueError(f"an INT4 tile takes {TILE_ROWS} rows of a multiple of 32 weights, not {n} rows of {k}")
    meta = torch.bfloat16 if scale.dtype == zero.dtype == torch.bfloat16 else torch.float32
    wide = n - n % tile_rows
    parts = [_tiles(q[:wide], scale[:wide], zero[:wide], meta, tile_rows)] if wide else []
    if wide < n:
        parts.append(_tiles(q[wide:], scale[wide:], zero[wide:], meta, TILE_ROWS))
    return torch.cat(parts).contiguous(), meta.itemsize


def _tiles(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, meta: torch.dtype, t: int) -> torch.Tensor:
    """int4_rows' layout of q's rows in tiles of t rows (a multiple of t)."""
    n, k = q.shape
    tiles, groups = n // t, scale.shape[1]
    q = q.to(torch.uint8).reshape(tiles, t, k // 32, 4, 2, 4)  # tile, row, block, vector j, half, byte
    nibbles = (q[..., 0, :] | (q[..., 1, :] << 4)).permute(0, 2, 3, 1, 4).reshape(tiles, k // 2 * t)
    parts = [v.to(meta).reshape(tiles, t, groups).transpose(1, 2).contiguous().view(torch.uint8)
             .reshape(tiles, -1) for v in (scale, zero)]
    row_meta = -(-2 * groups * meta.itemsize // INT4_ALIGN) * INT4_ALIGN
    padding = torch.zeros(tiles, t * row_meta - 2 * parts[0].shape[1], dtype=torch.uint8)
    return torch.cat([*parts, padding, nibbles], dim=1).reshape(n, row_meta + k // 2)


_nibble_orders: dict[tuple[int, int], torch.Tensor] = {}


def _int4pack_order(n: int, k: int) -> torch.Tensor:
    """For aten's CPU INT4 packing of an (n, k) weight (`_convert_weight_to_int4pack_for_cpu`, an opaque layout
    that may follow the CPU's instruction set): which weight (row * k + column) each nibble of the packed bytes
    holds, low nibble first. Learnt by packing probes whose values are the base-16 digits of every weight's index,
    so it costs a few packings of the shape (O(n k)) and is kept per shape while a model's layers are repacked."""
    if (n, k) not in _nibble_orders:
        dtype = torch.int32 if n * k < 2**31 else torch.int64
        index = torch.arange(n * k, dtype=dtype)
        order = torch.zeros(n * k, dtype=dtype)
        for digit in range(max(1, ((n * k - 1).bit_length() + 3) // 4)):
            probe = ((index >> (4 * digit)) & 15).to(torch.int32).reshape(n, k)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).reshape(-1)
            nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1).to(dtype)
            order |= nibbles << (4 * digit)
        _nibble_orders[(n, k)] = order
    return _nibble_orders[(n, k)]


def forget_nibble_orders() -> None:
    """Drop the learnt packing orders (one index per weight of each shape: the head's alone is ~100 MB) once a
    model's layers are repacked."""
    _nibble_orders.clear()


def int4_from_torchao(weight, tile_rows: int) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """(rows, (group size, bytes per scale or zero)) in this kernel's layout (int4_rows, tiles of tile_rows: the
    build's int4_tile_rows()) from TorchAO's CPU INT4
    weight (Int4OpaqueTensor, tinygemm convention w = (q - 8) * scale + zero per group, scales and zeros in the
    model's dtype), else None. The integers are unpacked from aten's packing by its learnt nibble order
    (_int4pack_order), then checked against aten's own kernel: both give the same product with random inputs.
    Scales and zeros are kept as stored (bfloat16, or float32, which holds float16 exactly)."""
    if type(weight).__name__ != "Int4OpaqueTensor" or getattr(weight, "act_pre_scale", None) is not None:
        return None
    block = list(getattr(weight, "block_size", []))
    if len(block) != 2 or block[0] != 1 or block[1] % 32 or weight.shape[1] % 64 \
            or weight.shape[0] % TILE_ROWS:
        return None
    group_size = block[1]
    n, k = weight.shape
    order = _int4pack_order(n, k)
    packed = weight.qdata.reshape(-1)
    if order.numel() != 2 * packed.numel() or not torch.bincount(order, minlength=n * k).eq(1).all():
        return None  # not a permutation of nibbles: a packing this function does not know
    q = torch.empty(n * k, dtype=torch.uint8)
    q[order.long()] = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)
    q = q.reshape(n, k)
    stored = weight.scale_and_zero  # (groups, n, 2)
    scale, zero = stored[:, :, 0].t(), stored[:, :, 1].t()  # (n, groups)
    dense = ((q.float().view(n, -1, group_size) - 8) * scale.float()[..., None] + zero.float()[..., None]).view(n, k)
    probe = torch.randn(2, k, generator=torch.Generator().manual_seed(0))
    theirs = torch.ops.aten._weight_int4pack_mm_for_cpu(probe, weight.qdata, group_size, stored.float())
    if not torch.allclose(theirs, probe @ dense.t(), rtol=1e-3, atol=1e-3 * theirs.abs().max().item()):
        return None
    rows, value_bytes = int4_rows(q, scale, zero, tile_rows)
    return rows, (group_size, value_bytes)
