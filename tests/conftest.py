import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import save_tiny_model, tiny_llama_config, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


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
