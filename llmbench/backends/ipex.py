"""ipex: Intel Extension for PyTorch's ipex.llm.optimize (ipex.optimize_transformers on older releases), on cpu or
xpu, decoded by transformers' generate(). IPEX is archived (last release 2.8): it runs only in a matching set of
torch, IPEX and transformers, which requirements-ipex.txt pins for a virtual environment of its own."""

from __future__ import annotations

import contextlib
import sys
import warnings
from importlib import metadata

import torch
from packaging.version import Version

from llmbench.backends.base import Backend, hf_generate
from llmbench.compat import TRANSFORMERS_VERSION
from llmbench.errors import UserError
from llmbench.prompts import PromptInputs
from llmbench.timing import StepTimer

INSTALL_HINT = ("install the matching set in its own virtual environment: bash setup.sh --ipex ~/.venvs/llmbench-ipex "
                "(it pip installs -r requirements-ipex.txt; see docs/backends.md)")
# ipex.llm.optimize of IPEX <= 2.8 crashes on newer transformers (it patches attention classes that moved).
LAST_TRANSFORMERS_FOR_IPEX = {(2, 8): Version("4.51.3"), (2, 7): Version("4.51.3"), (2, 6): Version("4.46.3")}


def check_ipex_cpu() -> None:
    """IPEX's CPU kernels need AVX2 at the least (AVX-512 and AMX are what they are tuned for); without it, the run
    stops here rather than in IPEX's import."""
    from llmbench.host import cpu_kind

    cpu = cpu_kind()
    if cpu.flags and "avx2" not in cpu.flags:
        raise UserError(f"--backend ipex needs a CPU with AVX2 at the least (IPEX's kernels are built for AVX2, "
                        f"AVX-512 and AMX); this one is {cpu.describe()}: use --backend eager or compile")


def check_ipex_environment() -> str:
    """-> the IPEX version, after checking it matches torch and transformers (IPEX exits the process on import when
    torch does not match, so the versions are compared before importing it) and that this CPU can run it."""
    check_ipex_cpu()
    try:
        ipex_version = Version(metadata.version("intel-extension-for-pytorch"))
    except metadata.PackageNotFoundError:
        raise UserError(f"--backend ipex needs Intel Extension for PyTorch, which is not installed; {INSTALL_HINT}") \
            from None
    torch_version = Version(torch.__version__.split("+")[0])
    if ipex_version.release[:2] != torch_version.release[:2]:
        raise UserError(f"intel-extension-for-pytorch {ipex_version} needs torch "
                        f"{'.'.join(map(str, ipex_version.release[:2]))}.x, but torch {torch.__version__} is "
                        f"installed; {INSTALL_HINT}")
    newest = LAST_TRANSFORMERS_FOR_IPEX.get(ipex_version.release[:2])
    if newest is not None and TRANSFORMERS_VERSION > newest:
        raise UserError(f"intel-extension-for-pytorch {ipex_version} works with transformers <= {newest}, but "
                        f"transformers {TRANSFORMERS_VERSION} is installed; {INSTALL_HINT}")
    return str(ipex_version)


def adapt_deepspeed_shard_sizes(model: torch.nn.Module) -> None:
    """IPEX 2.8 slices the input of a DeepSpeed-sharded output head with deepspeed's tp_shard.get_shard_size(total,
    world, "lm_head"), the signature of older DeepSpeed; DeepSpeed 0.19 takes the model's AutoTPMeta third, so the
    name arrives as the meta ("'str' object has no attribute 'num_kv_heads'"). Where a model sharded by DeepSpeed is
    optimized, a name in the meta's place is passed on as the name, with the meta the model was sharded with, and
    the size as a number (IPEX's TorchScript trace passes a traced tensor, which DeepSpeed 0.19's divmod refuses)."""
    import sys

    tp_shard = sys.modules.get("deepspeed.module_inject.tp_shard")
    meta = next((m.tp_meta for m in model.modules() if hasattr(m, "tp_meta")), None)
    if tp_shard is None or meta is None or not hasattr(tp_shard, "AutoTPMeta") or \
            getattr(tp_shard.get_shard_size, "llmbench_adapted", False):
        return
    size, size_list = tp_shard.get_shard_size, tp_shard.get_shard_size_list

    def adapt(function):
        def call(total_size, mp_size, meta_or_name=None, *args, **kwargs):
            with warnings.catch_warnings():  # IPEX's TorchScript trace passes the hidden size as a traced tensor
                warnings.simplefilter("ignore", torch.jit.TracerWarning)  # a constant of the model: as intended
                total_size = int(total_size)
            if not isinstance(meta_or_name, tp_shard.AutoTPMeta):
                return function(total_size, mp_size, meta, meta_or_name, *args, **kwargs)
            return function(total_size, mp_size, meta_or_name, *args, **kwargs)

        call.llmbench_adapted = True
        return call

    tp_shard.get_shard_size, tp_shard.get_shard_size_list = adapt(size), adapt(size_list)


class IpexBackend(Backend):
    name = "ipex"

    def __init__(self) -> None:
        super().__init__()
        self.ipex_version = check_ipex_environment()  # before any model is loaded, where the caller allows

    def prepare(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, config) -> None:
        if device.type not in ("cpu", "xpu"):
            raise UserError(f"--backend ipex runs on cpu or xpu, not {device.type}: use --backend compile on "
                            f"{device.type}")
        import intel_extension_for_pytorch as ipex

        self.device, self.dtype = device, dtype
        model = model.eval()
        woq = getattr(model, "llmbench_ipex_woq", None)  # planned by llmbench.ipex_woq (--woq)
        quantize: dict = {}
        if woq is not None:
            from llmbench.ipex_woq import count_quantized, qconfig_mapping, weight_layers

            before = {name: type(mod) for name, mod in weight_layers(model).items()}
            quantize = {"quantization_config": qconfig_mapping(woq), "low_precision_checkpoint": woq.checkpoint}
        adapt_deepspeed_shard_sizes(model)
        if hasattr(ipex, "llm") and hasattr(ipex.llm, "optimize"):
            api = "ipex.llm.optimize"
            with contextlib.redirect_stdout(sys.stderr):  # its notices ("... has set the optimized model") print
                model = ipex.llm.optimize(model, dtype=dtype, inplace=True, deployment_mode=True,
                                          device=device.type, **quantize)
        else:
            if woq is not None:
                raise UserError(f"--ipex --woq needs ipex.llm.optimize (IPEX 2.3 or newer), not IPEX "
                                f"{self.ipex_version}")
            api = "ipex.optimize_transformers"
            model = ipex.optimize_transformers(model, dtype=dtype, inplace=True, deployment_mode=True)
        self.model = model
        self.details = {"ipex_version": self.ipex_version, "ipex_api": api}
        if woq is not None:
            count_quantized(model, before)
            # The head is a quantized layer of its own now: untied, so that tie_weights() (lm-eval calls it) leaves it.
            model.config.tie_word_embeddings = False
            self.details.update(woq_lowp_mode=woq.lowp_mode,
                                low_precision_checkpoint=woq.settings["checkpoint"] if woq.checkpoint else None)

    def _autocast(self):
        # As in IPEX's own examples: bf16 runs under autocast, so ops it leaves alone still take bf16.
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def generate(self, inputs: PromptInputs, max_new_tokens: int, num_beams: int,
                 timer: StepTimer | None = None) -> torch.Tensor:
        with self._autocast():
            return hf_generate(self.model, inputs, max_new_tokens, num_beams, timer)


def _main() -> int:
    """`python -m llmbench.backends.ipex`: one line saying whether this environment and CPU run IPEX (setup.sh)."""
    import sys

    from llmbench.host import cpu_kind

    try:
        version = check_ipex_environment()
        import intel_extension_for_pytorch  # noqa: F401 - the import is the check
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"intel-extension-for-pytorch {version}, torch {torch.__version__}, transformers {TRANSFORMERS_VERSION}: "
          f"ready on {cpu_kind().describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
