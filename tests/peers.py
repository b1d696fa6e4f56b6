"""The peers mergecli is checked against, each from a venv of its own (never a mergecli dependency):
mergekit 0.1.5 (`make mergekit-venv`) and fusion-bench 0.2.33 (`make fusionbench-venv`), which `make test`
builds first."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
MERGEKIT_VENV = Path(os.environ.get("MERGEKIT_VENV", ROOT / "bench-out" / "mergekit-venv"))
FUSIONBENCH_VENV = Path(os.environ.get("FUSIONBENCH_VENV", ROOT / "bench-out" / "fusionbench-venv"))


def mergekit(script: str = "mergekit-yaml") -> Path:
    """A mergekit command of the peer venv; the test fails, naming the make target, without it."""
    path = MERGEKIT_VENV / "bin" / script
    if not path.exists():
        pytest.fail(f"mergekit 0.1.5 is not installed at {MERGEKIT_VENV}: run `make mergekit-venv` (make test does)")
    return path


def fusionbench_python() -> Path:
    """The python of the fusion-bench venv; the test fails, naming the make target, without it."""
    path = FUSIONBENCH_VENV / "bin" / "python"
    if not (FUSIONBENCH_VENV / "bin" / "fusion_bench").exists():
        pytest.fail(f"fusion-bench 0.2.33 is not installed at {FUSIONBENCH_VENV}: run `make fusionbench-venv` "
                    "(make test does)")
    return path


def run_mergekit(config: Path, out: Path, *, script: str = "mergekit-yaml", extra: tuple[str, ...] = ()) -> None:
    """Run a mergekit script on `config` into `out`, offline, from the config's folder."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    env.pop("PYTHONPATH", None)
    arguments = [str(mergekit(script)), str(config)]
    arguments += ["--out-path", str(out), "--intermediate-dir", str(out.parent / f"{out.name}-stages")] \
        if script == "mergekit-multi" else [str(out)]
    result = subprocess.run([*arguments, "--allow-crimes", *extra], cwd=config.parent, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, from all its shards."""
    return {name: value for file in sorted(directory.glob("*.safetensors")) for name, value in load_file(file).items()}


def assert_close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], *, ulps: float = 2.0,
                 exact: bool = False) -> None:
    """The same tensors, each element equal (`exact`) or within `ulps` units of the float32 rounding of
    the tensor's largest magnitude (one or two roundings apart: an element that came out of cancelling
    terms is as exact as those terms), tensor by tensor."""
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    for name, value in ours.items():
        other = theirs[name]
        assert value.shape == other.shape and value.dtype == other.dtype, (name, value.shape, other.shape)
        if exact:
            assert torch.equal(value, other), name
            continue
        a, b = value.double(), other.double()
        bound = ulps * torch.finfo(value.dtype).eps * max(float(a.abs().max()), float(b.abs().max()), 1e-30)
        assert ((a - b).abs() <= bound).all(), (name, float((a - b).abs().max()), bound)
