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
