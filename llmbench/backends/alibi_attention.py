"""Bloom's decode attention through llmbench_cpu.decode_attention: its ALiBi bias as a per-head float mask.

Bloom computes attention in its own module (`alibi.baddbmm(query, keys)`, a softmax, `bmm` with the values), not
through transformers' attention interface, so generated_kernels.use_generated_attention cannot route it: compiled, a
decode step ran those as library batch matmuls, and Bloom at the default model's size reached 62% of the memory
roofline where the families whose attention takes the kernel reached 73-80% (benchmarks/families.py, bf16, greedy,
a 2-vCPU AVX-512 EPYC of family 26). Here each BloomAttention's forward, inside a compiled decode step (one query
position, at most STEP_MAX_ROWS rows, on cpu), adds its ALiBi bias and the causal mask into one (rows, heads, 1,
cache length) float32 mask and calls the kernel, which adds each head's row of it to that head's scores; every other
call (prompts, eager runs, output_attentions, Bloom's slow_but_exact tensor-parallel form) runs Bloom's own forward.
The scores are summed in float32 where Bloom's baddbmm rounds them to the model's dtype first."""

from __future__ import annotations

import inspect
import types

import torch

from llmbench.backends.compile_settings import STEP_MAX_ROWS

EXPECTED = ["hidden_states", "residual", "alibi", "attention_mask", "layer_past", "use_cache", "output_attentions"]


def _bloom_attention_class():
    try:
        from transformers.models.bloom.modeling_bloom import BloomAttention
    except ImportError:
        return None
    params = list(inspect.signature(BloomAttention.forward).parameters)[1:]
    return BloomAttention if params[:len(EXPECTED)] == EXPECTED else None  # the form written against


def _decode_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                    output_attentions=False, **kwargs):
    batch, q_len, _ = hidden_states.shape
    if (not torch.compiler.is_compiling() or q_len != 1 or batch > STEP_MAX_ROWS or layer_past is None
            or attention_mask is None or output_attentions or hidden_states.device.type != "cpu"
            or (self.pretraining_tp > 1 and self.slow_but_exact)):
        return type(self).forward(self, hidden_states, residual, alibi, attention_mask, layer_past, use_cache,
                                  output_attentions, **kwargs)
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # (batch, heads, 1, head_dim) each
    key, value = layer_past.update(key, value, self.layer_idx)
    length = key.shape[2]
    bias = alibi.view(batch, self.num_heads, 1, -1)[..., :length].float()
    mask = attention_mask[:, :, -1:, :length]
    if mask.dtype == torch.bool:
        bias = bias.masked_fill(~mask, float("-inf"))
    else:  # transformers' additive mask: its dtype's lowest value where a position is masked
        bias = (bias + mask.float()).masked_fill(mask <= torch.finfo(mask.dtype).min, float("-inf"))
    out = torch.ops.llmbench_cpu.decode_attention(query, key, value, bias, self.inv_norm_factor)
    out = self.dense(out.reshape(batch, 1, self.num_heads * self.head_dim))
    return residual + torch.nn.functional.dropout(out, p=self.hidden_dropout, training=self.training), None


def use_alibi_kernel_attention(model: torch.nn.Module) -> int:
    """Route every BloomAttention of `model` through _decode_forward; -> how many (0: not Bloom, or a transformers
    whose BloomAttention this was not written against)."""
    cls = _bloom_attention_class()
    if cls is None:
        return 0
    modules = [m for m in model.modules() if isinstance(m, cls)]
    for module in modules:
        module.forward = types.MethodType(_decode_forward, module)
    return len(modules)
