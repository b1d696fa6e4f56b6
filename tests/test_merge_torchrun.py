"""`torchrun --nproc-per-node 2 -m mergecli merge`: the ranks split the output's shards (rank r the shards
r, r + 2, ...), rank 0 publishes; every file of the output equals one process's, byte for byte. Real
torchrun processes on CPU (gloo)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import quantized
from builders import build_llama
from clirunner import cli


def torchrun(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "mergecli", *map(str, args)], capture_output=True, text=True, env=env, timeout=180)


def files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.mark.parametrize("method, table", [("average", ""), ("ties", "[ties]\ndensity = 0.4\n")])
def test_a_merge_on_two_ranks_is_one_process_merge_byte_for_byte(tmp_path, method, table):
    models = [build_llama(tmp_path / f"m{i}", seed=90 + i) for i in range(3)]
    models[2] = quantized.fp8_block(tmp_path / "fp8", models[2], block=16)  # an fp8 input, dequantized as read
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'method = "{method}"\noutput = "out"\nshard_size = "30KB"\n[base]\npath = "{models[0]}"\n'
                      + table + "".join(f'[[models]]\npath = "{m}"\n' for m in models[1:]))
    assert cli("merge", recipe).exit_code == 0
    single = tmp_path / "single"
    shutil.move(tmp_path / "out", single)
    run = torchrun("merge", recipe)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("merged model:") == 1  # rank 0 speaks for both
    one, two = files(single), files(tmp_path / "out")
    assert len([name for name in one if name.endswith(".safetensors")]) >= 4  # shards for both ranks
    assert one.keys() == two.keys() and all(one[name] == two[name] for name in one), \
        [name for name in one if one[name] != two.get(name)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]


def test_a_method_in_stages_is_refused_under_torchrun_in_one_line(tmp_path):
    models = [build_llama(tmp_path / f"m{i}", seed=95 + i) for i in range(2)]
    (tmp_path / "data.txt").write_text("the model merge weight layer token data\n" * 8)
    recipe = tmp_path / "r.toml"
    recipe.write_text('method = "regmean"\noutput = "out"\n' + "".join(
        f'[[models]]\npath = "{m}"\ndata = "data.txt"\n' for m in models)
        + '[regmean]\nsequential = true\nstats_dir = "s"\nnum_examples = 4\nbatch_size = 2\nmax_length = 8\n')
    run = torchrun("regmean", "merge", recipe)
    assert run.returncode != 0 and "does not run under torchrun yet" in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_a_rank_that_fails_makes_every_rank_fail_and_nothing_is_published(tmp_path):
    """A NaN in a tensor of shard 2 (rank 1's): rank 1 stops on it, rank 0 finishes its own shards, learns of
    the failure in the all-reduce, and removes the temporary directory: no output, every rank exits non-zero."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    models = [build_llama(tmp_path / f"m{i}", seed=97 + i) for i in range(2)]
    recipe = tmp_path / "r.toml"
    recipe.write_text('method = "average"\noutput = "out"\nshard_size = "30KB"\n'
                      + "".join(f'[[models]]\npath = "{m}"\n' for m in models))
    assert cli("merge", recipe, "-o", tmp_path / "probe").exit_code == 0
    index = json.loads((tmp_path / "probe" / "model.safetensors.index.json").read_text())["weight_map"]
    second = sorted(set(index.values()))[1]
    victim = next(name for name, shard in index.items() if shard == second)
    tensors = load_file(models[1] / "model.safetensors")
    tensors[victim] = tensors[victim].clone()
    tensors[victim].view(-1)[0] = float("nan")
    save_file(tensors, models[1] / "model.safetensors", metadata={"format": "pt"})
    run = torchrun("merge", recipe)
    assert run.returncode != 0, run.stdout + run.stderr
    assert "another torchrun rank failed: nothing was written" in run.stderr, run.stderr[-2000:]  # rank 0
    assert victim in run.stderr  # rank 1 names the tensor
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert torch.isnan(tensors[victim]).any()


def test_ranks_given_different_recipes_all_refuse_in_one_line(tmp_path):
    """A launcher that gives rank 1 another setting (here by a wrapper reading RANK): the recipes' digests
    differ, every rank says so, and nothing is written."""
    models = [build_llama(tmp_path / f"m{i}", seed=99 + i) for i in range(2)]
    recipe = tmp_path / "r.toml"
    recipe.write_text('method = "average"\noutput = "out"\n' + "".join(f'[[models]]\npath = "{m}"\n' for m in models))
    wrapper = tmp_path / "launch.py"
    wrapper.write_text("import os, sys\nfrom mergecli.__main__ import main\n"
                       f"sys.argv = ['mergecli', 'merge', {str(recipe)!r}, '--set',\n"
                       "            'models.0.weight=' + ('1.0' if os.environ['RANK'] == '0' else '2.0')]\n"
                       "main()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(wrapper)], capture_output=True, text=True, env=env, timeout=180)
    assert run.returncode != 0, run.stdout + run.stderr
    assert run.stderr.count("the torchrun ranks disagree on the recipe (2 different ones)") == 2, run.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
