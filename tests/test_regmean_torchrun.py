"""Scale-out: `torchrun --nproc-per-node 2 -m mergecli regmean collect-stats` (gloo on CPU) splits the
calibration data across ranks (unevenly: 8 and 7 examples) and all-reduces every block's sums; the
result equals a single-process run, and the whole-model reference computed in the test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from builders import build_llama
from clirunner import cli
from references import first_examples, layer_inputs, read_stats, text_inputs, write_recipe


def collect_on_two_ranks(recipe: Path, stats_dir: str) -> subprocess.CompletedProcess:
    """collect-stats under `torchrun --nproc-per-node 2`, on CPU (gloo), into `stats_dir`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "mergecli", "regmean", "collect-stats", str(recipe), "--set", f"regmean.stats_dir={stats_dir}"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def test_two_ranks_equal_one_process(tmp_path, text_data):
    # float64 checkpoints: per-batch Grams in float64, so that a different batching adds no rounding
    models = [build_llama(tmp_path / f"llama-{i}", seed=30 + i, dtype=torch.float64) for i in range(2)]
    recipe = write_recipe(tmp_path / "recipe.toml", list(zip(models, text_data)),
                          settings={"num_examples": 15, "batch_size": 3, "max_length": 16})
    single = cli("regmean", "collect-stats", recipe, "--set", "regmean.stats_dir=single")
    assert single.exit_code == 0, single.output

    run = collect_on_two_ranks(recipe, "ranks")
    assert run.stdout.count("15 examples") == 2  # one summary per model, printed by rank 0 only

    for name in ("m0", "m1"):
        one, one_grams = read_stats(tmp_path / "single" / name)
        two, two_grams = read_stats(tmp_path / "ranks" / name)
        assert (two["examples"], two["tokens"]) == (one["examples"], one["tokens"]) == (15, one["tokens"])
        assert two["layers"] == one["layers"]
        assert two["fingerprint"] == one["fingerprint"] and two["weights_sha256"] == one["weights_sha256"]
        assert set(two_grams) == set(one_grams)
        for key, gram in one_grams.items():
            torch.testing.assert_close(two_grams[key], gram, rtol=1e-12, atol=1e-12 * float(gram.abs().max()))
    assert sorted(p.name for p in (tmp_path / "ranks").iterdir()) == ["m0", "m1"]
    reference = layer_inputs(models[1], text_inputs(models[1], first_examples(text_data[1], 15), max_length=16))
    meta, grams = read_stats(tmp_path / "ranks" / "m1")
    for weight, entry in meta["layers"].items():
        x = reference[weight.removesuffix(".weight")]
        assert entry["tokens"] == x.shape[0]
        torch.testing.assert_close(grams[entry["gram"]], x.T @ x, rtol=1e-12, atol=1e-12 * float((x.T @ x).abs().max()))


def test_moe_ranks_that_route_no_token_to_an_expert_add_up_to_one_process(tmp_path):
    """2 one-token examples, one per rank: each rank routes its token to 2 of the 4 experts (top 2), so
    two experts get no token there; yet both ranks hold a Gram for every expert (an empty one), so the
    all-reduce lines up and equals one process."""
    from test_families import MOE, build

    models = [build(tmp_path / f"mixtral-{i}", "mixtral", MOE["mixtral"], seed=i, dtype=torch.float64)
              for i in range(2)]
    data = tmp_path / "data.txt"
    data.write_text("model\ndata\n")
    recipe = write_recipe(tmp_path / "recipe.toml", [(m, data) for m in models],
                          settings={"num_examples": 2, "batch_size": 1, "max_length": 8})
    single = cli("regmean", "collect-stats", recipe, "--set", "regmean.stats_dir=single")
    assert single.exit_code == 0, single.output
    collect_on_two_ranks(recipe, "ranks")
    for name in ("m0", "m1"):
        one, one_grams = read_stats(tmp_path / "single" / name)
        two, two_grams = read_stats(tmp_path / "ranks" / name)
        assert two["layers"] == one["layers"] and set(two_grams) == set(one_grams)
        experts = [entry for entry in one["layers"].values() if "expert" in entry]
        assert one["tokens"] == 2 and len(experts) == 2 * 4 * 3
        for key, gram in one_grams.items():
            torch.testing.assert_close(two_grams[key], gram, rtol=1e-12, atol=1e-12 * float(gram.abs().max()))
