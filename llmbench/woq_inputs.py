"""What every weight-only quantizer shares (TorchAO's, IPEX's, AutoRound's): which layers are linear, the group
size a scheme and model allow, and the calibration passages of the calibrated algorithms."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmbench.errors import UserError, one_line

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torchao's int4 kernels accept
DEFAULT_INT4_GROUP_SIZE = 32  # the most accurate of them, and as fast as 64 on CPU
CALIB_SAMPLES = 32  # calibration passages for AWQ, each cut to CALIB_MAX_TOKENS
CALIB_MAX_TOKENS = 256



def linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


def resolve_group_size(scheme: str, requested: int | None, in_features: dict[str, int]) -> int | None:
    """The group size to use (None: INT8 per output channel); a size that leaves a layer out is bad input."""
    sizes = sorted(set(in_features.values()))
    if scheme == "int4":
        valid = [g for g in INT4_GROUP_SIZES if all(k % g == 0 for k in sizes)]
        if requested is None:
            if not valid:
                raise UserError(f"--woq int4: no group size in {INT4_GROUP_SIZES} divides every linear layer's input "
                                f"size {sizes}: this model cannot be quantized to int4 whole; try --woq int8")
            return DEFAULT_INT4_GROUP_SIZE if DEFAULT_INT4_GROUP_SIZE in valid else valid[-1]
        if requested not in INT4_GROUP_SIZES:
            raise UserError(f"--woq-group-size {requested}: int4 kernels take {', '.join(map(str, INT4_GROUP_SIZES))}"
                            f" (valid for this model: {', '.join(map(str, valid)) or 'none'})")
    else:
        if requested is None:
            return None
        valid = [g for g in (16, 32, 64, 128, 256) if all(k % g == 0 for k in sizes)]
    bad = {name: k for name, k in in_features.items() if k % requested}
    if bad:
        name, k = next(iter(bad.items()))
        raise UserError(f"--woq-group-size {requested} does not divide the input size {k} of layer {name} "
                        f"({len(bad)} layers): valid group sizes here: {', '.join(map(str, valid)) or 'none'}")
    return requested


def calibration_texts(source: str | None, algo: str, limit: int = CALIB_SAMPLES) -> list[str]:
    """Up to `limit` passages from a local .jsonl ("text" field), prompt file (.json in prompt.json's form) or
    text file (blank-line separated), or a dataset name the `datasets` library can load (from its cache when
    offline)."""
    if not source:
        raise UserError(f"--woq-algo {algo} calibrates on sample text: pass --calib-dataset FILE (.txt, or .jsonl "
                        "with a \"text\" field) or a dataset name, or use --woq-algo rtn")
    path = Path(source).expanduser()
    if path.is_file():
        raw = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".json":  # a prompt file (prompt.json's form): the passages of its default text
            from llmbench.prompts import load_prompt_text

            texts = load_prompt_text(path)[0].split("\n\n")
        elif path.suffix == ".jsonl":
            try:
                texts = [json.loads(line).get("text", "") for line in raw.splitlines() if line.strip()]
            except (ValueError, AttributeError) as exc:
                raise UserError(f"--calib-dataset {source}: not JSON lines with a \"text\" field: "
                                f"{one_line(exc)}") from exc
        else:
            texts = raw.split("\n\n")
    else:
        try:
            import datasets

            data = datasets.load_dataset(source, split="train")
            texts = [row.get("text", "") for row in data.select(range(min(len(data), 4 * CALIB_SAMPLES)))]
        except Exception as exc:  # noqa: BLE001 - datasets raises many kinds for a missing or offline dataset
            raise UserError(f"--calib-dataset {source}: no such file, and not a loadable dataset "
                            f"({one_line(exc)}): pass a local .txt or .jsonl file") from exc
    texts = [t.strip() for t in texts if t and t.strip()][:limit]
    if not texts:
        raise UserError(f"--calib-dataset {source} holds no text to calibrate on")
    return texts
