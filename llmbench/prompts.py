"""Model inputs: exactly N tokens cut from prompt.json for any tokenizer, the user's own text, or synthetic ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from llmbench.errors import UserError
from llmbench.paths import DEFAULT_PROMPT_FILE

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length", "n_ctx")


@dataclass
class PromptInputs:
    input_ids: torch.Tensor  # (batch, tokens), every row the same
    attention_mask: torch.Tensor
    source: str  # where the text came from
    text: str | None  # the prompt as the tokenizer reads it back (None for synthetic ids)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def load_prompt_text(path: Path | None = None, key: str | None = None) -> tuple[str, str]:
    """-> (text, its key) from prompt.json; a broken file is a UserError naming what is wrong."""
    path = path or DEFAULT_PROMPT_FILE
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"prompt file {path} not found: restore it from the repository or pass --prompt TEXT") from None
    except IsADirectoryError:
        raise UserError(f"prompt file {path} is a folder: pass a prompt.json file") from None
    except OSError as exc:
        raise UserError(f"prompt file {path} cannot be read ({exc.strerror or exc}): pass a readable file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"prompt file {path} is not valid JSON ({exc}): restore it from the repository") from None
    texts = data.get("texts") if isinstance(data, dict) else None
    if not isinstance(texts, dict) or not texts:
        raise UserError(f"prompt file {path} has no \"texts\" object: restore it from the repository")
    default = data.get("default_text")
    if default is not None and not isinstance(default, str):
        raise UserError(f"prompt file {path}: \"default_text\" must be the name of one of its texts (a string), "
                        f"not {type(default).__name__} {json.dumps(default)[:60]}")
    key = key or default or next(iter(texts))
    text = texts.get(key)
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"prompt file {path}: texts[{key!r}] is missing or empty")
    return text, key


def model_context_length(config) -> int | None:
    """The longest sequence the model's positions allow (None when unbounded, e.g. ALiBi)."""
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_fits_context(config, input_tokens: int, max_new_tokens: int) -> None:
    limit = model_context_length(config)
    if limit is not None and input_tokens + max_new_tokens > limit:
        raise UserError(f"--input-tokens {input_tokens} + --max-new-tokens {max_new_tokens} exceeds the model's "
                        f"context of {limit} tokens: lower one of them")


def _batch(ids: list[int], batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.tensor([ids] * batch_size, dtype=torch.long, device=device)
    return input_ids, torch.ones_like(input_ids)


def cut_prompt(tokenizer, num_tokens: int, batch_size: int, device: torch.device,
               prompt_file: Path | None = None) -> PromptInputs:
    """Exactly `num_tokens` tokens from the start of the prompt text, as this tokenizer encodes it."""
    text, key = load_prompt_text(prompt_file)
    ids = tokenizer(text)["input_ids"]
    if len(ids) < num_tokens:
        raise UserError(f"--input-tokens {num_tokens}: the prompt text holds only {len(ids)} tokens for this "
                        "tokenizer; lower --input-tokens or pass a longer --prompt")
    ids = ids[:num_tokens]
    input_ids, mask = _batch(ids, batch_size, device)
    return PromptInputs(input_ids, mask, f"prompt.json:{key}", tokenizer.decode(ids))


def user_prompt(tokenizer, text: str, batch_size: int, device: torch.device) -> PromptInputs:
    """The user's --prompt, whole: its token count becomes the run's input length."""
    ids = tokenizer(text)["input_ids"]
    input_ids, mask = _batch(ids, batch_size, device)
    return PromptInputs(input_ids, mask, "--prompt", text)


def synthetic_prompt(vocab_size: int, num_tokens: int, batch_size: int, device: torch.device,
                     seed: int = 0) -> PromptInputs:
    """Random token ids (for models without a tokenizer): timing does not depend on their values."""
    generator = torch.Generator().manual_seed(seed)
    low = min(100, vocab_size - 1)  # keep clear of the special tokens most vocabularies start with
    ids = torch.randint(low, vocab_size, (num_tokens,), generator=generator).tolist()
    input_ids, mask = _batch(ids, batch_size, device)
    return PromptInputs(input_ids, mask, "synthetic", None)
