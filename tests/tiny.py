"""Tiny random-initialised models with locally trained tokenizers: every test runs offline in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from llmbench.prompts import DEFAULT_PROMPT_FILE

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def training_text() -> list[str]:
    texts = json.loads(Path(DEFAULT_PROMPT_FILE).read_text(encoding="utf-8"))["texts"]
    return [p for text in texts.values() for p in text.split("\n\n")]


def train_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on prompt.json (so every prompt length is reachable)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_text(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)


def save_tiny_model(folder: Path, config, tokenizer: PreTrainedTokenizerFast | None, seed: int = 0) -> Path:
    """Build a random model from `config`, save it (and the tokenizer) as a model folder."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def train_sentencepiece_style_tokenizer(vocab_size: int = 1500) -> PreTrainedTokenizerFast:
    """A BPE tokenizer in the style of SentencePiece models (metaspace, byte fallback), trained on prompt.json:
    the tokenizer classes of Llama 2, CodeLlama, Mistral, Phi-3 and Gemma rebuild such a vocabulary their own way."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL + byte_tokens, show_progress=False)
    tok.train_from_iterator(training_text(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


# family -> (model_type, tokenizer class its checkpoints use, tokenizer style: "bytelevel" or "sentencepiece")
FAMILIES = {
    "llama2": ("llama", "LlamaTokenizerFast", "sentencepiece"),
    "codellama": ("llama", "CodeLlamaTokenizerFast", "sentencepiece"),
    "llama3": ("llama", "PreTrainedTokenizerFast", "bytelevel"),
    "mistral": ("mistral", "LlamaTokenizerFast", "sentencepiece"),
    "mixtral": ("mixtral", "LlamaTokenizerFast", "sentencepiece"),
    "gemma": ("gemma", "GemmaTokenizerFast", "sentencepiece"),
    "phi3": ("phi3", "LlamaTokenizerFast", "sentencepiece"),
    "gptj": ("gptj", "GPT2TokenizerFast", "bytelevel"),
    "qwen2": ("qwen2", "Qwen2TokenizerFast", "bytelevel"),
    "qwen3": ("qwen3", "Qwen2TokenizerFast", "bytelevel"),
    "opt": ("opt", "GPT2TokenizerFast", "bytelevel"),
    "bloom": ("bloom", "BloomTokenizerFast", "bytelevel"),
    "glm": ("glm", "PreTrainedTokenizerFast", "bytelevel"),
    "falcon": ("falcon", "PreTrainedTokenizerFast", "bytelevel"),
    "gpt_neox": ("gpt_neox", "GPTNeoXTokenizerFast", "bytelevel"),
    "gpt2": ("gpt2", "GPT2TokenizerFast", "bytelevel"),
}

_SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
_LLAMA_LIKE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 512}
# model_type -> tiny shape, in the names of the family's own config class
TINY_SHAPES = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": {**_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2},
    "gemma": {**_LLAMA_LIKE, "head_dim": 16},
    "phi3": {**_LLAMA_LIKE, "num_key_value_heads": 4},
    "qwen2": _LLAMA_LIKE,
    "qwen3": {**_LLAMA_LIKE, "head_dim": 16},
    "glm": {**_LLAMA_LIKE, "head_dim": 16},
    "gptj": {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "n_positions": 512},
    "opt": {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "word_embed_proj_dim": 64, "max_position_embeddings": 512},
    "bloom": {"hidden_size": 64, "n_layer": 2, "n_head": 4},
    "falcon": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "multi_query": True,
               "new_decoder_architecture": False, "max_position_embeddings": 512},
    "gpt_neox": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "max_position_embeddings": 512},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512},
}


def tiny_family_config(model_type: str, vocab_size: int):
    """A 2-layer config of the family's own transformers config class, hidden size 64."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=vocab_size, **_SPECIAL_IDS, **TINY_SHAPES[model_type])


def save_tiny_family(folder: Path, family: str, seed: int = 0) -> Path:
    """A model folder of `family`: tiny random model plus a tokenizer that loads as the family's tokenizer class."""
    from transformers import AutoTokenizer

    model_type, tokenizer_class, style = FAMILIES[family]
    tokenizer = train_sentencepiece_style_tokenizer() if style == "sentencepiece" else train_tokenizer()
    tokenizer.save_pretrained(folder)
    settings_file = folder / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text(encoding="utf-8"))
    settings["tokenizer_class"] = tokenizer_class
    settings_file.write_text(json.dumps(settings, indent=2), encoding="utf-8")
    vocab_size = len(AutoTokenizer.from_pretrained(folder))  # some classes add tokens of their own
    return save_tiny_model(folder, tiny_family_config(model_type, vocab_size), None, seed)
