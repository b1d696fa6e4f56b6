"""Shared fixtures: hub isolation for every test, and tiny real checkpoints and calibration data built once
per session."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import torch

from builders import build_bert, build_clip_vision, build_gpt2, build_llama
from fakehub import point_huggingface_hub
from references import random_texts, write_images, write_jsonl, write_txt

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


@pytest.fixture
def tmpfs(tmp_path):
    """`mount(name, options)`: a real tmpfs under tmp_path (needs root, which CI has), unmounted after
    the test; the test is skipped where mounting is not allowed."""
    mounted = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def tree_digest(path: Path) -> dict[str, str]:
    """Hash of every file under `path`, to prove that inputs are never modified."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# RegMean: tiny models of each family and calibration data, built once


@pytest.fixture(scope="session")
def rm_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("regmean")


def two_models(build, name: str, seed: int):
    """A session fixture: two tiny models of one family, built with seeds `seed` and `seed + 1`."""

    @pytest.fixture(scope="session")
    def models(rm_dir) -> list[Path]:
        return [build(rm_dir / f"{name}-{i}", seed=seed + i) for i in range(2)]

    return models


gpt2_models = two_models(build_gpt2, "gpt2", 50)
bert_models = two_models(build_bert, "bert", 60)
clip_models = two_models(build_clip_vision, "clip", 70)
llama_models = two_models(build_llama, "llama", 80)


@pytest.fixture(scope="session")
def text_data(rm_dir) -> list[Path]:
    """Two calibration files of uneven example lengths: jsonl (with a chat example) and txt."""
    texts = random_texts(1, 23)
    records = [{"text": t} for t in texts[:20]]
    records.insert(3, {"messages": [{"role": "user", "content": texts[20]},
                                    {"role": "assistant", "content": texts[21]}]})
    return [write_jsonl(rm_dir / "data-a.jsonl", records), write_txt(rm_dir / "data-b.txt", random_texts(2, 21))]


@pytest.fixture(scope="session")
def image_data(rm_dir) -> list[Path]:
    return [write_images(rm_dir / f"images-{i}", 7, seed=i) for i in range(2)]
