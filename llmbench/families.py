"""Model families: built-in configurations of well-known model ids (for --dummy-weights), remote-code detection, and
what tensor-parallel sharding must do differently for some families."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from llmbench.errors import UserError


@dataclass(frozen=True)
class BuiltinModel:
    """A published checkpoint's architecture, as hyper-parameters of a transformers config class."""

    model_type: str  # the native transformers architecture that is built
    hyper: dict = field(default_factory=dict)
    note: str = ""  # how it differs from the checkpoint's own code, for architectures transformers lacks


def _entry(model_type: str, note: str = "", **hyper) -> BuiltinModel:
    return BuiltinModel(model_type, hyper, note)


_LLAMA2 = {"vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "bos_token_id": 1,
           "eos_token_id": 2, "tie_word_embeddings": False}
_LLAMA3 = {"vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "bos_token_id": 128000, "eos_token_id": 128001, "tie_word_embeddings": False}
_OPT = {"vocab_size": 50272, "max_position_embeddings": 2048, "do_layer_norm_before": True, "bos_token_id": 2,
        "eos_token_id": 2, "pad_token_id": 1}
_BLOOM = {"vocab_size": 250880, "layer_norm_epsilon": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}

# The seed's table of model ids, with the hyper-parameters of each checkpoint's published config.json.
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "meta-llama/Llama-2-7b-hf": _entry(
        "llama", **_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32),
    "meta-llama/Llama-2-13b-hf": _entry(
        "llama", **_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=40),
    "meta-llama/Llama-2-70b-hf": _entry(
        "llama", **_LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8),
    "meta-llama/Meta-Llama-3-8B": _entry(
        "llama", **_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8),
    "meta-llama/Meta-Llama-3-70B": _entry(
        "llama", **_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8),
    "microsoft/Phi-3-mini-128k-instruct": _entry(
        "phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072,
        original_max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=32000,
        pad_token_id=32000, tie_word_embeddings=False,
        note="LongRoPE scaling factors are left out: they change rotary values, not shapes or cost"),
    "EleutherAI/gpt-j-6b": _entry(
        "gptj", vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
        bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=False),
    "Qwen/Qwen-7B": _entry(
        "qwen2", vocab_size=151936, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192, rms_norm_eps=1e-6,
        rope_theta=10000.0, bos_token_id=151643, eos_token_id=151643, tie_word_embeddings=False,
        note="the checkpoint's own QWen code (model_type qwen) as native Qwen2: the same layers, biased fused QKV "
             "split into q/k/v, SwiGLU MLP of 11008 (its intermediate_size 22016 counts both halves); "
             "no dynamic-NTK or log-n attention scaling, so the context is its trained 8192"),
    "facebook/opt-6.7b": _entry(
        "opt", **_OPT, hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32,
        word_embed_proj_dim=4096),
    "facebook/opt-30b": _entry(
        "opt", **_OPT, hidden_size=7168, ffn_dim=28672, num_hidden_layers=48, num_attention_heads=56,
        word_embed_proj_dim=7168),
    "bigscience/bloom-7b1": _entry("bloom", **_BLOOM, hidden_size=4096, n_layer=30, n_head=32),
    "bigscience/bloom": _entry("bloom", **_BLOOM, hidden_size=14336, n_layer=70, n_head=112),
    "THUDM/chatglm3-6b": _entry(
        "glm", vocab_size=65024, hidden_size=4096, intermediate_size=13696, num_hidden_layers=28,
        num_attention_heads=32, num_key_value_heads=2, head_dim=128, max_position_embeddings=8192, rms_norm_eps=1e-5,
        attention_bias=True, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        note="the checkpoint's own ChatGLM code (model_type chatglm) as native GLM: the same layers (biased fused "
             "QKV with 2 key/value groups, rotary on half of each head, SwiGLU MLP, RMSNorm)"),
    "baichuan-inc/Baichuan2-13B-Chat": _entry(
        "llama", vocab_size=125696, hidden_size=5120, intermediate_size=13696, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        note="the checkpoint's own Baichuan code (model_type baichuan) as native Llama: the same weights (fused "
             "QKV, SwiGLU MLP, RMSNorm, normalized lm_head of the same size) but rotary positions instead of ALiBi; "
             "no native architecture combines ALiBi with a SwiGLU MLP"),
}

_BY_LOWER = {name.lower(): name for name in BUILTIN_MODELS}
# Families whose fused projections DeepSpeed AutoTP splits wrongly; transformers' own plan shards them right.
TP_PLAN_FAMILIES = frozenset({"phi3"})

# model_type -> family, for the families transformers builds natively and those that ship their own code.
FAMILIES = {
    "llama": "Llama (Llama 2, CodeLlama, Llama 3, Baichuan2-shaped)", "mistral": "Mistral", "mixtral": "Mixtral",
    "gemma": "Gemma", "phi3": "Phi-3", "gptj": "GPT-J", "qwen2": "Qwen2 / Qwen2.5", "qwen3": "Qwen3",
    "opt": "OPT", "bloom": "Bloom", "glm": "GLM (ChatGLM3-shaped)", "falcon": "Falcon", "gpt_neox": "GPT-NeoX",
    "gpt2": "GPT-2", "qwen": "Qwen (original)", "chatglm": "ChatGLM",
    "baichuan": "Baichuan",
}


def builtin_names() -> list[str]:
    return list(BUILTIN_MODELS)


def builtin_model(model_id: str) -> BuiltinModel | None:
    """The built-in entry for a model id (case does not matter), or None."""
    name = _BY_LOWER.get(model_id.lower())
    return BUILTIN_MODELS[name] if name else None


def builtin_config(model_id: str):
    """A transformers config of the published architecture, or None for an id with no built-in entry."""
    from transformers import AutoConfig

    entry = builtin_model(model_id)
    if entry is None:
        return None
    config = AutoConfig.for_model(entry.model_type, **entry.hyper)
    config.name_or_path = _BY_LOWER[model_id.lower()]
    return config


def is_native(model_type: str | None) -> bool:
    """Whether this transformers release builds the model type itself."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def _code_refs(auto_map: dict) -> list[str]:
    refs: list[str] = []
    for value in auto_map.values():
        refs.extend(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str))
    return refs


def _read_object(path: Path, name: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"-m {name}: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"-m {name}: {path} does not hold a JSON object")
    return data


def check_remote_code(config_file: Path, name: str, trust_remote_code: bool) -> None:
    """A checkpoint whose architecture exists only in its own Python files runs only with --trust-remote-code,
    and only when those files are at hand; otherwise one line says which and what to do."""
    data = _read_object(config_file, name)
    auto_map, model_type = data.get("auto_map"), data.get("model_type")
    if not isinstance(auto_map, dict) or is_native(model_type):
        return  # transformers builds it natively (any shipped code is not needed)
    if not trust_remote_code:
        family = f" ({FAMILIES[model_type]})" if model_type in FAMILIES else ""
        raise UserError(f"-m {name}: model type {model_type!r}{family} runs only with the Python code shipped with "
                        "the checkpoint: rerun with --trust-remote-code if you trust that code")
    folder = config_file.parent
    maps = {config_file.name: auto_map}
    tokenizer_file = folder / "tokenizer_config.json"
    if tokenizer_file.is_file():
        maps[tokenizer_file.name] = _read_object(tokenizer_file, name).get("auto_map") or {}
    for source, mapping in maps.items():
        for ref in _code_refs(mapping if isinstance(mapping, dict) else {}):
            if "--" in ref:
                repo = ref.split("--")[0]
                raise UserError(f"-m {name}: {source} takes its code from the hub repository {repo}, which cannot "
                                f"be fetched offline: copy that repository's .py files into {folder} and drop the "
                                f"'{repo}--' prefixes from auto_map")
            module_file = folder / (ref.rsplit(".", 1)[0].replace(".", "/") + ".py")
            if not module_file.is_file():
                raise UserError(f"-m {name}: its code file {module_file.name} (named in {source} auto_map) is not "
                                f"in {folder}: copy the checkpoint's .py files (configuration_*.py, modeling_*.py, "
                                "tokenization_*.py) there")


def autotp_fixups(model) -> None:
    """What a family needs after DeepSpeed AutoTP has sharded it (a model_type without quirks needs nothing)."""
    if getattr(model.config, "model_type", None) == "bloom":
        model.transformer.register_forward_pre_hook(_bloom_with_2d_mask, with_kwargs=True)


def _bloom_with_2d_mask(module, args: tuple, kwargs: dict):
    """Bloom without a 2D attention mask (what generate() passes in transformers 5) builds its alibi for every
    head, bypassing the head-sharded builder AutoTP installs: give it the all-ones mask it would assume."""
    import torch

    if kwargs.get("attention_mask") is not None:
        return None
    tokens = args[0] if args and args[0] is not None else kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs["inputs_embeds"]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    batch, length = tokens.shape[:2]
    kv_length = cache.get_mask_sizes(length, 0)[0] if hasattr(cache, "get_mask_sizes") else (
        length + (cache.get_seq_length() if cache is not None else 0))
    kwargs["attention_mask"] = torch.ones(batch, kv_length, dtype=torch.long, device=tokens.device)
    return args, kwargs
