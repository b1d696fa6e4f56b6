"""Task arithmetic, TIES, DARE and SLERP on tiny real LLaMAs (float32 and bf16), each against a float64
reference written here from the formulas, sharing no code with mergecli."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from builders import build_llama
from clirunner import cli
from mergecli.merge import stream
from mergecli.methods import base as method_base
from mergecli.methods.dare import kept, stream_key

TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 2**-7}  # one rounding into the output dtype


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def family(request, tmp_path_factory) -> dict:
    """A base and three fine-tunes of it (the base plus small, different changes), of one dtype."""
    dtype = request.param
    root = tmp_path_factory.mktemp(f"tv-{str(dtype).split('.')[-1]}")
    base = build_llama(root / "base", seed=0, dtype=dtype)
    tensors = load(base)
    models = []
    for i in range(3):
        generator = torch.Generator().manual_seed(100 + i)
        tuned = {name: (t.double() + 0.01 * torch.randn(t.shape, generator=generator, dtype=torch.float64)).to(dtype)
                 if t.is_floating_point() else t for name, t in tensors.items()}
        path = root / f"ft{i}"
        path.mkdir()
        for file in base.iterdir():
            if file.name != "model.safetensors":
                (path / file.name).write_bytes(file.read_bytes())
        from safetensors.torch import save_file

        save_file(tuned, path / "model.safetensors", metadata={"format": "pt"})
        models.append(path)
    return {"dtype": dtype, "base": base, "models": models}


def load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def recipe(tmp_path: Path, family: dict, method: str, table: str = "", models: int = 3, weights=None,
           extra: str = "", per_model: list[str] | None = None) -> Path:
    lines = [f'method = "{method}"', f'output = "{tmp_path / "out"}"', extra]
    if method != "slerp":
        lines += ["[base]", f'path = "{family["base"]}"']
    lines += [f"[{method}]", table]
    for i, path in enumerate(family["models"][:models]):
        lines += ["[[models]]", f'path = "{path}"', f"weight = {weights[i] if weights else 1.0}"]
        if per_model and per_model[i]:
            lines.append(per_model[i])
    path = tmp_path / "recipe.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def merged(tmp_path: Path, recipe_path: Path, *args: str) -> dict[str, torch.Tensor]:
    result = cli("merge", recipe_path, "--force", *args)
    assert result.exit_code == 0, result.output
    return load(tmp_path / "out")


def close(got: dict, want: dict, dtype) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        if value.is_floating_point():
            scale = float(value.abs().max()) or 1.0
            torch.testing.assert_close(got[name].double(), value, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale,
                                       msg=name)
        else:
            assert torch.equal(got[name], value), name


# ---------------------------------------------------------------------------------------------
# Independent references, in float64


def task_vectors(family: dict, count: int) -> tuple[dict, list[dict]]:
    base = {k: v.double() if v.is_floating_point() else v for k, v in load(family["base"]).items()}
    vectors = [{k: v.double() - base[k] for k, v in load(m).items() if v.is_floating_point()}
               for m in family["models"][:count]]
    return base, vectors


def top_k_mask(values: torch.Tensor, density: float) -> torch.Tensor:
    """The ⌊density·n⌋ largest |values| (float32, as mergecli computes task vectors), ties by position:
    a stable sort of the magnitudes, here, not a histogram."""
    flat = values.reshape(-1).float().abs()
    k = math.floor(density * flat.numel())
    order = torch.sort(-flat, stable=True).indices[:k]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view(values.shape)


def ties_merge(trimmed: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    weighted = [t * w for t, w in zip(trimmed, weights)]
    elected = torch.where(sum(weighted) >= 0, 1.0, -1.0).double()
    agree = [torch.sign(w) == elected for w in weighted]
    total = sum(torch.where(a, w, 0.0) for a, w in zip(agree, weighted))
    if not normalize:
        return total
    divisor = sum(a.double() * w for a, w in zip(agree, weights))
    return total / torch.where(divisor == 0, 1.0, divisor)


# ---------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_is_the_base_plus_lambda_times_the_weighted_task_vectors(family, tmp_path, normalize):
    weights = [0.5, 1.5, -0.25]
    path = recipe(tmp_path, family, "task_arithmetic", "lambda = 0.8", weights=weights,
                  extra=f"normalize = {str(normalize).lower()}")
    base, vectors = task_vectors(family, 3)
    divisor = sum(weights) if normalize else 1.0
    want = {name: (value + 0.8 * sum(w * v[name] for w, v in zip(weights, vectors)) / divisor
                   if name in vectors[0] else value) for name, value in base.items()}
    close(merged(tmp_path, path), want, family["dtype"])


@pytest.fixture(params=["histogram", "sampled"])
def trim_path(request, monkeypatch) -> list:
    """How TIES finds its thresholds: the histogram passes (what these tiny tensors get), or a sampled
    bracket settled in one pass (what large ones get: forced here, in blocks of 8 rows). Gives the list
    of the brackets that settled a threshold, which a "sampled" run must have some of."""
    from mergecli.methods import bracket

    settled = []
    if request.param == "sampled":
        monkeypatch.setattr(bracket, "MIN_SAMPLED", 1)
        monkeypatch.setattr(method_base, "BLOCK_ELEMENTS", 8 * 64)
        settle = bracket.Bracket.settle

        def recorded(self, k):
            result = settle(self, k)
            if result is not None:
                settled.append(result)
            return result

        monkeypatch.setattr(bracket.Bracket, "settle", recorded)
    return settled


@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_ties_keeps_exactly_the_largest_entries_and_merges_the_agreeing_ones(family, tmp_path, scope, trim_path,
                                                                             request):
    weights, density = [1.0, 0.5, 2.0], [0.3, 0.5, 0.2]
    path = recipe(tmp_path, family, "ties", f'lambda = 1.5\ntrim_scope = "{scope}"\ndensity = 0.9', weights=weights,
                  per_model=[f"density = {d}" for d in density])
    base, vectors = task_vectors(family, 3)
    names = [n for n in load(family["base"]) if n in vectors[0]]  # the reference's tensor order
    masks = []
    for vector, d in zip(vectors, density):
        if scope == "tensor":
            masks.append({n: top_k_mask(vector[n], d) for n in names})
        else:  # one threshold over the whole task vector, positions in tensor order
            flat = top_k_mask(torch.cat([vector[n].reshape(-1) for n in names]), d)
            parts = torch.split(flat, [vector[n].numel() for n in names])
            masks.append({n: p.view(vector[n].shape) for n, p in zip(names, parts)})
    for mask, d in zip(masks, density):
        total = sum(m.numel() for m in mask.values())
        kept_count = sum(int(m.sum()) for m in mask.values())
        expected = math.floor(d * total) if scope == "model" else sum(math.floor(d * m.numel()) for m in mask.values())
        assert kept_count == expected
    want = {}
    for name, value in base.items():
        if name not in vectors[0]:
            want[name] = value
            continue
        trimmed = [torch.where(m[name], v[name], 0.0) for m, v in zip(masks, vectors)]
        want[name] = value + 1.5 * ties_merge(trimmed, weights, normalize=True)
    close(merged(tmp_path, path), want, family["dtype"])
    assert bool(trim_path) == (request.node.callspec.params["trim_path"] == "sampled")


def test_ties_breaks_ties_at_the_threshold_by_position(tmp_path):
    """Task vectors with many equal magnitudes: exactly ⌊density·n⌋ are kept, the first ones."""
    from safetensors.torch import save_file

    base = torch.zeros(64, 16)
    values = torch.tensor([1.0, -1.0, 2.0, 0.5]).repeat(256).view(64, 16)  # 256 of each magnitude class
    paths = []
    for name, tensor in (("base", base), ("a", values), ("b", values * 0.25)):
        (tmp_path / name).mkdir()
        save_file({"w": tensor.contiguous()}, tmp_path / name / "model.safetensors")
        paths.append(tmp_path / name)
    text = (f'method = "ties"\noutput = "out"\n[base]\npath = "{paths[0]}"\n[ties]\ndensity = 0.3\n'
            f'[[models]]\npath = "{paths[1]}"\n[[models]]\npath = "{paths[2]}"\n')
    (tmp_path / "r.toml").write_text(text)
    for block in (2**18, 16 * 5):  # whole, and blocks of 5 rows: the ties straddle blocks
        method_base.BLOCK_ELEMENTS, saved = block, method_base.BLOCK_ELEMENTS
        try:
            result = cli("merge", tmp_path / "r.toml", "--force")
        finally:
            method_base.BLOCK_ELEMENTS = saved
        assert result.exit_code == 0, result.output
        out = load(tmp_path / "out")["w"].reshape(-1)
        flat = values.reshape(-1)
        k = math.floor(0.3 * flat.numel())  # 307: the 256 twos, then the first 51 of the ones
        keep = top_k_mask(flat, 0.3)
        assert int(keep.sum()) == k and bool(keep[flat.abs() == 2].all())
        first_ones = torch.nonzero(flat.abs() == 1).flatten()[:k - 256]
        assert bool(keep[first_ones].all()) and int(keep[flat.abs() == 1].sum()) == k - 256
        # b is a quarter of a, so both keep the same places and agree in sign: their mean, 5/8 of a
        torch.testing.assert_close(out, torch.where(keep, flat * 0.625, 0.0), rtol=0, atol=1e-6)


def test_dare_drops_by_position_alone_with_the_density_asked(tmp_path, family, monkeypatch):
    """Bit-identical with 1 and 4 worker threads and with two block sizes; about `density` kept."""
    path = recipe(tmp_path, family, "dare_ties", "density = 0.3\nseed = 7\nlambda = 1.0", models=2)
    outputs = []
    for cores, block in ((1, 2**18), (4, 2**18), (4, 96)):
        monkeypatch.setattr(stream.os, "cpu_count", lambda cores=cores: cores)
        monkeypatch.setattr(method_base, "BLOCK_ELEMENTS", block)
        outputs.append((tmp_path / "out" / "model.safetensors").read_bytes() if merged(tmp_path, path) else b"")
    assert outputs[0] == outputs[1] == outputs[2]
    mask = kept(stream_key(7, 0, "model.layers.0.mlp.up_proj.weight"), 0, 200_000, 0.3)
    assert abs(float(mask.double().mean()) - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 200_000)
    other = kept(stream_key(7, 1, "model.layers.0.mlp.up_proj.weight"), 0, 200_000, 0.3)
    assert abs(float((mask & other).double().mean()) - 0.09) < 0.01  # independent across models
    assert not torch.equal(mask, kept(stream_key(8, 0, "model.layers.0.mlp.up_proj.weight"), 0, 200_000, 0.3))


def test_dare_drop_is_the_documented_hash_of_key_and_position():
    """The drop mask (computed with numpy's uint32 arithmetic) equals the hash written out here one
    position at a time with Python integers: xorshift-multiply twice, modulo 2³², the position's high
    32 bits folded into the key; across a 2³² boundary too. A changed mask would change every saved
    recipe's merge."""
    def mix(value: int) -> int:
        for _ in range(2):
            value ^= value >> 16
            value = (value * 0x45D9F3B) % 2**32
        return value ^ (value >> 16)

    key = stream_key(11, 2, "model.embed_tokens.weight")
    for start, density in ((0, 0.3), (2**32 - 700, 0.5), (3 * 2**32 + 5, 0.9), (17, 1.0)):
        want = [mix((position % 2**32) ^ mix((position >> 32) ^ key[1]) ^ key[0]) < int(density * 2**32)
                for position in range(start, start + 1500)]
        assert kept(key, start, 1500, density).tolist() == want


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_rescales_the_survivors_and_sums_or_elects(family, tmp_path, method):
    weights, density = [1.0, 0.5], 0.4
    path = recipe(tmp_path, family, method, f"density = {density}\nseed = 3", models=2, weights=weights)
    base, vectors = task_vectors(family, 2)
    want = {}
    for name, value in base.items():
        if name not in vectors[0]:
            want[name] = value
            continue
        survivors = [torch.where(kept(stream_key(3, i, name), 0, v[name].numel(), density).view(v[name].shape),
                                 v[name], 0.0) / density for i, v in enumerate(vectors)]
        if method == "dare_linear":
            want[name] = value + sum(w * s for w, s in zip(weights, survivors))
        else:
            want[name] = value + ties_merge(survivors, weights, normalize=False)
    close(merged(tmp_path, path), want, family["dtype"])


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_interpolates_each_tensor_on_the_sphere(family, tmp_path, t):
    path = recipe(tmp_path, family, "slerp", f"t = {t}", models=2)
    first, second = ({k: v.double() if v.is_floating_point() else v for k, v in load(m).items()}
                     for m in family["models"][:2])
    want = {}
    for name, a in first.items():
        if not a.is_floating_point():
            want[name] = a
            continue
        b = second[name]
        cos = float((a * b).sum() / (a.norm() * b.norm()))
        if abs(cos) > 0.9995:
            want[name] = (1 - t) * a + t * b
        else:
            omega = math.acos(cos)
            want[name] = (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)
    close(merged(tmp_path, path), want, family["dtype"])


# ---------------------------------------------------------------------------------------------
# A recipe is a recipe: reproduced bit for bit, described, validated


def test_every_method_reproduces_from_its_mergecli_toml_and_describes_itself(family, tmp_path):
    if family["dtype"] != torch.float32:
        pytest.skip("once is enough")
    for method, table in (("task_arithmetic", "lambda = 0.7"), ("ties", "density = 0.4"),
                          ("dare_linear", "density = 0.6\nseed = 11"), ("dare_ties", "density = 0.6"),
                          ("slerp", "t = 0.25")):
        path = recipe(tmp_path, family, method, table, models=2, extra='dtype = "bfloat16"\nshard_size = "20KB"')
        result = cli("merge", path, "--force", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["shards"] > 1
        again = tmp_path / "again"
        rerun = cli("merge", tmp_path / "out" / "mergecli.toml", "-o", again, "--force")
        assert rerun.exit_code == 0, rerun.output
        for shard in sorted((tmp_path / "out").glob("*.safetensors")):
            assert shard.read_bytes() == (again / shard.name).read_bytes(), (method, shard.name)
        card = (tmp_path / "out" / "README.md").read_text()
        assert f"[{method}]" in card and "mergecli merge mergecli.toml" in card
        words = {"task_arithmetic": "λ (`lambda`): 0.7", "ties": "trim scope", "dare_linear": "seed: 11",
                 "dare_ties": "DARE TIES", "slerp": "t: 0.25"}[method]
        assert words in card, card


@pytest.mark.parametrize(("method", "table", "extra", "words"), [
    ("ties", "density = 0.5", "no base", "needs a [base] model"),
    ("ties", "density = 1.5", "", "density must be in (0, 1]"),
    ("dare_ties", "density = 0", "", "density must be in (0, 1]"),
    ("ties", "density = { nobody = 0.5 }", "", "'nobody' is not a model of the recipe"),
    ("slerp", "t = 1.5", "", "slerp.t: Input should be less than or equal to 1"),
    ("slerp", "t = 0.5", "three models", "slerp interpolates two models, the recipe has 3"),
    ("ties", "densty = 0.5", "", "ties.densty: unknown key; did you mean 'density'?"),
])
def test_bad_task_vector_recipes_are_one_line(family, tmp_path, method, table, extra, words):
    path = recipe(tmp_path, family, method, table, models=3 if extra == "three models" else 2)
    if extra == "no base":
        path.write_text(path.read_text().replace(f'[base]\npath = "{family["base"]}"\n', ""))
    for command in (["merge", path], ["validate", path]):
        result = cli(*command)
        assert result.exit_code == 2, result.output
        assert words in result.stderr and "Traceback" not in result.output, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_base_of_other_shapes_is_refused(family, tmp_path):
    other = build_llama(tmp_path / "other-base", seed=5, vocab_size=160, dtype=family["dtype"])
    path = recipe(tmp_path, family, "task_arithmetic", "", models=2)
    path.write_text(path.read_text().replace(str(family["base"]), str(other)))
    result = cli("merge", path)  # another vocabulary: its tokenizer says so, before any shape
    assert result.exit_code == 1 and "(ft0): its tokenizer's vocabulary differs from base's" in result.stderr
    (other / "tokenizer.json").unlink()  # nothing to match its rows by
    result = cli("merge", path)
    assert result.exit_code == 1 and "base has no tokenizer.json, so its embedding rows cannot be" in result.stderr


def test_average_recipes_run_with_merge_and_regmean_ones_are_sent_to_their_command(family, tmp_path):
    path = recipe(tmp_path, family, "average", "", models=2)
    path.write_text(path.read_text().replace("[average]\n", ""))
    assert cli("merge", path).exit_code == 0
    path.write_text(path.read_text().replace('method = "average"', 'method = "regmean"'))
    result = cli("merge", path)
    assert result.exit_code == 2 and "run `mergecli regmean merge RECIPE`" in result.stderr


def trimmed_by_passes(trim, values: torch.Tensor, rows_per_block: int, generator: torch.Generator,
                      share: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """Run a TopMagnitudes through its passes as the stream does (blocks of rows in a random order; the
    sample pass on its sampled rows only), then trim every block."""
    from mergecli.methods.bracket import sample_rows
    from mergecli.methods.magnitude import DONE, SAMPLE

    width = values.shape[1]
    rows_count = values.shape[0]
    blocks = [(start, min(rows_count, start + rows_per_block)) for start in range(0, rows_count, rows_per_block)]
    stages = []
    while trim.stage != DONE:
        stages.append(trim.stage)
        rows = list(sample_rows(blocks, share)) if trim.stage == SAMPLE else blocks
        for index in torch.randperm(len(rows), generator=generator).tolist():
            start, stop = rows[index]
            trim.count(values[start:stop].reshape(-1).clone(), start * width)
        trim.finish_pass()
    kept = torch.cat([trim.trim_(values[start:stop].reshape(-1).clone(), start * width) for start, stop in blocks])
    return kept, stages


def levels(generator: torch.Generator, shape: tuple[int, int]) -> torch.Tensor:
    """Values on few levels (ties straddling blocks), some of them continuous, a tenth zeros."""
    count = shape[0] * shape[1]
    values = torch.randint(-40, 41, (count,), generator=generator).float() * 0.25 + torch.randn(
        count, generator=generator) * (torch.rand(count, generator=generator) < 0.3)
    return (values * (torch.rand(count, generator=generator) > 0.1)).view(shape)


@pytest.mark.parametrize("store_entries", [2**21, 0], ids=["ties-from-stored-counts", "ties-from-a-third-pass"])
@pytest.mark.parametrize("density", [0.05, 0.5, 0.93])
def test_top_magnitudes_is_a_stable_sort_whatever_the_block_order(store_entries, density):
    """The streamed trim keeps what a stable sort keeps, with blocks counted out of order, values on few
    levels (ties straddling blocks) and both ways of counting the ties per block."""
    from mergecli.methods.magnitude import LOW, TOP, TopMagnitudes

    generator = torch.Generator().manual_seed(3)
    values = levels(generator, (1001, 10))
    trim = TopMagnitudes(values.numel(), density, store_entries=store_entries)
    kept, stages = trimmed_by_passes(trim, values, 97, generator)
    assert stages[:2] == [TOP, LOW]
    want = torch.where(top_k_mask(values, density).reshape(-1), values.reshape(-1), 0.0)
    assert torch.equal(kept != 0, want != 0) and torch.equal(kept, want)


def _bits(value: float) -> int:
    return int(torch.tensor(value).view(torch.int32))


@pytest.mark.parametrize("bracket_kind", ["sampled", "missing", "overflowing"])
@pytest.mark.parametrize(("density", "spread"), [(0.05, "levels"), (0.5, "levels"), (0.93, "levels"),
                                                 (0.2, "gaussian"), (0.95, "mostly-zeros"), (0.3, "an-inf")])
def test_a_sampled_bracket_settles_the_same_entries_as_a_stable_sort(monkeypatch, bracket_kind, density, spread):
    """A large population is sampled, bracketed and settled in one pass, and keeps exactly what a stable
    sort keeps. A bracket that misses the k-th value, or holds more values than its store, falls back to
    the histogram passes with the same result. Values: on few levels (ties straddling blocks),
    continuous, mostly zeros (the k-th largest is 0 with density 0.95), or with infinities."""
    from mergecli.methods import bracket
    from mergecli.methods.bracket import INFINITY_BITS, Bracket, SamplePlan, sample_rows
    from mergecli.methods.magnitude import BRACKET, DONE, SAMPLE, TOP, TopMagnitudes

    monkeypatch.setattr(bracket, "MIN_SAMPLED", 1000)
    if bracket_kind == "missing":  # a bracket far above every value
        monkeypatch.setattr(bracket.Sample, "bracket", lambda self, size, k: Bracket(_bits(1e30), _bits(2e30), 64))
    elif bracket_kind == "overflowing":  # every positive value in the bracket, and room for 16
        monkeypatch.setattr(bracket.Sample, "bracket", lambda self, size, k: Bracket(1, INFINITY_BITS, 16))
    generator = torch.Generator().manual_seed(5)
    shape = (4096, 24)
    if spread == "levels":
        values = levels(generator, shape)
    elif spread == "gaussian":
        values = torch.randn(shape, generator=generator)
    elif spread == "mostly-zeros":
        values = torch.randn(shape, generator=generator) * (torch.rand(shape, generator=generator) < 0.03)
    else:
        values = torch.randn(shape, generator=generator)
        values.view(-1)[::997] = math.inf
    blocks = [(start, min(shape[0], start + 64)) for start in range(0, shape[0], 64)]
    share = bracket.sample_share(values.numel())
    slabs = [(stop - start) * shape[1] for start, stop in sample_rows(blocks, share)]
    trim = TopMagnitudes(values.numel(), density, sample=SamplePlan(sum(slabs), len(slabs)))
    kept, stages = trimmed_by_passes(trim, values, 64, generator, share)
    assert stages[:2] == [SAMPLE, BRACKET] and trim.stage == DONE
    assert (TOP in stages) == (bracket_kind != "sampled")
    want = torch.where(top_k_mask(values, density).reshape(-1), values.reshape(-1), 0.0)
    assert torch.equal(kept != 0, want != 0) and torch.equal(kept, want)


def test_a_nan_sends_a_bracket_back_to_the_histogram_passes(monkeypatch):
    """A NaN lies nowhere in a bracket's comparisons: the pass notices that its counts fall short and
    the exact passes decide, as they do without a sample (NaN counts as the largest magnitude)."""
    from mergecli.methods import bracket
    from mergecli.methods.bracket import SamplePlan, sample_rows
    from mergecli.methods.magnitude import SAMPLE, TOP, TopMagnitudes

    monkeypatch.setattr(bracket, "MIN_SAMPLED", 1000)
    generator = torch.Generator().manual_seed(8)
    values = torch.randn(4096, 24, generator=generator)
    values[4000, 3] = math.nan
    blocks = [(start, start + 64) for start in range(0, 4096, 64)]
    share = bracket.sample_share(values.numel())
    slabs = [(stop - start) * 24 for start, stop in sample_rows(blocks, share)]
    sampled = TopMagnitudes(values.numel(), 0.3, sample=SamplePlan(sum(slabs), len(slabs)))
    kept, stages = trimmed_by_passes(sampled, values, 64, generator, share)
    want, plain = trimmed_by_passes(TopMagnitudes(values.numel(), 0.3), values, 64, generator)
    assert stages[0] == SAMPLE and TOP in stages and plain[0] == TOP
    assert torch.equal(kept.isnan(), want.isnan()) and torch.equal(kept.nan_to_num(), want.nan_to_num())
