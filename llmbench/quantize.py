"""Weight-only INT8/INT4 quantization with TorchAO: quantize at load, save and reload low-precision checkpoints."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import torch

from llmbench.errors import UserError, exception_name, one_line
from llmbench.models import LoadedModel
from llmbench.woq_inputs import CALIB_MAX_TOKENS, calibration_texts, linear_layers, resolve_group_size

WEIGHTS_FILE = "quantized_state_dict.pt"
SETTINGS_FILE = "woq_settings.json"
CHECKPOINT_FORMAT = 1
# Settings a checkpoint must share with the run that loads it.
MATCHED_KEYS = ("scheme", "group_size", "algo", "layout", "model", "architecture", "dtype", "device")


def packable(scheme: str, device: torch.device):
    """-> filter_fn for quantize_: the CPU int4 packing needs the output size to be a multiple of 16 (a layer
    left out this way is reported in skipped_layers)."""
    def accept(mod: torch.nn.Module, fqn: str = "") -> bool:
        if not isinstance(mod, torch.nn.Linear):
            return False
        return not (scheme == "int4" and device.type == "cpu" and mod.out_features % 16)
    return accept


def torchao_config(scheme: str, group_size: int | None, device: torch.device):
    """The TorchAO config for this scheme on this device (torchao 0.18)."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, PerGroup, PerRow

    if scheme == "int8":
        return Int8WeightOnlyConfig(granularity=PerGroup(group_size) if group_size else PerRow(),
                                    set_inductor_config=False)
    if device.type == "cpu":
        # The default Int4WeightOnlyConfig layout needs a GPU kernel package; this one packs for
        # aten._weight_int4pack_mm_for_cpu, and inductor generates fast kernels for it.
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)
    packing = "plain_int32" if device.type == "xpu" else "tile_packed_to_4d"  # tinygemm on CUDA, in core torch
    return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format=packing, set_inductor_config=False)


def quantized_state(model: torch.nn.Module) -> tuple[list[str], list[str], str | None]:
    """-> (quantized layer names, skipped layer names, the weight layout) by looking at what each linear holds."""
    quantized, skipped, layouts = [], [], set()
    for name, mod in linear_layers(model).items():
        kind = type(mod.weight.data if isinstance(mod.weight, torch.nn.Parameter) else mod.weight)
        if kind is torch.Tensor:
            skipped.append(name)
        else:
            quantized.append(name)
            layouts.add(kind.__name__)
    return quantized, skipped, ", ".join(sorted(layouts)) or None


def settings_for(loaded: LoadedModel, config, device: torch.device, dtype: torch.dtype, group_size: int | None,
                 layout: str) -> dict:
    import torchao

    return {
        "scheme": config.woq,
        "group_size": group_size,
        "algo": config.woq_algo,
        "library": f"torchao {torchao.__version__}",
        "layout": layout,
        "model": loaded.name,
        "architecture": type(loaded.model).__name__,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
    }


def quantize_model(loaded: LoadedModel, config, device: torch.device, dtype: torch.dtype) -> dict:
    """Quantize loaded.model in place (or load it from --woq-checkpoint); -> the settings for every record."""
    model = loaded.model
    existing = getattr(model.config, "quantization_config", None)
    if existing is not None:
        method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", "?")
        raise UserError(f"-m {loaded.name} is already quantized ({getattr(method, 'value', method)}); "
                        "drop --woq to run it as it is")
    if config.backend == "ipex":  # IPEX quantizes while ipex.llm.optimize converts the model
        from llmbench.ipex_woq import plan

        return plan(loaded, config, device, dtype)
    linears = linear_layers(model)
    if not linears:
        raise UserError(f"--woq: -m {loaded.name} has no torch.nn.Linear layers to quantize")
    if config.woq_algo == "autoround":
        from llmbench.calibrated import load_autoround

        return load_autoround(loaded, config, device, dtype)
    if importlib.util.find_spec("torchao") is None:  # the IPEX environment has none
        raise UserError(f"--woq {config.woq} quantizes with torchao, which is not installed here: add --ipex (IPEX's "
                        "own weight-only path) or run in the main environment (bash setup.sh)")
    accept = packable(config.woq, device)
    in_features = {name: mod.in_features for name, mod in linears.items() if accept(mod, name)}
    checkpoint = config.woq_checkpoint
    if checkpoint is not None and checkpoint.exists():
        settings = load_checkpoint(loaded, config, device, dtype, checkpoint, in_features)
    else:
        group_size = resolve_group_size(config.woq, config.woq_group_size, in_features)
        quantize_in_place(loaded, config, device, group_size)
        settings = settings_for(loaded, config, device, dtype, group_size, quantized_state(model)[2])
        if checkpoint is not None:
            save_checkpoint(model, settings, checkpoint)
    quantized, skipped, _ = quantized_state(model)
    if not quantized:
        raise UserError(f"--woq {config.woq}: no layer of -m {loaded.name} was quantized")
    return {**settings, "quantized_layers": len(quantized), "skipped_layers": skipped,
            "checkpoint": str(checkpoint) if checkpoint is not None else None}


def quantize_in_place(loaded: LoadedModel, config, device: torch.device, group_size: int | None) -> None:
    from torchao.quantization import quantize_

    base = torchao_config(config.woq, group_size, device)
    accept = packable(config.woq, device)
    texts = calibration_texts(config.calib_dataset, config.woq_algo) if config.woq_algo != "rtn" else []
    if texts and loaded.tokenizer is None:
        raise UserError(f"--woq-algo {config.woq_algo} calibrates on text, and this model has no tokenizer: "
                        "use --woq-algo rtn")
    with torch.no_grad():
        if config.woq_algo == "rtn":
            quantize_(loaded.model, base, filter_fn=accept)
        elif config.woq_algo == "awq":
            from torchao.prototype.awq import AWQConfig
            from torchao.prototype.awq.core import AWQObservedLinear

            quantize_(loaded.model, AWQConfig(base, step="prepare"), filter_fn=accept)
            calibrate(loaded, texts, device, config.quiet)
            quantize_(loaded.model, AWQConfig(base, step="convert"),
                      filter_fn=lambda mod, fqn="": isinstance(mod, AWQObservedLinear))
        else:
            gptq_quantize(loaded, config, device, group_size, accept, texts)


def gptq_quantize(loaded: LoadedModel, config, device: torch.device, group_size: int | None, accept,
                  texts: list[str]) -> None:
    """GPTQ: gather each layer's Hessian on calibration text, then quantize column by column (torchao, CUDA)."""
    from torchao.prototype.gptq import GPTQConfig
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    if device.type != "cuda":
        raise UserError(f"--woq-algo gptq is not supported on {device.type}: torchao's GPTQ runs on CUDA only; "
                        "use --woq-algo awq (calibrated) or rtn")
    base = Int8WeightOnlyConfig() if config.woq == "int8" else Int4WeightOnlyConfig(group_size=group_size)
    try:
        observe, convert = (GPTQConfig(step=step, base_config=base) for step in ("observe", "convert"))
    except ValueError as exc:  # int4 GPTQ needs the mslk kernel package
        raise UserError(f"--woq-algo gptq --woq {config.woq}: {one_line(exc)}") from exc
    quantize_(loaded.model, observe, filter_fn=accept)
    calibrate(loaded, texts, device, config.quiet)
    quantize_(loaded.model, convert, filter_fn=accept)


def calibrate(loaded: LoadedModel, texts: list[str], device: torch.device, quiet: bool) -> None:
    """Forward passes over the calibration passages, for the observers quantize_ inserted."""
    from tqdm.auto import tqdm

    for text in tqdm(texts, desc="calibrating", disable=quiet, file=sys.stderr):
        ids = loaded.tokenizer(text, return_tensors="pt", truncation=True, max_length=CALIB_MAX_TOKENS).input_ids
        loaded.model(ids.to(device))


def save_checkpoint(model: torch.nn.Module, settings: dict, folder: Path) -> None:
    """The quantized state dict (torchao tensor subclasses pickle as themselves) and the settings as JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / WEIGHTS_FILE)
    meta = {"format": CHECKPOINT_FORMAT, **settings}
    (folder / SETTINGS_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def checkpoint_tensor_classes() -> list[type]:
    """The TorchAO tensor subclasses a saved state dict may hold: the only globals its pickle may name (torchao
    0.18 places them in these modules; the CPU int4 one is a prototype)."""
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization import (
        Int4PlainInt32Tensor,
        Int4PreshuffledTensor,
        Int4Tensor,
        Int4TilePackedTo4dTensor,
        Int8Tensor,
    )

    return [Int8Tensor, Int4OpaqueTensor, Int4Tensor, Int4PlainInt32Tensor, Int4PreshuffledTensor,
            Int4TilePackedTo4dTensor]


def read_weights(path: Path, device: torch.device, folder: Path, trust_pickle: bool) -> dict:
    """The saved state dict, read with torch.load(weights_only=True): its pickle may build tensors and the TorchAO
    tensor classes, nothing else, so a crafted file cannot run code. --trust-checkpoint-pickle lifts that."""
    import pickle

    try:
        if trust_pickle:
            state = torch.load(path, map_location=device, weights_only=False)
        else:
            with torch.serialization.safe_globals(checkpoint_tensor_classes()):
                state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(exc))  # torch words it two ways
        if unsafe:
            raise UserError(f"--woq-checkpoint {folder}: {WEIGHTS_FILE} names {unsafe.group(1)}, which is not a "
                            "tensor type, so it was not loaded (a pickle can run code); pass "
                            "--trust-checkpoint-pickle only if you made this checkpoint yourself") from None
        why = re.search(r"WeightsUnpickler error:(.*?)(Check the documentation|$)", str(exc), re.S)
        raise UserError(f"--woq-checkpoint {folder}: {WEIGHTS_FILE} is not a checkpoint of tensors (corrupt, or "
                        f"pickled with more than tensors: {one_line(Exception(why.group(1) if why else exc))}): "
                        "remove the folder to quantize afresh") from None
    except Exception as exc:  # noqa: BLE001 - parsing foreign bytes fails in many ways (IndexError, EOFError, ...)
        raise UserError(f"--woq-checkpoint {folder}: cannot load {WEIGHTS_FILE} (corrupt or truncated?): "
                        f"{exception_name(exc)}: {one_line(exc)}") from exc
    if not isinstance(state, dict):
        raise UserError(f"--woq-checkpoint {folder}: {WEIGHTS_FILE} holds a {type(state).__name__}, not a state dict")
    return state


def load_checkpoint(loaded: LoadedModel, config, device: torch.device, dtype: torch.dtype, folder: Path,
                    in_features: dict[str, int]) -> dict:
    """Put the saved quantized weights into the model skeleton, after checking they were made for this run."""
    settings_path, weights_path = folder / SETTINGS_FILE, folder / WEIGHTS_FILE
    if not folder.is_dir() or not settings_path.is_file() or not weights_path.is_file():
        raise UserError(f"--woq-checkpoint {folder} exists but is not a quantized checkpoint (it needs "
                        f"{SETTINGS_FILE} and {WEIGHTS_FILE}): remove it, or pass a new path to create one there")
    try:
        saved = json.loads(settings_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"--woq-checkpoint {folder}: unreadable {SETTINGS_FILE}: {one_line(exc)}") from exc
    group_size = config.woq_group_size if config.woq_group_size is not None else saved.get("group_size")
    if config.woq_group_size is not None:
        resolve_group_size(config.woq, group_size, in_features)
    wanted = settings_for(loaded, config, device, dtype, group_size, saved.get("layout"))
    wanted["layout"] = saved.get("layout")  # the layout follows from scheme and device, compared through them
    differ = [f"{key} {saved.get(key)!r} (this run: {wanted[key]!r})" for key in MATCHED_KEYS
              if saved.get(key) != wanted[key]]
    if differ:
        raise UserError(f"--woq-checkpoint {folder} was made with other settings: {'; '.join(differ)}; "
                        "rerun with its settings, or pass another path to quantize afresh")
    state = read_weights(weights_path, device, folder, config.trust_checkpoint_pickle)
    try:
        loaded.model.load_state_dict(state, assign=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise UserError(f"--woq-checkpoint {folder}: {WEIGHTS_FILE} does not fit this model: {one_line(exc)}") from exc
    loaded.model.eval()
    return {**wanted, "library": saved.get("library", wanted["library"])}
