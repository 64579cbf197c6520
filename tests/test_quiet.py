"""DeepSpeed's accelerator notice stays out of single-process runs, which only import DeepSpeed by accident."""

import logging
import os
import subprocess
import sys

from llmbench.pipeline import quiet_libraries
from tests.conftest import ROOT

NOTICE = "Setting accelerator to CPU"

# run_generation.py, telling on stderr whether DeepSpeed was imported (so the test knows the notice had a cause)
TELL_DEEPSPEED = """
import sys
from llmbench.main import main
code = main(sys.argv[1:], prog="run_generation.py")
print("deepspeed imported:", "deepspeed" in sys.modules, file=sys.stderr)
sys.exit(code)
"""


def test_a_plain_run_does_not_print_deepspeeds_accelerator_notice(tmp_path):
    """The first run of the default model converts its GGUF file; transformers' save_pretrained imports DeepSpeed
    on the way (through accelerate), which logs its notice on stdout unless silenced."""
    env = {"LLMBENCH_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", TELL_DEEPSPEED, "--benchmark", "--greedy", "--input-tokens", "8",
                           "--max-new-tokens", "2", "--num-iter", "1", "--num-warmup", "0", "--quiet",
                           "--results", str(tmp_path / "r.jsonl")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "deepspeed imported: True" in proc.stderr
    assert NOTICE not in proc.stdout and NOTICE not in proc.stderr, proc.stdout
    assert "Inference latency:" in proc.stdout


def test_deepspeeds_warnings_show_in_distributed_and_debug_runs():
    deepspeed_logger = logging.getLogger("DeepSpeed")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    deepspeed_logger.addHandler(handler)
    try:
        for verbose, distributed, shown in [(False, False, False), (False, True, True), (True, False, True),
                                            (False, False, False)]:
            seen.clear()
            quiet_libraries(verbose=verbose, no_progress=False, distributed=distributed)
            deepspeed_logger.warning(NOTICE)
            deepspeed_logger.error("a real error")
            assert seen == ([NOTICE] if shown else []) + ["a real error"], (verbose, distributed)
    finally:
        deepspeed_logger.removeHandler(handler)
        quiet_libraries(verbose=True, no_progress=False)
