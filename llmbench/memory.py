"""Will a run fit? Free memory on the device, and the bytes a generation run needs, estimated before loading.

The estimate is deliberately simple (weights + KV cache + the largest live activations): it catches runs that
cannot fit by a wide margin (a batch of 100000, a thousand beams) before minutes of swapping, not the last GiB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llmbench.errors import UserError

GiB = 2**30
LOGITS_BYTES = 4  # generate keeps the last position's logits (and their log-softmax) in float32


def _cgroup_free_bytes() -> int | None:
    """What the container's memory limit still allows (cgroup v2), None without a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def _meminfo_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on the device (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "xpu":
        if hasattr(torch.xpu, "mem_get_info"):
            return torch.xpu.mem_get_info(device)[0]
        return torch.xpu.get_device_properties(device).total_memory - torch.xpu.memory_reserved(device)
    if device.type == "cpu":
        known = [b for b in (_meminfo_available_bytes(), _cgroup_free_bytes()) if b is not None]
        return min(known) if known else None
    return None


def require(need_bytes: int, device: torch.device, what: str, advice: str) -> None:
    """UserError naming the need and what is free when `need_bytes` does not fit on `device`."""
    free = available_bytes(device)
    if free is not None and need_bytes > free:
        raise UserError(f"{what} needs about {need_bytes / GiB:.1f} GiB, but {device.type} has {free / GiB:.1f} GiB "
                        f"free: {advice}")


def _first(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class RunMemory:
    """Bytes a generation run needs: the weights, the KV cache of every sequence, the largest live activations."""

    weights: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def parts(self) -> str:
        return (f"weights {self.weights / GiB:.1f} + KV cache {self.kv_cache / GiB:.1f} + activations "
                f"{self.activations / GiB:.1f} GiB")


def estimate_run(model_config, weight_bytes: int, dtype: torch.dtype, batch_size: int, num_beams: int,
                 input_tokens: int, max_new_tokens: int) -> RunMemory:
    """KV cache: sequences x positions x layers x 2 (key, value) x kv_heads x head_dim x dtype bytes; every beam is
    a sequence of its own. Activations: the prefill's widest hidden states and one layer's attention scores, and
    the last position's float32 logits."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    sequences, positions, itemsize = batch_size * num_beams, input_tokens + max_new_tokens, dtype.itemsize
    layers = _first(text, "num_hidden_layers", "n_layer", "num_layers") or 0
    heads = _first(text, "num_attention_heads", "n_head", "num_heads") or 0
    hidden = _first(text, "hidden_size", "n_embd", "d_model") or 0
    kv_heads = 1 if getattr(text, "multi_query", False) else (_first(text, "num_key_value_heads") or heads)
    head_dim = _first(text, "head_dim") or (hidden // heads if heads else 0)
    intermediate = _first(text, "intermediate_size", "ffn_dim", "n_inner") or 4 * hidden
    vocab = _first(text, "vocab_size") or 0
    kv = sequences * positions * layers * 2 * kv_heads * head_dim * itemsize
    hidden_states = sequences * input_tokens * (4 * hidden + 2 * intermediate) * itemsize
    scores = sequences * heads * input_tokens * input_tokens * itemsize
    logits = 2 * sequences * vocab * LOGITS_BYTES
    return RunMemory(weight_bytes, kv, hidden_states + scores + logits)
