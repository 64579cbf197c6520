"""--dummy-weights: a model of the real size with random weights, built in place on the device (no download)."""

from __future__ import annotations

from pathlib import Path

import torch

from llmbench.compat import dtype_kwargs
from llmbench.errors import UserError, one_line
from llmbench.families import builtin_config, builtin_names, check_remote_code
from llmbench.memory import require
from llmbench.models import BeforeWeights, LoadedModel, load_tokenizer

try:  # transformers >= 5
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.x
    from transformers.modeling_utils import no_init_weights

# Weights are tiled from one block of N(0, INIT_STD) samples: drawing billions of normal numbers one by one costs
# minutes on a CPU, a copy costs what touching the memory costs. The block's length is prime, so no two rows of a
# weight matrix repeat each other.
INIT_STD = 0.02
BLOCK_ELEMENTS = 1_048_573
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def dummy_config(model_id: str | None, trust_remote_code: bool):
    """-> (transformers config, record name, folder holding a tokenizer or None)."""
    from transformers import AutoConfig

    if model_id is None:
        raise UserError("--dummy-weights needs -m: a built-in model id (e.g. facebook/opt-6.7b), a folder with a "
                        "config.json, or a config.json file")
    path = Path(model_id).expanduser()
    config_file = path / "config.json" if path.is_dir() else path
    if config_file.is_file() and config_file.suffix != ".json":
        raise UserError(f"-m {model_id}: --dummy-weights builds a model from a config.json (a file, or a folder "
                        "holding one), not from this file")
    if config_file.is_file():
        check_remote_code(config_file, model_id, trust_remote_code)
        try:
            config = AutoConfig.from_pretrained(str(config_file), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"-m {model_id}: cannot read {config_file} as a transformers config: {one_line(exc)}") \
                from exc
        folder = config_file.parent
        has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
        return config, model_id, folder if has_tokenizer else None
    if path.is_dir():
        raise UserError(f"-m {model_id}: the folder has no config.json to build dummy weights from")
    config = builtin_config(model_id)
    if config is None:
        raise UserError(f"-m {model_id}: no built-in configuration for --dummy-weights; pass a folder with a "
                        f"config.json, a config.json file, or one of: {', '.join(builtin_names())}")
    return config, config.name_or_path, None


def count_parameters(config, trust_remote_code: bool = False) -> int:
    """Parameters of the model `config` describes, counted on the meta device (nothing is allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def fill_random_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random matrices, unit norm scales and zero biases, written into the parameters where they are."""
    blocks: dict[tuple, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() == 1:
            param.zero_() if name.endswith("bias") else param.fill_(1.0)
            continue
        key = (param.device, param.dtype)
        if key not in blocks:
            sample = torch.empty(BLOCK_ELEMENTS).normal_(0.0, INIT_STD, generator=generator)
            blocks[key] = sample.to(device=param.device, dtype=param.dtype)
        block = blocks[key]
        flat = param.view(-1)
        whole = flat.numel() // block.numel()
        if whole:
            flat[: whole * block.numel()].view(whole, -1).copy_(block.expand(whole, -1))
        rest = flat.numel() - whole * block.numel()
        if rest:
            flat[-rest:].copy_(block[:rest])


def build_random_model(config, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False,
                       seed: int = 0) -> torch.nn.Module:
    """Allocate the model once, in `dtype` on `device` (no float32 copy, no default initialisation), then fill it."""
    from transformers import AutoModelForCausalLM

    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **dtype_kwargs(dtype))
    model.tie_weights()  # skipped with the initialisation
    fill_random_(model, seed)
    return model.eval()


def load_dummy_model(model_id: str | None, device: torch.device, dtype: torch.dtype,
                     trust_remote_code: bool = False, before_weights: BeforeWeights | None = None) -> LoadedModel:
    """A model of `model_id`'s architecture and size with random weights; its tokenizer when a local folder has one,
    else none (inputs are then synthetic token ids). `before_weights(config, tokenizer)` runs before any allocation."""
    config, name, tokenizer_folder = dummy_config(model_id, trust_remote_code)
    tokenizer = None
    if tokenizer_folder is not None:
        try:
            tokenizer = load_tokenizer(str(tokenizer_folder), trust_remote_code)
        except (OSError, ValueError) as exc:
            raise UserError(f"-m {name}: cannot load the tokenizer in {tokenizer_folder}: {one_line(exc)}") from exc
    if before_weights is not None:
        before_weights(config, tokenizer)  # the run's own checks (prompt length, memory) before any allocation
    need = count_parameters(config, trust_remote_code) * dtype.itemsize
    require(need, device, f"-m {name} with --dummy-weights ({str(dtype).removeprefix('torch.')} weights)",
            "pick a smaller model or a device with more memory")
    model = build_random_model(config, device, dtype, trust_remote_code)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source="dummy", dummy_weights=True)
