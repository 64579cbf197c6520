"""Calibrated INT4 with AutoRound (Intel's auto-round): sign-gradient rounding tuned block by block on calibration
text, on cpu as well as GPUs, saved in AutoRound's format (GPTQ's tensor layout, quant_method "auto-round").

`--woq int4 --woq-algo autoround --calib-dataset SRC --woq-checkpoint DIR` calibrates once and writes DIR (a model
folder transformers loads); a later run with DIR existing loads it. The main environment runs it through
transformers' AutoRound integration (auto-round's own CPU/GPU kernels); the IPEX environment passes it to
ipex.llm.optimize as a low-precision checkpoint (llmbench/ipex_woq.py).
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import torch

from llmbench.errors import UserError
from llmbench.models import LoadedModel, one_line

DEFAULT_ITERS = 200  # AutoRound's own default
# asymmetric, as the round-to-nearest INT4 it is compared with (TorchAO's and IPEX's); written in GPTQ's tensor layout
# with zero points as they are (GPTQModel's packing), which auto-round's CPU kernels run and IPEX loads
# (AutoRound's plain "auto_round" format writes asymmetric INT4 in AWQ's layout, which neither does)
PACKING = "auto_round:gptqmodel"
CALIBRATION_FILE = "llmbench_calibration.json"
CALIB_BATCH = 4


def autoround_version() -> str | None:
    try:
        return metadata.version("auto-round")
    except metadata.PackageNotFoundError:
        return None


def autoround_checkpoint(loaded: LoadedModel, config, device: torch.device, folder: Path | None) -> None:
    """Calibrate loaded.model with AutoRound (it is changed in place) and write the INT4 checkpoint to folder."""
    from llmbench.woq_inputs import CALIB_MAX_TOKENS, calibration_texts, linear_layers, resolve_group_size

    if folder is None:
        raise UserError("--woq-algo autoround saves its calibrated weights: pass --woq-checkpoint DIR (written once, "
                        "loaded by later runs)")
    if config.woq != "int4":
        raise UserError("--woq-algo autoround makes INT4 checkpoints: use --woq int4")
    if autoround_version() is None:
        raise UserError("--woq-algo autoround needs the auto-round package, which is not installed here: make the "
                        f"checkpoint in the main environment (bash setup.sh), then pass --woq-checkpoint {folder}")
    if loaded.tokenizer is None:
        raise UserError("--woq-algo autoround calibrates on text, and this model has no tokenizer: use --woq-algo rtn")
    samples = token_windows(loaded.tokenizer, calibration_texts(config.calib_dataset, "autoround", limit=10_000))
    in_features = {name: mod.in_features for name, mod in linear_layers(loaded.model).items()}
    group_size = resolve_group_size("int4", config.woq_group_size, in_features)
    from auto_round import AutoRound

    iters = config.calib_iters or DEFAULT_ITERS
    print(f"calibrating with AutoRound {autoround_version()}: {len(samples)} windows of {CALIB_MAX_TOKENS} tokens, "
          f"{iters} steps per block, group size {group_size}", file=sys.stderr)
    try:
        rounder = AutoRound(loaded.model.float(), loaded.tokenizer, scheme="W4A16", bits=4, group_size=group_size,
                            sym=False, iters=iters, nsamples=len(samples), seqlen=CALIB_MAX_TOKENS,
                            batch_size=min(CALIB_BATCH, len(samples)), dataset=samples, device_map=device.type,
                            enable_torch_compile=False)
        rounder.quantize_and_save(str(folder), format=PACKING)
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise UserError(f"--woq-algo autoround failed: {one_line(exc)}") from exc
    _flatten_output(folder)
    # AutoRound's config leaves out settings at its defaults: the calibration is written down here in full
    calibration = {"iters": iters, "nsamples": len(samples), "seqlen": CALIB_MAX_TOKENS, "sym": False,
                   "group_size": group_size, "dataset": str(config.calib_dataset), "made_by": f"auto-round "
                   f"{autoround_version()}", "from_model": loaded.name}
    (folder / CALIBRATION_FILE).write_text(json.dumps(calibration, indent=2) + "\n", encoding="utf-8")


def token_windows(tokenizer, texts: list[str]) -> list[torch.Tensor]:
    """The passages as one token stream cut into CALIB_SAMPLES windows of CALIB_MAX_TOKENS ids each ([1, n] tensors):
    AutoRound skips any sample shorter than its sequence length."""
    from llmbench.woq_inputs import CALIB_MAX_TOKENS, CALIB_SAMPLES

    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    windows = [ids[start:start + CALIB_MAX_TOKENS].unsqueeze(0)
               for start in range(0, len(ids) - CALIB_MAX_TOKENS + 1, CALIB_MAX_TOKENS)][:CALIB_SAMPLES]
    if not windows:
        raise UserError(f"--calib-dataset holds {len(ids)} tokens, fewer than the {CALIB_MAX_TOKENS} of one "
                        "calibration window: give more text")
    return windows


def _flatten_output(folder: Path) -> None:
    """AutoRound writes into a subfolder named after the model and scheme: move its files up to folder itself."""
    if (folder / "config.json").exists():
        return
    inner = [p for p in folder.iterdir() if p.is_dir() and (p / "config.json").exists()]
    if len(inner) != 1:
        raise UserError(f"--woq-algo autoround wrote no model folder under {folder}")
    for item in inner[0].iterdir():
        item.rename(folder / item.name)
    inner[0].rmdir()


def load_autoround(loaded: LoadedModel, config, device: torch.device, dtype: torch.dtype) -> dict:
    """Main environment: calibrate when --woq-checkpoint does not exist yet, then load the folder with transformers'
    AutoRound integration (auto-round's kernels) in place of loaded.model; -> the record's settings."""
    from transformers import AutoModelForCausalLM

    from llmbench.compat import dtype_kwargs
    from llmbench.woq_inputs import linear_layers

    folder = config.woq_checkpoint
    if folder is None or not folder.exists():
        autoround_checkpoint(loaded, config, device, folder)
    settings = read_settings(folder)
    if config.woq_group_size is not None and settings.get("group_size") != config.woq_group_size:
        raise UserError(f"--woq-checkpoint {folder} has group size {settings.get('group_size')}, not "
                        f"--woq-group-size {config.woq_group_size}: drop the flag, or pass another path")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **dtype_kwargs(dtype), device_map=device.type)
    except (ImportError, ValueError, RuntimeError, OSError) as exc:
        raise UserError(f"--woq-checkpoint {folder}: transformers cannot load it here: {one_line(exc)}") from exc
    loaded.model = model.eval()
    skipped = list(linear_layers(model))
    layouts = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
    return {"scheme": "int4", "group_size": settings.get("group_size"), "algo": "autoround",
            "library": f"auto-round {autoround_version()}", "calibration": settings.get("calibration"),
            "layout": ", ".join(layouts) or None, "model": loaded.name, "architecture": type(model).__name__,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "device": device.type,
            "quantized_layers": sum(1 for m in model.modules() if hasattr(m, "qweight")),
            "skipped_layers": skipped, "checkpoint": str(folder)}


def read_settings(folder: Path) -> dict:
    """The quantization_config of an AutoRound folder, checked to be one."""
    try:
        saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--woq-checkpoint {folder} is not an AutoRound checkpoint (config.json with a "
                        f"quantization_config): {one_line(exc)}; remove it, or pass a new path") from exc
    if "auto-round" not in str(saved.get("quant_method")):
        raise UserError(f"--woq-checkpoint {folder} was made by {saved.get('quant_method')!r}, not AutoRound: drop "
                        "--woq-algo autoround, or pass another path")
    try:
        saved["calibration"] = json.loads((folder / CALIBRATION_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a folder made elsewhere: what its config says
        saved["calibration"] = {k: saved.get(k) for k in ("iters", "nsamples", "seqlen", "sym") if k in saved}
    return saved
