import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import save_tiny_model, tiny_llama_config, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    config.addinivalue_line("markers", "ipex: needs the IPEX environment; runs only with LLMBENCH_IPEX_TESTS=1")


def pytest_collection_modifyitems(config, items):
    """IPEX tests need their own environment (torch 2.8, transformers 4.51): opt-in, deselected otherwise."""
    if os.environ.get("LLMBENCH_IPEX_TESTS"):
        return
    deselected = [item for item in items if item.get_closest_marker("ipex")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("ipex")]


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module")
def ops():
    """The suite's CPU kernels (torch.ops.llmbench_cpu), built for this host."""
    import torch

    from llmbench.backends import cpu_kernels

    why_not = cpu_kernels.load()  # must build on every machine the suite runs on (g++ and ninja come with setup)
    assert why_not is None, why_not
    return torch.ops.llmbench_cpu


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer) -> Path:
    """A saved 2-layer Llama (hidden size 64) with its tokenizer: a model folder for -m."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    return save_tiny_model(folder, tiny_llama_config(len(tokenizer)), tokenizer)


def run_cli(*args: str, script: str = "run_generation.py", timeout: float = 600, env: dict | None = None):
    """Run an entry script as a user would; returns the CompletedProcess (text)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture
def cli():
    return run_cli


def error_lines(stderr: str) -> list[str]:
    """stderr without progress-bar lines: what a user reads as the error."""
    return [line for line in stderr.splitlines() if line.strip() and "it/s]" not in line and "%|" not in line]


@pytest.fixture
def run_main(capsys):
    """run_generation.py's main() in this process (no interpreter start-up): -> (exit status, stdout, stderr)."""
    from llmbench.main import main

    def _run(*args: str):
        try:
            status = main(list(args), prog="run_generation.py")
        except SystemExit as exc:  # argparse exits on a bad flag
            status = exc.code
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return _run
