"""Pointing huggingface_hub at a FakeHub (or offline at a temporary cache), in this process and in
subprocesses, and the pytest fixture that does it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fakehub.server import DEFAULT_TOKEN, ENV_TO_CLEAR, FakeHub


def use_fake_hub(
    monkeypatch: pytest.MonkeyPatch,
    hub: FakeHub,
    hf_home: str | os.PathLike[str],
    *,
    token: str | None = None,
) -> Path:
    """Point huggingface_hub (already imported or not, this process and subprocesses) at `hub`.

    Caches, token file and xet cache go under `hf_home` (created). `token`, if given, is exported
    as HF_TOKEN; otherwise no token is configured anywhere. Everything is undone by monkeypatch.
    Returns the hub cache dir (`hf_home/hub`)."""
    home = Path(hf_home)
    home.mkdir(parents=True, exist_ok=True)
    return point_huggingface_hub(monkeypatch, hub.url, home, env=hub.env(home, token), offline=False)


def point_huggingface_hub(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path, *,
                          env: dict[str, str], offline: bool) -> Path:
    """Set `env` (after clearing HF settings that would escape it) and patch the constants that
    huggingface_hub read from the environment at import: endpoint, caches, token paths, offline.
    Returns the hub cache dir (`home/hub`)."""
    from huggingface_hub import constants, hf_api

    for name in ENV_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    hub_cache = home / "hub"
    patched = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "default_cache_path": str(hub_cache),
        "default_assets_cache_path": str(home / "assets"),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_XET_CACHE": str(home / "xet"),
        "default_xet_cache_path": str(home / "xet"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(home / ".check_for_skill_update_done"),
        "HF_HUB_OFFLINE": offline,
        "HF_HUB_DISABLE_XET": True,  # no Xet/CAS here: uploads must use git-LFS
        "HF_HUB_DISABLE_TELEMETRY": True,  # else the first request fetches {ENDPOINT}/api/agent-harnesses
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "_staging_mode": False,
    }
    for name, value in patched.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    # Module-level functions (huggingface_hub.upload_folder, ...) are bound to an HfApi() made at import.
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    # Modules that copied a constant by value at import time.
    from huggingface_hub.utils import _cache_manager

    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(hub_cache))
    with contextlib.suppress(ImportError, AttributeError):
        from huggingface_hub.utils import _cache_assets

        monkeypatch.setattr(_cache_assets, "HF_ASSETS_CACHE", str(home / "assets"))
    return hub_cache


class _NoSleepTime:
    """Stand-in for the `time` module inside huggingface_hub: same API, `sleep` returns at once."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(_seconds: float) -> None:
        return None


def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove huggingface_hub's retry back-off sleeps (1+2+4+8+8 s on 5xx) for this test only.

    Patches the `time` name inside huggingface_hub.utils._http and file_download, not the global
    time module."""
    from huggingface_hub import file_download
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", _NoSleepTime())
    monkeypatch.setattr(file_download, "time", _NoSleepTime())


@contextlib.contextmanager
def running_hub(token: str | None = DEFAULT_TOKEN, **kwargs: Any) -> Iterator[FakeHub]:
    """`with running_hub("hf_x") as hub:` -- a started FakeHub, stopped on exit."""
    hub = FakeHub(token=token, **kwargs)
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A started FakeHub (token "hf_test_secret", user "fake-user") wired in with `use_fake_hub`,
    HF_HOME = tmp_path / "hf_home". No token is configured client-side."""
    with running_hub() as hub:
        use_fake_hub(monkeypatch, hub, tmp_path / "hf_home")
        yield hub
