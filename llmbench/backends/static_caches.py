"""The compile backend's static KV cache across transformers versions (4.51's and newer ones' APIs)."""

from __future__ import annotations

import torch
from packaging.version import Version
from transformers import StaticCache

from llmbench.compat import TRANSFORMERS_VERSION


class _RankFittedStaticCache(StaticCache):
    """transformers 4.x's StaticCache, which allocates every layer from the config's key/value head count at once: a
    layer whose keys arrive with other head counts or sizes (this rank's shard under tensor parallelism: fewer heads)
    is allocated again, to the shape it gets, at its first update (our eager prefill), as newer transformers allocate
    every layer."""

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        for store, states in ((self.key_cache, key_states), (self.value_cache, value_states)):
            held = store[layer_idx]
            if held.shape[1] != states.shape[1] or held.shape[3] != states.shape[3]:
                store[layer_idx] = torch.zeros((held.shape[0], states.shape[1], held.shape[2], states.shape[3]),
                                               dtype=held.dtype, device=held.device)
                torch._dynamo.mark_static_address(store[layer_idx])  # as StaticCache marks its own
        return super().update(key_states, value_states, layer_idx, cache_kwargs)


def new_static_cache(model_config, rows: int, max_len: int, device: torch.device, dtype: torch.dtype) -> StaticCache:
    """Older transformers (4.51) allocate from max_batch_size/device/dtype (refitted per layer at its first update);
    newer ones take only max_cache_len, ignore the rest, and allocate at the first update (our eager prefill), so one
    call serves both."""
    kind = _RankFittedStaticCache if TRANSFORMERS_VERSION < Version("4.54") else StaticCache
    return kind(config=model_config, max_batch_size=rows, max_cache_len=max_len, device=device, dtype=dtype)


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
