"""Which rank counts give every rank whole attention heads, by sharding method.

DeepSpeed AutoTP splits the attention projections by key/value heads, unevenly where they do not divide (3 key/value
heads over 2 ranks: 2 and 1, each with its query heads; over 4 ranks one rank holds none and computes no attention),
so its shards are whole heads whenever the query heads group evenly over the key/value heads. transformers'
tensor-parallel plan splits the projections evenly where it marks them "colwise" (Llama and most families), so both
head counts must divide by the ranks; otherwise a rank holds half a head and the attention reshape fails (the default
model's 9 heads over 2 ranks: 4.5 each). Plans that gather the projection's output ("colwise_gather_output", Phi-3's
fused qkv) give every rank all heads.
"""

from __future__ import annotations

from dataclasses import dataclass

AUTOTP = "deepspeed-autotp"
TP_PLAN = "transformers-tp-plan"
# Where configs keep the key/value head count (the names DeepSpeed reads too); absent, it equals the query heads.
KEY_VALUE_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "n_head_kv")


@dataclass(frozen=True)
class Heads:
    attention: int
    key_value: int

    def __str__(self) -> str:
        return f"{_count(self.attention, 'attention head')} and {_count(self.key_value, 'key/value head')}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def head_counts(model_config) -> Heads | None:
    """The attention and key/value head counts of a transformers config (its text part for multimodal models);
    None when the config names none."""
    config = getattr(model_config, "text_config", None) or model_config
    attention = getattr(config, "num_attention_heads", None)
    if not isinstance(attention, int) or attention <= 0:
        return None
    for name in KEY_VALUE_HEAD_ATTRS:
        key_value = getattr(config, name, None)
        if isinstance(key_value, int) and key_value > 0:
            return Heads(attention, key_value)
    return Heads(attention, attention)  # multi-head attention: as many key/value heads as query heads


def plan_splits_heads(model_config) -> bool:
    """Whether transformers' tensor-parallel plan for this config splits an attention projection's output over the
    ranks (a "colwise" entry), rather than gathering it on every rank."""
    config = getattr(model_config, "text_config", None) or model_config
    plan = getattr(config, "base_model_tp_plan", None) or {}
    return any(style == "colwise" and ("attn" in name or "attention" in name) for name, style in plan.items())


def whole_heads(heads: Heads, ranks: int, method: str, plan_splits: bool = True) -> bool:
    """True when `method` gives every one of `ranks` ranks whole attention heads (AutoTP: possibly none);
    `plan_splits` is plan_splits_heads() of the model (transformers' plan only)."""
    if method == AUTOTP:
        return heads.attention % heads.key_value == 0
    return not plan_splits or (heads.attention % ranks == 0 and heads.key_value % ranks == 0)


def working_rank_counts(heads: Heads, method: str, plan_splits: bool = True) -> list[int]:
    """The rank counts (1 included) at which `method` shards into whole heads, up to one head per rank."""
    return [n for n in range(1, heads.attention + 1) if whole_heads(heads, n, method, plan_splits)]


def describe_counts(counts: list[int]) -> str:
    """[1, 3, 9] -> '1, 3 or 9'; a long run of consecutive counts as '1 to 16'."""
    if len(counts) > 3 and counts == list(range(counts[0], counts[-1] + 1)):
        return f"{counts[0]} to {counts[-1]}"
    text = ", ".join(map(str, counts[:-1]))
    return f"{text} or {counts[-1]}" if text else str(counts[-1])
