"""Decode-step formulations that inductor turns into generated C++ kernels instead of library calls.

On CPUs whose oneDNN/MKL paths gain nothing from weight prepacking (no AMX), inductor keeps every linear layer of a
one-token decode step as an `aten::mm` call, which streams weights at about half the memory bandwidth, and runs
attention through the aten flash-attention kernel, whose internal transposes and copies dominate a short step. Written
as a multiply and a sum over the input features, a linear becomes one fused reduction that inductor vectorizes and
parallelizes itself; attention over the static cache becomes two such reductions around a softmax.

Both only apply while torch.compile traces (eager prompts, the accuracy path and any other caller keep the library
kernels), the attention only to one-token steps, and only to plain floating-point weights (TorchAO's quantized
tensors keep their own kernels).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from llmbench.backends.compile_settings import STEP_MAX_ROWS

ATTENTION_NAME = "llmbench_generated"
KERNEL_ATTENTION_NAME = "llmbench_generated_cpu_kernel"  # the same, decode steps through llmbench_cpu.decode_attention
# Rows of a step whose attention is generated, or with llmbench_cpu.decode_attention up to compile_settings'
# STEP_MAX_ROWS: SDPA's CPU path repeats the keys and values of grouped-query heads into copies of the whole cache
# per layer and step (16 rows of the default model: 23 ms a step on a 2-core AVX-512 EPYC).
MAX_ATTENTION_ROWS = 8


def _reduction_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T as a multiply-sum laid out (out_features, rows): each weight row is read once from memory and
    reused, from cache, by every row of x (a beam or batch of up to a few rows)."""
    rows = x.reshape(-1, x.shape[-1])
    out = (weight[:, None, :].float() * rows[None, :, :].float()).sum(-1).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def reduction_or_library(max_rows: int):
    """-> linear(x, weight, bias): the reduction form for steps of up to `max_rows` rows, F.linear for more."""
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.numel() // x.shape[-1] <= max_rows:
            return _reduction_linear(x, weight, bias)
        return F.linear(x, weight, bias)
    return linear


def _reduction_int8_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
    """The same for TorchAO's INT8 weight-only weights: int8 values (out, in) and a float scale per output row or
    per (row, group); dequantized in registers, so one byte per weight is read."""
    rows = x.reshape(-1, x.shape[-1]).float()
    out_features, in_features = qdata.shape
    groups = scale.shape[-1]
    if groups == 1:
        out = (qdata[:, None, :].float() * rows[None, :, :]).sum(-1) * scale.float()
    else:
        q = qdata.view(out_features, 1, groups, in_features // groups).float()
        out = (q * scale.float().view(out_features, 1, groups, 1)
               * rows.view(1, -1, groups, in_features // groups)).sum((-1, -2))
    out = out.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)


PLAIN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # weights as stored, read by reductions and kernels


def plain_weight(weight: torch.Tensor) -> bool:
    return type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.dtype in PLAIN_DTYPES


def _int8_parts(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 values, scale) of a TorchAO Int8Tensor weight (symmetric, per row or per group), else None."""
    if type(weight).__name__ != "Int8Tensor":
        return None
    qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    if qdata is None or scale is None or qdata.dtype != torch.int8 or qdata.dim() != 2 or scale.dim() != 2:
        return None
    if scale.shape[0] != qdata.shape[0] or qdata.shape[1] % scale.shape[1]:
        return None
    return qdata, scale


class ReductionLinearForward:
    """A replacement forward for one nn.Linear: the reduction form while compiling a step of at most `max_rows`
    rows, the module's own F.linear (library or TorchAO kernel) otherwise."""

    def __init__(self, module: torch.nn.Linear, max_rows: int, int8: tuple[torch.Tensor, torch.Tensor] | None):
        self.module = module
        self.max_rows = max_rows
        self.int8 = int8

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        if torch.compiler.is_compiling() and x.numel() // x.shape[-1] <= self.max_rows:
            if self.int8 is not None:
                return _reduction_int8_linear(x, *self.int8, module.bias)
            return _reduction_linear(x, module.weight, module.bias)
        return F.linear(x, module.weight, module.bias)


def use_reduction_linears(model: torch.nn.Module, max_rows: int) -> int:
    """Give every nn.Linear with a plain floating-point weight, or TorchAO INT8 weight-only weight, the reduction
    forward; -> how many (INT4 weights keep TorchAO's kernel)."""
    count = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or "forward" in vars(module):  # already given a kernel
            continue
        int8 = _int8_parts(module.weight)
        if int8 is not None or plain_weight(module.weight):
            module.forward = ReductionLinearForward(module, max_rows, int8)
            count += 1
    return count


VECTORIZED_HEAD_SIZES = (16, 32, 64, 96, 128)  # cpu_attention.cpp's vector path holds a head in registers


def attention_kernel(head_dim: int, vectorized: bool) -> bool:
    """Whether the attention of decode steps on cpu runs llmbench_cpu.decode_attention (cpu_attention.cpp, loaded
    with the linear kernels; `vectorized`: cpu_kernels.attention_vectorized()), else inductor's generated form
    (generated_attention below): where its vector path was built (AVX-512, or AVX2 with FMA and F16C) and takes the
    head size. Batch 8 of the default model on the 2-core AMX Xeon: 46 us a layer inside the step against the
    generated form's 92 us; built as AVX2 code there, whole steps 0.92-0.95x at batch 1 (docs/measured.md). Its
    portable loops (other CPUs and head sizes) were never measured against the generated form, so those keep it.
    LLMBENCH_ATTENTION_KERNEL=0 keeps the generated form, for comparisons."""
    forced = os.environ.get("LLMBENCH_ATTENTION_KERNEL", "1")
    if forced not in ("0", "1"):
        from llmbench.errors import UserError

        raise UserError(f"LLMBENCH_ATTENTION_KERNEL={forced!r}: use 1 (the kernel) or 0 (inductor's generated form)")
    return forced == "1" and vectorized and head_dim in VECTORIZED_HEAD_SIZES


def generated_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        decode_kernel: bool = False, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: one query position of each of up to MAX_ATTENTION_ROWS rows (batch x
    beams; STEP_MAX_ROWS with the decode kernel) against the whole static cache, as plain tensor ops (grouped-query
    heads by a view, no repeated keys); anything else goes to SDPA as before.
    query (batch, heads, q_len, head_dim); key/value (batch, kv_heads, kv_len, head_dim); -> (batch, q_len, heads,
    head_dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    kernel = decode_kernel and query.device.type == "cpu"  # one C++ call per layer (cpu_attention.cpp)
    if (not torch.compiler.is_compiling() or q_len != 1 or batch > (STEP_MAX_ROWS if kernel else MAX_ATTENTION_ROWS)
            or attention_mask is None
            or attention_mask.shape[1] != 1
            or dropout or heads % kv_heads):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = head_dim ** -0.5 if scaling is None else scaling
    if kernel:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask.float()
        return torch.ops.llmbench_cpu.decode_attention(query, key, value, mask, scale), None
    # The query arrives as an unrealized pointwise result (RoPE, whose cos/sin inductor would otherwise recompute
    # for every cached position inside the score reduction): materialize it once.
    q = query.float().contiguous()
    q = torch.ops.prims.inductor_force_stride_order(q, q.stride()).view(batch, kv_heads, heads // kv_heads, head_dim)
    scores = (q[:, :, :, None, :] * key.float()[:, :, None, :, :]).sum(-1) * scale  # (b, kv, group, kv_len)
    mask = attention_mask[:, :, -1:, : key.shape[2]]  # (b or 1, 1, 1, kv_len): broadcasts over heads
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1)
    out = (probs[..., None] * value.float()[:, :, None, :, :]).sum(-2)  # (b, kv, group, d)
    return out.to(query.dtype).view(batch, heads, 1, head_dim).transpose(1, 2), None


def kernel_attention(*args, **kwargs) -> tuple[torch.Tensor, None]:
    """generated_attention with llmbench_cpu.decode_attention for the decode steps it takes."""
    return generated_attention(*args, decode_kernel=True, **kwargs)


def use_generated_attention(model: torch.nn.Module, kernel: bool = False) -> bool:
    """Route the model's attention through generated_attention where it uses transformers' attention interface
    (and its SDPA masks); -> whether it could."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        return False
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    name = KERNEL_ATTENTION_NAME if kernel else ATTENTION_NAME
    AttentionInterface.register(name, kernel_attention if kernel else generated_attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionMaskInterface.register(name, sdpa_mask)
    except ImportError:  # transformers 4.51 builds masks per model: an additive float mask for unknown kinds
        pass
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(name)
            return True
        except (ValueError, KeyError, TypeError):
            return False
    model.config._attn_implementation = name
    return True


def use_generated(model: torch.nn.Module, max_rows: int, attention_kernel: bool = False) -> dict:
    """Linears (use_reduction_linears) and attention (use_generated_attention, with llmbench_cpu.decode_attention
    where attention_kernel) in their generated forms; -> the record's counts."""
    return {"generated_linears": use_reduction_linears(model, max_rows),
            "generated_attention": use_generated_attention(model, attention_kernel)}
