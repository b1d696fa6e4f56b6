"""Every merge method on tiny real LLaMAs against its formula computed here in float64 (tests/formulas.py),
streamed in blocks of a few rows on two threads, for float32 inputs written as float32, float16 and bfloat16,
and for bf16 fine-tunes that differ from their base by a few units (where an exact result often falls on a
rounding boundary): at most 0.1% of the elements of a bf16 or fp16 output may be off the correctly rounded
float64 value, and every element of a float32 output within one unit of it."""

from __future__ import annotations

import json
from pathlib import Path

import formulas as F
import pytest
import torch
from safetensors.torch import load_file, save_file

from builders import build_llama
from clirunner import cli
from mergecli.methods import base as method_base
from mergecli.methods import bracket

WEIGHTS = [1.0, 0.5, 2.0]


def fine_tunes(root: Path, dtype: torch.dtype, noise: float) -> dict:
    base = build_llama(root / "base", seed=0, dtype=dtype)
    tensors = load_file(base / "model.safetensors")
    models = []
    for i in range(3):
        generator = torch.Generator().manual_seed(100 + i)
        tuned = {name: (t.double() + noise * torch.randn(t.shape, generator=generator, dtype=torch.float64)).to(dtype)
                 if t.is_floating_point() else t for name, t in tensors.items()}
        path = root / f"ft{i}"
        path.mkdir()
        for file in base.iterdir():
            if file.name != "model.safetensors":
                (path / file.name).write_bytes(file.read_bytes())
        save_file(tuned, path / "model.safetensors", metadata={"format": "pt"})
        models.append(path)
    return {"base": base, "models": models, "dtype": dtype}


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("formulas")
    (root / "f32").mkdir()
    (root / "bf16").mkdir()
    return {"float32": fine_tunes(root / "f32", torch.float32, 0.01),
            "bfloat16": fine_tunes(root / "bf16", torch.bfloat16, 3e-4)}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 4 rows (of 32 or 64 entries), on two threads; cuts bracketed from a sample, as large
    tensors are."""
    monkeypatch.setattr(method_base, "BLOCK_ELEMENTS", 4 * 64)
    monkeypatch.setattr(bracket, "MIN_SAMPLED", 1)
    monkeypatch.setattr("mergecli.merge.stream.MAX_WORKERS", 2, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)


def load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def ordered(values: torch.Tensor) -> torch.Tensor:
    """The bit patterns of floats as integers that order as the floats do (adjacent floats: adjacent ints)."""
    bits = values.view({2: torch.int16, 4: torch.int32}[values.element_size()]).long()
    sign = 1 << (8 * values.element_size() - 1)
    return torch.where(bits < 0, -(bits + sign), bits)


def units_off(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """How many units of the output dtype each element is from the float64 value correctly rounded."""
    return (ordered(got) - ordered(want.to(got.dtype))).abs()


# (method, its table, per-model lines, models, with a base) → reference(base, models, name, weights)
def della(elect: bool, rescale: bool):
    def reference(base, models, name, weights):
        def sparse(i, vector):
            mask = F.della_mask(vector, 3, i, name, 0.6, 0.2)
            return F.l1_rescaled(vector, mask) if rescale else vector * mask
        return F.gta(base, models, weights, sparse, elect_signs=elect, normalize=elect, lam=0.9)
    return reference


def crumbs(elect: bool, rescale: bool):
    def reference(base, models, name, weights):
        def sparse(i, vector):
            mask = F.breadcrumbs_mask(vector, 0.6, 0.1)
            return F.l1_rescaled(vector, mask) if rescale else vector * mask
        return F.gta(base, models, weights, sparse, elect_signs=elect, normalize=False)
    return reference


def dare_l1(base, models, name, weights):
    def sparse(i, vector):
        return F.l1_rescaled(vector, F.dare_mask(5, i, name, vector.shape, 0.5))
    return F.gta(base, models, weights, sparse, elect_signs=True, normalize=False)


def ties(base, models, name, weights):
    def sparse(i, vector):
        return vector * F.top_mask(vector, int(0.4 * vector.numel()))
    return F.gta(base, models, weights, sparse, elect_signs=True, normalize=True)


def task_arithmetic(base, models, name, weights):
    return base + 0.7 * sum(w * (m - base) for w, m in zip(weights, models))


def average(base, models, name, weights):
    return sum(w * m for w, m in zip(weights, models)) / sum(weights)


CASES = {
    "average": ("", "", 3, False, average),
    "task_arithmetic": ("lambda = 0.7", "", 3, True, task_arithmetic),
    "ties": ("density = 0.4", "", 3, True, ties),
    "dare_ties-l1": ('density = 0.5\nseed = 5\nrescale = "l1"\nnormalize = false', "", 3, True, dare_l1),
    "model_stock": ("", "", 3, True, lambda b, ms, n, w: F.model_stock(b, ms)),
    "model_stock-rows": ("filter_wise = true", "", 2, True, lambda b, ms, n, w: F.model_stock(b, ms, True)),
    "della": ("density = 0.6\nepsilon = 0.2\nseed = 3\nlambda = 0.9", "", 3, True, della(True, True)),
    "della_linear": ("density = 0.6\nepsilon = 0.2\nseed = 3\nlambda = 0.9\nrescale = false", "", 3, True,
                     della(False, False)),
    "breadcrumbs": ("density = 0.6\ngamma = 0.1", "", 3, True, crumbs(False, False)),
    "breadcrumbs_ties": ("density = 0.6\ngamma = 0.1\nrescale = true", "", 3, True, crumbs(True, True)),
    "sce": ("select_topk = 0.5", "", 3, True, lambda b, ms, n, w: F.sce(b, ms, 0.5)),
    "sce-all": ("", "", 3, True, lambda b, ms, n, w: F.sce(b, ms)),
    "karcher": ("", "", 3, False, lambda b, ms, n, w: F.karcher(ms)),
    "karcher-base": ("max_iter = 4", "", 2, True, lambda b, ms, n, w: F.karcher([b, *ms], max_iter=4)),
    "nuslerp": ("", "", 2, True, lambda b, ms, n, w: F.nuslerp(b, ms, w)),
    "nuslerp-rows": ("nuslerp_flatten = false", "", 2, False,
                     lambda b, ms, n, w: F.nuslerp(None, ms, w, flatten=False)),
    "nuslerp-columns": ("nuslerp_flatten = false\nnuslerp_row_wise = true", "", 2, True,
                        lambda b, ms, n, w: F.nuslerp(b, ms, w, flatten=False, row_wise=True)),
    "multislerp": ("", "", 3, True, lambda b, ms, n, w: F.multislerp(b, ms, w)),
    "multislerp-nobase": ("normalize_weights = false", "", 3, False,
                          lambda b, ms, n, w: F.multislerp(None, ms, w, normalize_weights=False)),
    "nearswap": ("t = 0.004", "", 1, True, lambda b, ms, n, w: F.nearswap(b, ms[0], 0.004)),
    "ram": ("epsilon = 0.008", "", 3, True, lambda b, ms, n, w: F.ram(b, ms, 0.008)),
    "ramplus_tl": ("epsilon = 0.008\nr = 0.5\nalpha = 0.9", "", 3, True,
                   lambda b, ms, n, w: F.ram(b, ms, 0.008, r=0.5, alpha=0.9)),
    "arcee_fusion": ("", "", 1, True, lambda b, ms, n, w: F.arcee_fusion(b, ms[0])),
    "tsv": ("alpha = 0.8", "", 3, True, lambda b, ms, n, w: F.tsv(b, [b + wi * (m - b) for wi, m in zip(w, ms)],
                                                                   0.8)),
    "iso_c": ("scaling_factor = 0.6", "", 3, True, lambda b, ms, n, w: F.iso_c(b, ms, 0.6)),
    "iso_cts": ("common_space_fraction = 0.5", "", 3, True, lambda b, ms, n, w: F.iso_cts(b, ms, 1.0, 0.5)),
    "wudi": ("", "", 3, True, lambda b, ms, n, w: F.wudi(b, ms)),
}
WEIGHTED = {"average", "task_arithmetic", "ties", "dare_ties-l1", "della", "della_linear", "breadcrumbs",
            "breadcrumbs_ties", "nuslerp", "nuslerp-rows", "nuslerp-columns", "multislerp", "multislerp-nobase", "tsv"}
OUTPUTS = [("float32", "auto"), ("float32", "float16"), ("float32", "bfloat16"), ("bfloat16", "auto")]


def run(tmp_path: Path, family: dict, case: str, dtype: str) -> tuple[dict, dict]:
    table, per_model, count, with_base, reference = CASES[case]
    method = case.split("-")[0]
    weights = WEIGHTS[:count] if case in WEIGHTED else [1.0] * count
    if method in ("nuslerp",):
        weights = [0.3, 0.7]
    lines = [f'method = "{method}"', f'output = "{tmp_path / "out"}"', f'dtype = "{dtype}"']
    settings = [line for line in table.splitlines() if not line.startswith("normalize =")]
    lines += [line for line in table.splitlines() if line.startswith("normalize =")]
    if with_base:
        lines += ["[base]", f'path = "{family["base"]}"']
    lines += [f"[{method}]", *settings]
    for path, weight in zip(family["models"][:count], weights):
        lines += ["[[models]]", f'path = "{path}"', f"weight = {weight}", per_model]
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("\n".join(lines) + "\n")
    result = cli("merge", recipe, "--force")
    assert result.exit_code == 0, result.output
    got = load(tmp_path / "out")
    base = {k: v.double() for k, v in load(family["base"]).items()}
    models = [{k: v.double() for k, v in load(m).items()} for m in family["models"][:count]]
    want = {name: reference(base[name], [m[name] for m in models], name, weights) for name in base}
    return got, want


@pytest.mark.parametrize("inputs,dtype", OUTPUTS, ids=[f"{i}-to-{o}" for i, o in OUTPUTS])
@pytest.mark.parametrize("case", list(CASES))
def test_each_method_is_its_formula_rounded_once(families, tmp_path, case, inputs, dtype):
    got, want = run(tmp_path, families[inputs], case, dtype)
    assert set(got) == set(want)
    off = total = 0
    for name, value in want.items():
        units = units_off(got[name], value)
        total += units.numel()
        off += int((units > 0).sum())
        if got[name].dtype == torch.float32:
            assert int(units.max()) <= 1, (name, int(units.max()))
        else:
            assert int(units.max()) <= 1 or float((units > 1).double().mean()) <= 1e-3, (name, int(units.max()))
    if got[next(iter(got))].dtype != torch.float32:
        assert off / total <= 1e-3, f"{off} of {total} elements off the correctly rounded value"


def test_the_share_off_the_correctly_rounded_value_is_reported(families, tmp_path, record_property):
    """The table the README quotes (make bench-rounding prints it): the share of elements off, per method
    and output dtype; here, that it is computed from real runs (one method, one dtype)."""
    got, want = run(tmp_path, families["bfloat16"], "task_arithmetic", "auto")
    shares = [float((units_off(got[n], w) > 0).double().mean()) for n, w in want.items()]
    record_property("task_arithmetic_bf16_off", max(shares))
    assert max(shares) <= 1e-3


def test_wudi_reaches_no_more_than_fusionbench_loss_on_every_matrix(families, tmp_path):
    """The closed form is WUDI's minimizer: its loss is at most the least-squares reference's (up to
    rounding), and below the loss at the Adam loop's start (Σ τ_i), which Adam only lowers."""
    got, want = run(tmp_path, families["float32"], "wudi", "float32")
    base = {k: v.double() for k, v in load(families["float32"]["base"]).items()}
    models = [{k: v.double() for k, v in load(m).items()} for m in families["float32"]["models"]]
    for name, value in base.items():
        if value.dim() != 2:
            continue
        vectors = [m[name] - value for m in models]
        ours = F.wudi_loss(got[name].double() - value, vectors)
        least_squares = F.wudi_loss(want[name] - value, vectors)
        start = F.wudi_loss(sum(vectors), vectors)
        assert ours <= least_squares * (1 + 1e-6) + 1e-12 and ours < start, (name, ours, least_squares, start)


def test_della_keeps_each_rank_at_its_probability(families, tmp_path):
    """DELLA's keep rates by rank decile follow density − ε + 2ε·rank/(n − 1) (the draws are uniform)."""
    got, _ = run(tmp_path, families["float32"], "della_linear", "float32")
    base, tuned = load(families["float32"]["base"]), load(families["float32"]["models"][0])
    kept = torch.zeros(10)
    seen = torch.zeros(10)
    for name, value in base.items():
        if value.dim() != 2:
            continue
        mask = F.della_mask(tuned[name].double() - value.double(), 3, 0, name, 0.6, 0.2)
        ranks = torch.stack([F.ranks_by_magnitude(row) for row in tuned[name].double() - value.double()])
        decile = (ranks.double() / (value.shape[1] - 1) * 10).clamp(max=9.999).long()
        kept += torch.bincount(decile[mask], minlength=10)[:10].double()
        seen += torch.bincount(decile.reshape(-1), minlength=10)[:10].double()
    rates = kept / seen
    expected = torch.tensor([0.4 + 0.4 * (i + 0.5) / 10 for i in range(10)])
    assert torch.allclose(rates, expected, atol=0.03), (rates, expected)
    assert got  # the merge ran


def test_randomized_methods_give_the_same_output_for_any_block_size_and_thread_count(families, tmp_path,
                                                                                     monkeypatch):
    outputs = []
    for block, workers in ((4 * 64, 2), (64 * 64, 1)):
        monkeypatch.setattr(method_base, "BLOCK_ELEMENTS", block)
        monkeypatch.setattr("os.cpu_count", lambda workers=workers: workers)
        (tmp_path / str(block)).mkdir()
        outputs.append(run(tmp_path / str(block), families["bfloat16"], "della", "auto")[0])
    assert all(torch.equal(outputs[0][n], outputs[1][n]) for n in outputs[0])


def test_card_names_every_new_method(families, tmp_path):
    for case in ("model_stock", "della", "sce", "karcher", "tsv", "wudi"):
        run(tmp_path, families["float32"], case, "float32")
        card = (tmp_path / "out" / "README.md").read_text()
        method = case.split("-")[0]
        assert f"merge_method: {method}" in card or method in card, case
        config = json.loads((tmp_path / "out" / "config.json").read_text())
        assert config["hidden_size"] == 32
