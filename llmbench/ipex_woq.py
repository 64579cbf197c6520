"""Weight-only quantization through IPEX's own path: ipex.llm.optimize with a weight-only quantization config.

`--ipex --woq int4|int8` quantizes with IPEX's round to nearest while ipex.llm.optimize converts the model (IPEX's
WOQ kernels, in the compute precision of --woq-lowp-mode). A low-precision checkpoint (INT4 weights, scales and zero
points in GPTQ layout: quantization_config in config.json, tensors in *.safetensors) is passed to ipex.llm.optimize
instead, as the seed scripts do: one written by `--woq-checkpoint` (IPEX's own rounding, saved once) or one
calibrated by AutoRound (llmbench/calibrated.py). quantize_model() plans it here; the ipex backend applies it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from llmbench.errors import UserError
from llmbench.models import LoadedModel, one_line

LOWP_MODES = ("auto", "none", "fp16", "bf16", "int8")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PACK = 8  # int4 values per int32 in GPTQ layout
IPEX_BLOCK_N = 32  # output sizes IPEX 2.8 packs from GPTQ layout come in blocks of this many
# quant_method values whose tensors are GPTQ's layout, and the packings of it: GPTQ's original (zero points stored
# less one: "auto_gptq", AutoRound's "auto_round:auto_gptq") and GPTQModel's (zero points as they are: AutoRound's
# "auto_round" and "auto_round:gptqmodel", GPTQModel's checkpoint_format "gptq_v2")
GPTQ_METHODS = ("gptq", "auto-round", "intel/auto-round")
RAW_ZERO_PACKINGS = ("auto_round", "auto_round:gptqmodel")
GPTQ_PACKINGS = ("auto_gptq", "auto_round:auto_gptq", *RAW_ZERO_PACKINGS)
TENSOR_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")


@dataclass
class IpexWoq:
    """What the ipex backend passes to ipex.llm.optimize, and the record's settings it completes afterwards."""
    scheme: str
    group_size: int | None
    lowp_mode: str
    checkpoint: tuple[dict, dict] | None  # (state dict, IPEX's quant config) or None: IPEX rounds to nearest
    settings: dict


def ipex_version() -> str:
    return metadata.version("intel-extension-for-pytorch")


def resolve_lowp_mode(requested: str, scheme: str, device: torch.device, checkpoint: bool) -> str:
    """IPEX's own AUTO rule on cpu (its examples): INT8 compute for INT4 weights or a checkpoint, else BF16;
    float16 on xpu."""
    if requested != "auto":
        return requested
    if device.type == "xpu":
        return "fp16"
    return "int8" if scheme == "int4" or checkpoint else "bf16"


def qconfig_mapping(woq: IpexWoq):
    import intel_extension_for_pytorch as ipex
    from intel_extension_for_pytorch.quantization import WoqLowpMode, WoqWeightDtype

    return ipex.quantization.get_weight_only_quant_qconfig_mapping(
        weight_dtype=WoqWeightDtype.INT4 if woq.scheme == "int4" else WoqWeightDtype.INT8,
        lowp_mode=WoqLowpMode[woq.lowp_mode.upper()], group_size=woq.group_size or -1)


def weight_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers IPEX quantizes: torch.nn.Linear, and DeepSpeed AutoTP's sharded linear layers (kept as DeepSpeed's
    in tensor-parallel runs with --ipex, so that IPEX keeps their all-reduce)."""
    from intel_extension_for_pytorch.nn.utils._weight_prepack import may_import_deepspeed_modules

    kinds = (torch.nn.Linear, *(may_import_deepspeed_modules() or ()))
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, kinds) and getattr(mod, "weight", None) is not None and mod.weight.dim() == 2}


def tensor_parallel() -> tuple[int, int]:
    """(rank, ranks) of a tensor-parallel run, (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def plan(loaded: LoadedModel, config, device: torch.device, dtype: torch.dtype) -> dict:
    """Check the request and attach an IpexWoq to the model for the backend; -> the record's quantization settings
    (the backend adds the layer counts once IPEX has converted the model)."""
    from llmbench.woq_inputs import resolve_group_size

    if device.type not in ("cpu", "xpu"):
        raise UserError(f"--ipex --woq runs on cpu or xpu, not {device.type}")
    if config.woq_algo in ("awq", "gptq"):
        raise UserError(f"--ipex --woq-algo {config.woq_algo}: IPEX takes calibrated weights as a low-precision "
                        "checkpoint: use --woq-algo autoround --calib-dataset SRC --woq-checkpoint DIR")
    in_features = {name: mod.weight.shape[1] for name, mod in weight_layers(loaded.model).items()}
    if not in_features:
        raise UserError(f"--woq: -m {loaded.name} has no linear layers to quantize")
    folder = config.woq_checkpoint
    if folder is not None and tensor_parallel()[1] > 1:
        raise UserError("--ipex --woq-checkpoint in a tensor-parallel run is not supported: run the checkpoint in "
                        "one process, or drop --woq-checkpoint (IPEX then quantizes each rank's shard itself)")
    checkpoint, made_by, calibration = None, "intel-extension-for-pytorch (round to nearest)", None
    if config.woq_algo == "autoround" and (folder is None or not folder.exists()):
        from llmbench.calibrated import autoround_checkpoint

        autoround_checkpoint(loaded, config, device, folder)
    if folder is not None and folder.exists():
        if device.type != "cpu":
            raise UserError("--ipex --woq-checkpoint: IPEX loads low-precision checkpoints on cpu only")
        checkpoint, saved = read_checkpoint(folder, loaded, config.woq)
        group_size = saved.get("group_size")
        if config.woq_group_size is not None and config.woq_group_size != group_size:
            raise UserError(f"--woq-checkpoint {folder} has group size {group_size}, not --woq-group-size "
                            f"{config.woq_group_size}: drop the flag, or pass another path to quantize afresh")
        made_by = saved.get("made_by") or saved.get("quant_method")
        algo = "autoround" if "auto-round" in str(saved.get("quant_method")) else saved.get("algo", "rtn")
        if algo == "autoround":
            from llmbench.calibrated import read_settings

            calibration = read_settings(folder)["calibration"]
        if algo != config.woq_algo:
            raise UserError(f"--woq-checkpoint {folder} was made with --woq-algo {algo}, not {config.woq_algo}: "
                            "rerun with its settings, or pass another path to quantize afresh")
    else:
        group_size = resolve_group_size(config.woq, config.woq_group_size, in_features)
        if folder is not None:
            if config.woq != "int4":
                raise UserError("--ipex --woq-checkpoint holds INT4 weights in GPTQ layout: use --woq int4, or drop "
                                "--woq-checkpoint")
            if device.type != "cpu":
                raise UserError("--ipex --woq-checkpoint: IPEX loads low-precision checkpoints on cpu only")
            write_rtn_checkpoint(loaded, group_size, folder, dtype)
            checkpoint, _ = read_checkpoint(folder, loaded, config.woq)
    lowp = resolve_lowp_mode(config.woq_lowp_mode, config.woq, device, checkpoint is not None)
    settings = {
        "scheme": config.woq, "group_size": group_size, "algo": config.woq_algo,
        "library": f"intel-extension-for-pytorch {ipex_version()}", "lowp_mode": lowp,
        "layout": "IPEX WeightOnlyQuantizedLinear", "weights_from": made_by, "calibration": calibration,
        "model": loaded.name, "architecture": type(loaded.model).__name__,
        "dtype": str(dtype).removeprefix("torch."), "device": device.type,
        "checkpoint": str(folder) if folder is not None else None,
    }
    loaded.model.llmbench_ipex_woq = IpexWoq(config.woq, group_size, lowp, checkpoint, settings)
    return settings


def count_quantized(model: torch.nn.Module, before: dict[str, type]) -> None:
    """After ipex.llm.optimize: the layers (name -> class before) still of their class were left unquantized."""
    woq: IpexWoq = model.llmbench_ipex_woq
    after = {name: type(mod) for name, mod in model.named_modules()}
    skipped = [name for name, kind in before.items() if after.get(name) is kind]
    woq.settings.update(quantized_layers=len(before) - len(skipped), skipped_layers=skipped)
    if not any("WeightOnlyQuantized" in type(mod).__name__ for mod in model.modules()):
        raise UserError(f"--ipex --woq {woq.scheme}: IPEX quantized no layer of this model "
                        f"({woq.settings['architecture']} is not among the families ipex.llm.optimize quantizes)")


# ---- low-precision checkpoints in GPTQ layout ----

def _to_int32(packed: torch.Tensor) -> torch.Tensor:
    """int64 holding 32 unsigned bits -> the int32 with those bits."""
    packed = packed & 0xFFFFFFFF
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def pack_gptq(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> dict:
    """GPTQ layout from integer weights q [N, K] (0..15), zero points and scales [N, K/group]: qweight [K/8, N] and
    qzeros [groups, N/8] int32 (8 values each, first in the low bits; zero points stored less one), scales
    [groups, N] float16, g_idx [K]."""
    q, zeros = q.to(torch.int64), zeros.to(torch.int64)
    n, k = q.shape
    shifts = torch.arange(PACK, dtype=torch.int64) * 4
    qweight = (q.t().reshape(k // PACK, PACK, n) << shifts.view(1, PACK, 1)).sum(1)
    zminus = ((zeros - 1) & 0xF).t()  # [groups, N]
    qzeros = (zminus.reshape(zminus.shape[0], n // PACK, PACK) << shifts).sum(-1)
    return {"qweight": _to_int32(qweight), "qzeros": _to_int32(qzeros),
            "scales": scales.t().contiguous().to(torch.float16),
            "g_idx": torch.arange(k, dtype=torch.int32) // group_size}


def zeros_less_one(qzeros: torch.Tensor) -> torch.Tensor:
    """Packed INT4 zero points (int32, 8 per value, first in the low bits) -> the same with each stored less one."""
    shifts = torch.arange(PACK, dtype=torch.int64) * 4
    zeros = (qzeros.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF
    return _to_int32((((zeros - 1) & 0xF) << shifts).sum(-1))


def ipex_rtn(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPEX's own asymmetric INT4 rounding per group -> (q [N, K] in 0..15, zero points, scales [N, groups])."""
    from intel_extension_for_pytorch.quantization import WoqWeightDtype, quantize_per_block

    packed, scales, zeros = quantize_per_block(weight.float(), WoqWeightDtype.INT4, group_size, None, None, False)
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(weight.shape[0], -1)[:, :weight.shape[1]]
    return q, zeros.round(), scales


def write_rtn_checkpoint(loaded: LoadedModel, group_size: int, folder: Path, dtype: torch.dtype) -> None:
    """IPEX's INT4 rounding of every linear layer, saved as a GPTQ-layout model folder (--woq-checkpoint)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from llmbench.woq_inputs import linear_layers

    linears = linear_layers(loaded.model)
    bad = [name for name, mod in linears.items() if mod.out_features % PACK or mod.in_features % group_size]
    if bad:
        raise UserError(f"--ipex --woq-checkpoint: layer {bad[0]} does not fit GPTQ's layout (output size a multiple "
                        f"of {PACK}, input size of {group_size}): drop --woq-checkpoint")
    state = {}
    with torch.no_grad():
        for name, mod in tqdm(linears.items(), desc="quantizing (IPEX, int4)", leave=False):
            state.update({f"{name}.{key}": value for key, value in
                          pack_gptq(*ipex_rtn(mod.weight, group_size), group_size).items()})
            if mod.bias is not None:
                state[f"{name}.bias"] = mod.bias.detach().to(torch.float16)
        quantized = {f"{name}.weight" for name in linears}
        seen: set[int] = set()
        for key, tensor in loaded.model.state_dict().items():
            if key not in quantized and tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                state[key] = tensor.detach().to(dtype).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    model_config = loaded.model.config.to_dict()
    model_config.update(tie_word_embeddings=False, quantization_config={
        "quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False, "sym": False,
        "checkpoint_format": "gptq", "made_by": f"intel-extension-for-pytorch {ipex_version()} round to nearest"})
    (folder / CONFIG_FILE).write_text(json.dumps(model_config, indent=2) + "\n", encoding="utf-8")
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(folder)


def read_checkpoint(folder: Path, loaded: LoadedModel, scheme: str) -> tuple[tuple[dict, dict], dict]:
    """A GPTQ-layout folder (ours, AutoRound's, a GPTQ hub model) -> ((state dict of its quantized layers, IPEX's
    quant config), the folder's quantization_config)."""
    from safetensors.torch import load_file

    try:
        model_config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        saved = model_config["quantization_config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--woq-checkpoint {folder} is not a low-precision checkpoint (it needs {CONFIG_FILE} with a "
                        f"quantization_config): {one_line(exc)}; remove it, or pass a new path to create one") from exc
    method, bits = saved.get("quant_method"), saved.get("bits", 4)
    packing = str(saved.get("packing_format", "auto_gptq"))
    if method not in GPTQ_METHODS or packing not in GPTQ_PACKINGS or saved.get("desc_act"):
        raise UserError(f"--woq-checkpoint {folder}: quant_method {method!r} (packing {packing!r}) is not GPTQ's "
                        "layout without act-order, which is what this suite passes to IPEX")
    if bits != 4 or scheme != "int4":
        raise UserError(f"--woq-checkpoint {folder} holds {bits}-bit weights: run it with --woq int4")
    architecture = (model_config.get("architectures") or [None])[0]
    if architecture not in (None, type(loaded.model).__name__):
        raise UserError(f"--woq-checkpoint {folder} is a {architecture}, but -m {loaded.name} is a "
                        f"{type(loaded.model).__name__}: pass the model it was made from")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"--woq-checkpoint {folder} has no .safetensors file")
    tensors: dict = {}
    try:
        for file in files:
            tensors.update(load_file(str(file)))
    except Exception as exc:  # noqa: BLE001 - a corrupt file fails in several ways
        raise UserError(f"--woq-checkpoint {folder}: cannot read {file.name}: {one_line(exc)}") from exc
    layers = {key.removesuffix(".qweight") for key in tensors if key.endswith(".qweight")}
    # IPEX's GPTQ-layout packing takes output sizes in blocks of IPEX_BLOCK_N (it ends the process on others):
    # such layers are left out, and IPEX rounds them itself (the same rounding --woq-checkpoint writes)
    layers = {layer for layer in layers if tensors[f"{layer}.qweight"].shape[1] % IPEX_BLOCK_N == 0}
    if not layers:
        raise UserError(f"--woq-checkpoint {folder} holds no quantized layer (no .qweight tensor)")
    state = {f"{layer}.{suffix}": tensors[f"{layer}.{suffix}"] for layer in layers for suffix in TENSOR_SUFFIXES
             if f"{layer}.{suffix}" in tensors}
    if packing in RAW_ZERO_PACKINGS or saved.get("checkpoint_format") == "gptq_v2":
        # zero points stored as themselves: IPEX reads GPTQ's original form, which stores them less one
        for layer in layers:
            state[f"{layer}.qzeros"] = zeros_less_one(state[f"{layer}.qzeros"])
    quant_config = {"quant_method": "gptq", "group_size": saved.get("group_size"), "desc_act": False, "bits": 4}
    return (state, quant_config), saved
