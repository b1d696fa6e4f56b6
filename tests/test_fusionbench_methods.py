"""FusionBench's data-free methods (TSV-M, Iso-C, Iso-CTS, WUDI) run by fusion-bench 0.2.33 itself
(`make fusionbench-venv`) on the task vectors of tiny LLaMAs stored in float64 (so that both compute in
float64, and the comparison is not of two float32 SVDs' errors), and by mergecli on their checkpoints: the
merged task vectors agree to 1e-9 of their scale, and WUDI's closed form reaches a loss no higher than
FusionBench's Adam loop on every matrix."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from formulas import wudi_loss
from safetensors.torch import load_file, save_file
from test_mergekit_parity import build_deep_llama, fine_tuned

from clirunner import cli
from peers import fusionbench_python

SCRIPT = """
import sys
import torch
from safetensors.torch import load_file, save_file
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
from fusion_bench.method.wudi.wudi import wudi_merging
base = load_file(sys.argv[1])
vectors = [{k: v - base[k] for k, v in load_file(path).items()} for path in sys.argv[3:]]
merged = {"tsv": compute_and_sum_svd_mem_reduction(vectors, accelerator="cpu"),
          "iso_c": iso_c(vectors, accelerator="cpu"), "iso_cts": iso_cts(vectors, 0.8, accelerator="cpu"),
          "wudi": wudi_merging(vectors, accelerator="cpu", iter_num=400)}
save_file({f"{m}|{k}": v.detach().contiguous() for m, d in merged.items() for k, v in d.items()}, sys.argv[2])
"""


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fusionbench")
    base = build_deep_llama(root / "base", seed=0, layers=2)
    models = [fine_tuned(base, root / f"ft{i}", 10 + i) for i in range(3)]
    for path in (base, *models):
        weights = load_file(path / "model.safetensors")
        save_file({k: v.double() for k, v in weights.items()}, path / "model.safetensors", metadata={"format": "pt"})
    out = root / "fusionbench.safetensors"
    result = subprocess.run([str(fusionbench_python()), "-c", SCRIPT, str(base / "model.safetensors"), str(out),
                             *(str(m / "model.safetensors") for m in models)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"base": base, "models": models, "theirs": load_file(out)}


def merged(tmp_path: Path, family: dict, method: str) -> dict[str, torch.Tensor]:
    lines = [f'method = "{method}"', f'output = "{tmp_path / "out"}"', "[base]", f'path = "{family["base"]}"']
    lines += [f'[[models]]\npath = "{m}"' for m in family["models"]]
    (tmp_path / "r.toml").write_text("\n".join(lines) + "\n")
    result = cli("merge", tmp_path / "r.toml")
    assert result.exit_code == 0, result.output
    return load_file(tmp_path / "out" / "model.safetensors")


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_a_fusionbench_method_gives_fusionbench_s_task_vector(family, tmp_path, method):
    ours = merged(tmp_path, family, method)
    base = load_file(family["base"] / "model.safetensors")
    for name, value in base.items():
        theirs = family["theirs"][f"{method}|{name}"].double()
        mine = ours[name].double() - value.double()
        bound = 1e-9 * float(theirs.abs().max())
        assert float((mine - theirs).abs().max()) <= bound, (name, float((mine - theirs).abs().max()), bound)


def test_wudi_s_closed_form_reaches_at_most_fusionbench_s_loss(family, tmp_path):
    ours = merged(tmp_path, family, "wudi")
    base = load_file(family["base"] / "model.safetensors")
    models = [load_file(m / "model.safetensors") for m in family["models"]]
    checked = 0
    for name, value in base.items():
        vectors = [m[name].double() - value.double() for m in models]
        theirs = family["theirs"][f"wudi|{name}"].double()
        if value.dim() != 2:
            assert torch.allclose(ours[name].double() - value.double(), theirs, atol=1e-6), name
            continue
        loss_ours = wudi_loss(ours[name].double() - value.double(), vectors)
        loss_theirs = wudi_loss(theirs, vectors)
        assert loss_ours <= loss_theirs, (name, loss_ours, loss_theirs)
        checked += 1
    assert checked >= 10
