"""`--resume`: a merge killed (os._exit, as SIGKILL leaves it: no cleanup) once its second shard is finished
carries on: the shards it finished are kept where their recorded CRC checks, the rest are written, and the
output equals an uninterrupted merge byte for byte, reading only the remaining shards' share of the inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builders import build_llama
from clirunner import cli

KILLER = """
import os, sys
import mergecli.io.writer as writer
original = writer.ShardWriter.write
finished = []
def write(self, name, block, row_start=0):
    original(self, name, block, row_start)
    done = [f for f, left in self._left.items() if left == 0]
    if len(done) >= 2 and (self.directory / ".mergecli-resume.json").exists():
        import json
        if len(json.loads((self.directory / ".mergecli-resume.json").read_text())["shards"]) >= 2:
            os._exit(9)  # killed: nothing cleaned up
writer.ShardWriter.write = write
import torch
torch.set_num_threads(1)
from mergecli.__main__ import main
sys.argv = ["mergecli", *sys.argv[1:]]
main()
"""


@pytest.fixture
def setup(tmp_path):
    models = [build_llama(tmp_path / f"m{i}", seed=100 + i) for i in range(3)]
    recipe = tmp_path / "r.toml"
    recipe.write_text('method = "ties"\noutput = "out"\nshard_size = "30KB"\n[base]\n'
                      f'path = "{models[0]}"\n[ties]\ndensity = 0.5\n'
                      + "".join(f'[[models]]\npath = "{m}"\n' for m in models[1:]))
    assert cli("merge", recipe).exit_code == 0
    shutil.move(tmp_path / "out", tmp_path / "whole")
    return models, recipe


def killed(recipe: Path) -> Path:
    run = subprocess.run([sys.executable, "-c", KILLER, "merge", str(recipe)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 9, run.stdout + run.stderr
    partial = [p for p in recipe.parent.iterdir() if p.name.startswith(".out.partial-")]
    assert len(partial) == 1 and not (recipe.parent / "out").exists()
    return partial[0]


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names if n != "README.md")


def test_a_killed_merge_resumes_to_the_uninterrupted_output_reading_only_the_rest(setup, tmp_path, monkeypatch):
    from collections import Counter

    from mergecli.io.checkpoint import Checkpoint

    models, recipe = setup
    partial = killed(recipe)
    kept = set(json.loads((partial / ".mergecli-resume.json").read_text())["shards"])
    original = Checkpoint.read_stored
    reads: Counter = Counter()

    def counting(self, name, rows=None, **kwargs):
        out = original(self, name, rows, **kwargs)
        if rows is None or rows[1] - rows[0] > 1:  # not the digests' first rows
            reads[name] += out.nbytes
        return out

    monkeypatch.setattr(Checkpoint, "read_stored", counting)
    result = cli("merge", recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert "--resume: kept 2 of" in result.output
    resumed = dict(reads)
    reads.clear()
    assert cli("merge", recipe, "-o", tmp_path / "again").exit_code == 0  # uninterrupted, for its reads
    monkeypatch.setattr(Checkpoint, "read_stored", original)
    assert same_files(tmp_path / "out", tmp_path / "whole")
    index = json.loads((tmp_path / "whole" / "model.safetensors.index.json").read_text())["weight_map"]
    remaining = {name for name, shard in index.items() if shard not in kept}
    assert set(resumed) == remaining, (kept, {n: index[n] for n in set(resumed) ^ remaining})  # none of the kept
    assert all(resumed[name] == reads[name] for name in remaining)


def test_a_corrupted_finished_shard_is_written_again(setup, tmp_path):
    _, recipe = setup
    partial = killed(recipe)
    shard = sorted(p for p in partial.iterdir() if p.suffix == ".safetensors")[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = cli("merge", recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert f"{shard.name} does not match what was recorded" in result.output
    assert same_files(tmp_path / "out", tmp_path / "whole")


def test_a_changed_recipe_starts_over_and_nothing_to_resume_is_one_line(setup, tmp_path):
    _, recipe = setup
    killed(recipe)
    result = cli("merge", recipe, "--resume", "--set", "ties.density=0.6")
    assert result.exit_code == 0 and "another recipe or other inputs; starting over" in result.output
    result = cli("merge", recipe, "--resume", "-o", tmp_path / "elsewhere")
    assert result.exit_code == 2 and "--resume: no interrupted merge of" in result.stderr
