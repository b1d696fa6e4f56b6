"""Shared fixtures: hub isolation for every test, and tiny real checkpoints built once per session."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from builders import build_llama

# Where a test that forgets to go offline or to start a FakeHub would send requests: nothing listens.
UNREACHABLE_ENDPOINT = "http://127.0.0.1:9"


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    """No test touches the real hub or the user's cache or token; errors are not traced back.

    huggingface_hub reads its environment once, at import, into `huggingface_hub.constants`:
    setting env vars (for subprocesses and a later import) is not enough, the already-imported
    constants are patched too (as tests/hub_server.py's `use_fake_hub` does for a FakeHub).
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _cache_manager

    home = tmp_path_factory.mktemp("hf_home")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                 "HF_ASSETS_CACHE", "HF_XET_CACHE", "TRANSFORMERS_CACHE", "XDG_CACHE_HOME", "MERGECLI_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE_ENDPOINT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    patched = {
        "ENDPOINT": UNREACHABLE_ENDPOINT,
        "HUGGINGFACE_CO_URL_TEMPLATE": UNREACHABLE_ENDPOINT + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
        "default_cache_path": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "default_assets_cache_path": str(home / "assets"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_XET_CACHE": str(home / "xet"),
        "default_xet_cache_path": str(home / "xet"),
        "HF_HUB_OFFLINE": True,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
    }
    for name, value in patched.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", UNREACHABLE_ENDPOINT)
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(home / "hub"))


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
