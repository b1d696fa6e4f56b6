"""Bad input to the methods gets one line (and exit 2) before anything is read or written: a method that
needs several models given one, a task-vector method given no base, DELLA's epsilon out of range, a missing
required setting; and a matrix method that does not fit on --device says so once and goes on on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clirunner import cli
from mergecli.methods.whole import Placement


@pytest.fixture
def models(tmp_path) -> list[Path]:
    paths = []
    for i in range(3):
        path = tmp_path / f"m{i}"
        path.mkdir()
        generator = torch.Generator().manual_seed(i)
        save_file({"w": torch.randn(8, 4, generator=generator), "b": torch.randn(4, generator=generator)},
                  path / "model.safetensors")
        paths.append(path)
    return paths


def run(tmp_path: Path, text: str):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(text)
    return cli("merge", recipe, "-o", tmp_path / "out")


def recipe(method: str, models: list[Path], *, base: Path | None = None, table: str = "") -> str:
    lines = [f'method = "{method}"'] + ([f'[base]\npath = "{base}"'] if base else []) + [f"[{method}]", table]
    return "\n".join(lines + [f'[[models]]\npath = "{m}"' for m in models]) + "\n"


def one_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and all(word in lines[0] for word in words), result.stderr


@pytest.mark.parametrize("method", ["karcher", "multislerp"])
def test_a_mean_of_one_model_is_refused(models, tmp_path, method):
    one_error(run(tmp_path, recipe(method, models[:1])), f"{method}", "the recipe has one")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["model_stock", "della", "breadcrumbs_ties", "sce", "ram", "arcee_fusion",
                                    "nearswap", "tsv", "iso_cts", "wudi"])
def test_a_method_that_needs_a_base_says_so(models, tmp_path, method):
    table = "t = 0.1" if method == "nearswap" else ""
    one_error(run(tmp_path, recipe(method, models[:2], table=table)), f"{method} merges task vectors",
              "it needs a [base] model")


@pytest.mark.parametrize("table,words", [("density = 0.3\nepsilon = 0.4", ("della.epsilon: 0.4 with density 0.3",
                                                                          "from -0.1 to 0.7")),
                                         ("density = 0.9\nepsilon = 0.15", ("della.epsilon: 0.15 with density 0.9",
                                                                           "strictly between 0 and 1"))])
def test_della_s_epsilon_must_keep_the_probabilities_inside_0_and_1(models, tmp_path, table, words):
    one_error(run(tmp_path, recipe("della", models[1:], base=models[0], table=table)), *words)


def test_a_model_s_own_epsilon_is_checked_too(models, tmp_path):
    text = recipe("della", models[1:], base=models[0], table="density = 0.5").replace(
        f'path = "{models[2]}"', f'path = "{models[2]}"\nepsilon = 0.6')
    one_error(run(tmp_path, text), "della.epsilon: 0.6 with density 0.5 (m2)")


def test_nearswap_needs_its_t_and_one_model(models, tmp_path):
    one_error(run(tmp_path, recipe("nearswap", models[1:2], base=models[0])), "nearswap.t")
    one_error(run(tmp_path, recipe("nearswap", models[1:], base=models[0], table="t = 0.1")),
              "nearswap swaps the base toward one model, the recipe has 2")


def test_multislerp_of_directions_that_cancel_is_a_one_line_failure(tmp_path):
    paths = []
    for i, sign in enumerate((1.0, -1.0, 1.0)):
        path = tmp_path / f"m{i}"
        path.mkdir()
        save_file({"w": torch.full((4, 4), sign)}, path / "model.safetensors")
        paths.append(path)
    text = recipe("multislerp", paths).replace(f'path = "{paths[1]}"', f'path = "{paths[1]}"\nweight = 2')
    result = run(tmp_path, text)
    assert result.exit_code == 1, result.output
    assert "w: multislerp: the weighted mean of the models' directions is zero" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_matrix_too_large_for_the_device_falls_back_to_the_cpu_said_once():
    warnings: list[str] = []
    placement = Placement("cuda:0", warnings)
    seen = []

    def work(device: str) -> torch.Tensor:
        seen.append(device)
        if device != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return torch.ones(2)

    assert torch.equal(placement.run("model.layers.0.mlp.down_proj.weight", work), torch.ones(2))
    assert torch.equal(placement.run("model.layers.1.mlp.down_proj.weight", work), torch.ones(2))
    assert seen == ["cuda:0", "cpu", "cpu"]  # once refused, the device is not tried again
    assert warnings == ["model.layers.0.mlp.down_proj.weight does not fit in cuda:0's memory: it and the tensors "
                        "after it are computed on the CPU"]
