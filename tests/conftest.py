"""Shared fixtures: hub isolation for every test, and tiny real checkpoints built once per session."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from builders import build_llama


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    """No test touches the real hub or the user's cache; errors are not traced back."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    monkeypatch.delenv("HF_TOKEN", raising=False)
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
