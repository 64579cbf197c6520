"""The compile backend's static KV cache across transformers versions (4.51's and newer ones' APIs)."""

from __future__ import annotations

import torch
from transformers import StaticCache


def new_static_cache(model_config, rows: int, max_len: int, device: torch.device, dtype: torch.dtype) -> StaticCache:
    """Older transformers (4.51) allocate from max_batch_size/device/dtype; newer ones take only max_cache_len, ignore
    the rest, and allocate at the first update (our eager prefill), so one call serves both."""
    return StaticCache(config=model_config, max_batch_size=rows, max_cache_len=max_len, device=device, dtype=dtype)


def layer_states(cache: StaticCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer of an allocated cache."""
    if hasattr(cache, "layers"):  # transformers >= 4.54
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def cache_tensors(cache: StaticCache) -> list[torch.Tensor]:
    return [tensor for pair in layer_states(cache) for tensor in pair]


def keeps_every_position(cache: StaticCache) -> bool:
    """Whether every layer of the cache holds every position up to its length (no sliding-window layer), so that
    keys and values computed elsewhere can be written into it by position. transformers 4.x's StaticCache always
    does; newer ones build sliding-window layers for models that have them."""
    if not hasattr(cache, "layers"):
        return True
    from transformers.cache_utils import StaticLayer

    return all(type(layer) is StaticLayer for layer in cache.layers)
