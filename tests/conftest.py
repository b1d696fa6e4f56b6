"""Shared fixtures: hub isolation for every test, and tiny real checkpoints built once per session."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from builders import build_llama
from fakehub import point_huggingface_hub

# Where a test that forgets to go offline or to start a FakeHub would send requests: nothing listens.
UNREACHABLE_ENDPOINT = "http://127.0.0.1:9"


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    """No test touches the real hub or the user's cache or token; errors are not traced back.

    huggingface_hub reads its environment once, at import, into `huggingface_hub.constants`:
    setting env vars (for subprocesses and a later import) is not enough, the already-imported
    constants are patched too, as for a FakeHub, but offline and towards an endpoint where
    nothing listens.
    """
    home = tmp_path_factory.mktemp("hf_home")
    env = {"HF_HOME": str(home), "HF_ENDPOINT": UNREACHABLE_ENDPOINT, "HF_HUB_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "TRANSFORMERS_VERBOSITY": "error"}
    point_huggingface_hub(monkeypatch, UNREACHABLE_ENDPOINT, home, env=env, offline=True)
    monkeypatch.delenv("MERGECLI_DEBUG", raising=False)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama_fp32(models_dir) -> list[Path]:
    """Three untied fp32 LLaMAs in single-file safetensors."""
    return [build_llama(models_dir / f"llama32-{i}", seed=i) for i in range(3)]


@pytest.fixture(scope="session")
def llama_bf16_sharded(models_dir) -> list[Path]:
    """Two untied bf16 LLaMAs in sharded safetensors with an index."""
    return [build_llama(models_dir / f"llama16s-{i}", seed=10 + i, dtype=torch.bfloat16,
                        max_shard_size="20KB") for i in range(2)]


@pytest.fixture(scope="session")
def llama_tied(models_dir) -> list[Path]:
    """Two fp32 LLaMAs with tied embeddings (no lm_head.weight stored)."""
    return [build_llama(models_dir / f"llamatied-{i}", seed=20 + i, tie=True) for i in range(2)]


def tree_digest(path: Path) -> dict[str, str]:
    """Hash of every file under `path`, to prove that inputs are never modified."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}
