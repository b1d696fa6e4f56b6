"""Each merge method mergekit 0.1.5 registers, run by mergekit itself (`make mergekit-venv`) and by
`mergecli merge config.yml` on the same tiny float32 LLaMAs: every tensor within float32 rounding of
mergekit's (mergecli sums in float64 where mergekit rounds to float32 between steps). The randomized
methods (DARE, DELLA) draw their masks differently (mergekit from torch's generator, mergecli from a hash
of the seed and the position): there, each element of mergekit's output is explained by the formula with
the mask read off that output, and both keep each rank at the same rate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from formulas import ranks_by_magnitude
from safetensors.torch import load_file
from test_mergekit_parity import build_deep_llama, fine_tuned

from clirunner import cli
from peers import assert_close, run_mergekit, tensors

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mergekit-methods")
    base = build_deep_llama(root / "base", seed=0, layers=2)
    return {"base": base, **{name: fine_tuned(base, root / name, seed) for name, seed in (("a", 1), ("b", 2),
                                                                                           ("c", 3))}}


def config(family: dict, method: str, parameters: str = "", models: str = "abc", *, base: bool = True,
           each: str = "") -> str:
    lines = [f"merge_method: {method}", "dtype: float32"]
    if base:
        lines.append(f"base_model: {family['base']}")
    if parameters:
        lines += ["parameters:", *(f"  {line}" for line in parameters.splitlines())]
    lines.append("models:")
    for name, own in zip(models, (each.split("|") if each else [""] * len(models))):
        lines.append(f"  - model: {family[name]}")
        if own:
            lines += ["    parameters:", *(f"      {line}" for line in own.split(";"))]
    return "\n".join(lines) + "\n"


def both(tmp_path: Path, text: str) -> tuple[dict, dict]:
    path = tmp_path / "config.yml"
    path.write_text(text)
    run_mergekit(path, tmp_path / "theirs")
    result = cli("merge", path, "-o", tmp_path / "ours")
    assert result.exit_code == 0, result.output
    return tensors(tmp_path / "ours"), tensors(tmp_path / "theirs")


CONFIGS = {
    "model_stock": ("model_stock", "", "abc", True, ""),
    "model_stock-filter_wise": ("model_stock", "filter_wise: true", "ab", True, ""),
    "breadcrumbs": ("breadcrumbs", "density: 0.6\ngamma: 0.05", "abc", True, "weight: 0.5|weight: 1.0|weight: 0.3"),
    "breadcrumbs-per-model": ("breadcrumbs", "gamma: 0.02", "ab", True, "weight: 1.0;density: 0.5|weight: 0.7;"
                                                                       "density: [0.3, 0.8]"),
    "breadcrumbs-rescaled": ("breadcrumbs", "density: 0.5\ngamma: 0.1\nrescale: true", "ab", True,
                             "weight: 1.0|weight: 1.0"),
    "breadcrumbs_ties": ("breadcrumbs_ties", "density: 0.5\ngamma: 0.1\nlambda: 0.8", "abc", True,
                         "weight: 1.0|weight: 0.5|weight: 2.0"),
    "sce": ("sce", "", "abc", True, ""),
    "sce-selected": ("sce", "select_topk: 0.4", "abc", True, ""),
    "karcher": ("karcher", "", "abc", False, ""),
    "karcher-base": ("karcher", "max_iter: 3", "ab", True, ""),
    "nuslerp": ("nuslerp", "", "ab", True, "weight: 0.3|weight: 0.7"),
    "nuslerp-rows": ("nuslerp", "nuslerp_flatten: false", "ab", False, "weight: 0.6|weight: 0.2"),
    "nuslerp-columns": ("nuslerp", "nuslerp_flatten: false\nnuslerp_row_wise: true", "ab", True,
                        "weight: 1.0|weight: 2.0"),
    "multislerp": ("multislerp", "", "abc", True, "weight: 0.5|weight: 1.0|weight: 0.25"),
    "multislerp-nobase": ("multislerp", "normalize_weights: false", "abc", False,
                          "weight: 0.3|weight: 0.3|weight: 0.4"),
    "nearswap": ("nearswap", "t: 0.01", "a", True, ""),
    "ram": ("ram", "epsilon: 0.01", "abc", True, ""),
    "ramplus_tl": ("ramplus_tl", "epsilon: 0.01\nr: 0.5\nalpha: 0.9", "abc", True, ""),
    "arcee_fusion": ("arcee_fusion", "", "a", True, ""),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_mergekit_method_gives_mergekit_s_result(family, tmp_path, case):
    method, parameters, models, base, each = CONFIGS[case]
    ours, theirs = both(tmp_path, config(family, method, parameters, models, base=base, each=each))
    assert_close(ours, theirs, ulps=4)
    if method in ("breadcrumbs", "breadcrumbs_ties", "arcee_fusion", "sce"):  # the cuts keep the same entries
        base_tensors = load_file(family["base"] / "model.safetensors")
        for name, value in ours.items():
            assert torch.equal(value == base_tensors[name], theirs[name] == base_tensors[name]), name


@pytest.mark.parametrize("method", ["della", "della_linear", "dare_linear", "dare_ties"])
def test_a_randomized_method_is_mergekit_s_formula_with_its_own_mask(family, tmp_path, method):
    """One model, so that each output element is θ_b + f·m·δ: the mask m read off mergekit's output (the
    entries it changed), f the L1 rescale of that mask (mergekit's default for these methods) must give
    mergekit's every element; and mergecli's keep rates by rank match mergekit's."""
    della = method.startswith("della")
    parameters = "density: 0.4\nepsilon: 0.3" if della else "density: 0.4"
    ours, theirs = both(tmp_path, config(family, method, parameters, "a", each="weight: 1.0"))
    base, tuned = load_file(family["base"] / "model.safetensors"), load_file(family["a"] / "model.safetensors")
    rates = {"ours": torch.zeros(5), "theirs": torch.zeros(5)}
    counts = torch.zeros(5)
    for name, value in base.items():
        delta = tuned[name].double() - value.double()
        for who, merged in (("ours", ours), ("theirs", theirs)):
            change = merged[name].double() - value.double()
            mask = change != 0
            factor = delta.abs().sum() / (delta * mask).abs().sum()
            want = value.double() + factor * delta * mask
            bound = 4 * torch.finfo(torch.float32).eps * float(want.abs().max())
            assert float((merged[name].double() - want).abs().max()) <= bound, (who, name)
            if value.dim() == 2:
                ranks = torch.stack([ranks_by_magnitude(row) for row in delta]) if della else \
                    ranks_by_magnitude(delta)
                n = value.shape[1] if della else value.numel()
                bucket = (ranks.double() / (n - 1) * 5).clamp(max=4.999).long()
                rates[who] += torch.bincount(bucket[mask], minlength=5).double()
                if who == "ours":
                    counts += torch.bincount(bucket.reshape(-1), minlength=5).double()
    ours_rate, theirs_rate = rates["ours"] / counts, rates["theirs"] / counts
    expected = torch.tensor([0.1 + 0.6 * (i + 0.5) / 5 for i in range(5)]) if della else torch.full((5,), 0.4)
    assert torch.allclose(ours_rate, expected, atol=0.03) and torch.allclose(theirs_rate, expected, atol=0.03), \
        (ours_rate, theirs_rate, expected)
