"""Bloom's ALiBi attention through the decode attention kernel: a per-head float mask, and the compiled Bloom step."""

import pytest
import torch
import torch.nn.functional as F

from llmbench.backends import alibi_attention


def alibi_mask(rows: int, heads: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (per-head float mask: each head's slope times the position, -inf past each row's own positions, and row
    0 left-padded; which positions each row attends)."""
    slopes = 2.0 ** -torch.arange(1, heads + 1, dtype=torch.float32)
    keep = torch.zeros(rows, 1, 1, length, dtype=torch.bool)
    for r in range(rows):
        keep[r, ..., 2 * (r == 0): length // 2 + r] = True
    bias = slopes[None, :, None, None] * torch.arange(length, dtype=torch.float32)
    return (bias.expand(rows, heads, 1, length) + 0).masked_fill(~keep, float("-inf")), keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, heads", [(1, 4), (8, 4), (3, 9)])
@pytest.mark.parametrize("dim", [64, 40])  # 64: the vector path where the CPU has it; 40: portable loops
@pytest.mark.parametrize("length", [40, 300])  # one thread; several, rows' positions in parts
def test_decode_attention_adds_each_heads_own_mask_row(ops, dtype, rows, heads, dim, length):
    torch.manual_seed(rows * heads)
    query = torch.randn(rows, 1, heads, dim).to(dtype).transpose(1, 2)
    key, value = (torch.randn(rows, heads, length, dim).to(dtype) for _ in range(2))
    mask, _ = alibi_mask(rows, heads, length)
    out = ops.decode_attention(query, key, value, mask, dim ** -0.5)
    expected = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=mask,
                                              scale=dim ** -0.5).transpose(1, 2)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)
    # the same bias for every head is not what a per-head mask gives (the test can tell the heads' rows apart)
    shared = ops.decode_attention(query, key, value, mask[:, :1].contiguous(), dim ** -0.5)
    assert not torch.allclose(shared.float(), expected, atol=tolerance, rtol=tolerance)


def test_a_per_head_mask_needs_a_cached_head_per_query_head(ops):
    query = torch.randn(2, 4, 1, 64)
    key = value = torch.randn(2, 2, 40, 64)
    mask, _ = alibi_mask(2, 4, 40)
    with pytest.raises(RuntimeError, match="per head only where every query head has its own cached head"):
        ops.decode_attention(query, key, value, mask, 0.125)


def test_bloom_attention_modules_take_the_kernel_in_compiled_decode_steps():
    """Each BloomAttention is rerouted; outside a compiled step its forward is Bloom's own."""
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

    config = BloomConfig(vocab_size=64, hidden_size=64, n_layer=2, n_head=4)
    bloom = BloomForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 5))
    before = bloom(ids).logits
    assert alibi_attention.use_alibi_kernel_attention(bloom) == 2
    torch.testing.assert_close(bloom(ids).logits, before)  # eager: Bloom's own forward
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4))
    assert alibi_attention.use_alibi_kernel_attention(llama) == 0
