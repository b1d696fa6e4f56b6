"""Outputs are never lost: `--force` replaces only what mergecli wrote, crash-safely, and the next
run restores or removes what a killed one left. The kills here are real SIGKILLs of real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from clirunner import cli
from conftest import tree_digest

# Runs `mergecli average A B -o OUT --force` in a fresh process whose filesystem steps, from the moment
# the finished output starts being synced to disk, are counted: the process sends itself SIGNAL (KILL by
# default) just before step KILL_AT (and, with NO_EXCHANGE, behaves as on a system without renameat2's
# atomic exchange). Step 0 is the sync, before the swap; then the renames (or the exchange), the sync of
# the parent, and the removal of the old output.
DRIVER = """
import os, shutil, signal, sys
from mergecli.io import atomic
kill_at, exchange = int(os.environ["KILL_AT"]), os.environ.get("NO_EXCHANGE") != "1"
signum = getattr(signal, "SIG" + os.environ.get("SIGNAL", "KILL"))
steps = [0]
counting = [False]

def step(function, starts=False):
    def counted(*args, **kwargs):
        counting[0] = counting[0] or starts
        if counting[0]:
            if steps[0] == kill_at:
                os.kill(os.getpid(), signum)
            steps[0] += 1
        return function(*args, **kwargs)
    return counted

os.rename, shutil.rmtree = step(os.rename), step(shutil.rmtree)
atomic._exchange = step(atomic._exchange if exchange else (lambda a, b: False))
atomic.sync_tree = step(atomic.sync_tree, starts=True)
atomic.sync_directory = step(atomic.sync_directory)
sys.argv = ["mergecli", *sys.argv[1:]]
from mergecli.__main__ import main
main()
"""


def run_driver(*args: object, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


@pytest.fixture
def old_output(llama_fp32, tmp_path) -> Path:
    """A finished merge output to be replaced."""
    out = tmp_path / "out"
    assert cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", out).exit_code == 0
    return out


NAMED_BY_PLACE = ("README.md", "mergecli.toml", ".mergecli-manifest.json")  # name, relative paths, their sizes


def content(out: Path) -> dict[str, str]:
    return {name: digest for name, digest in tree_digest(out).items() if name not in NAMED_BY_PLACE}


def state(out: Path, old: dict, new: dict) -> str:
    digest = content(out) if out.is_dir() else None
    return "old" if digest == old else "new" if digest == new else f"broken: {sorted(digest or [])}"


@pytest.mark.parametrize("exchange", ["1", "0"], ids=["renameat2-exchange", "rename-fallback"])
def test_a_kill_at_any_step_of_the_replacement_loses_nothing(llama_fp32, old_output, tmp_path, exchange):
    old = content(old_output)
    reference = tmp_path / "reference"
    assert cli("average", "-m", llama_fp32[0], "-m", llama_fp32[2], "-o", reference).exit_code == 0
    new = content(reference)
    assert new != old and set(new) == set(old)
    args = ["average", "-m", llama_fp32[0], "-m", llama_fp32[2], "-o", old_output, "--force", "--quiet"]
    seen = set()
    for kill_at in range(10):
        if state(old_output, old, new) != "old":  # start each round from the old output
            assert cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", old_output, "--force").exit_code == 0
        run = run_driver(*args, KILL_AT=str(kill_at), NO_EXCHANGE="1" if exchange == "0" else "0")
        killed = run.returncode == -signal.SIGKILL
        now = state(old_output, old, new)
        seen.add(now if killed else "finished")
        assert now in ("old", "new") or (exchange == "0" and not old_output.exists()), (kill_at, now)
        # the next run restores or removes every leftover, and says so
        again = cli("average", "-m", llama_fp32[0], "-m", llama_fp32[2], "-o", old_output, "--force")
        assert again.exit_code == 0, again.output
        if killed:
            assert "interrupted" in again.stderr, (kill_at, again.stderr)  # "left by an interrupted ..."
        assert state(old_output, old, new) == "new"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reference"], kill_at
        if not killed:
            break
    assert {"old", "new", "finished"} <= seen or {"old", "finished"} <= seen, seen


@pytest.mark.parametrize("exchange", ["1", "0"], ids=["renameat2-exchange", "rename-fallback"])
@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_a_signal_at_any_step_of_the_swap_completes_it_or_never_starts_it(llama_fp32, old_output, tmp_path, exchange,
                                                                         sig):
    """SIGTERM or SIGINT at each step: before the swap (the sync) it is refused and the old output stays,
    with 143 / 130; once the swap started, it completes and the exit code is 0. A rerun is bit-identical."""
    old = content(old_output)
    reference = tmp_path / "reference"
    assert cli("average", "-m", llama_fp32[0], "-m", llama_fp32[2], "-o", reference).exit_code == 0
    new = content(reference)
    args = ["average", "-m", llama_fp32[0], "-m", llama_fp32[2], "-o", old_output, "--force", "--quiet"]
    interrupted = {"TERM": 143, "INT": 130}[sig]
    outcomes = []
    for kill_at in range(5 if exchange == "0" else 4):
        if state(old_output, old, new) != "old":
            assert cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", old_output, "--force").exit_code == 0
        run = run_driver(*args, KILL_AT=str(kill_at), SIGNAL=sig, NO_EXCHANGE="1" if exchange == "0" else "0")
        now = state(old_output, old, new)
        outcomes.append((kill_at, run.returncode, now))
        assert "Traceback" not in run.stderr, run.stderr
        if kill_at == 0:  # before the swap: nothing changed, and the exit code says so
            assert (run.returncode, now) == (interrupted, "old"), (run.returncode, now, run.stderr)
        else:  # the swap had started: it completed
            assert (run.returncode, now) == (0, "new"), (kill_at, run.returncode, now, run.stderr)
            assert "interrupted once the output was complete" in run.stderr
        again = cli("average", "-m", llama_fp32[0], "-m", llama_fp32[2], "-o", old_output, "--force")
        assert again.exit_code == 0 and content(old_output) == new  # a rerun is bit-identical
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reference"], kill_at
    assert {code for _, code, _ in outcomes} == {0, interrupted}, outcomes


def test_force_refuses_a_directory_mergecli_did_not_write(llama_fp32, tmp_path):
    victim = tmp_path / "victim"
    (victim / ".git").mkdir(parents=True)
    (victim / "main.py").write_text("print('my code')\n")
    before = tree_digest(victim)
    result = cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", victim, "--force")
    assert result.exit_code == 2, result.output
    assert f"--force does not replace {victim}: it holds .git/" in result.stderr or \
        f"--force does not replace {victim}: it holds " in result.stderr
    assert tree_digest(victim) == before and (victim / ".git").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim"]


def test_force_replaces_an_empty_directory_or_an_earlier_output(llama_fp32, old_output, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", empty, "--force").exit_code == 0
    assert (empty / "model.safetensors").is_file()
    before = load_file(old_output / "model.safetensors")
    assert cli("average", "-m", llama_fp32[0], "-m", llama_fp32[2], "-o", old_output, "--force").exit_code == 0
    after = load_file(old_output / "model.safetensors")
    assert any(not (before[k] == after[k]).all() for k in before)  # really the new merge
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]


def test_leftovers_of_killed_runs_are_restored_or_removed_and_reported(llama_fp32, old_output, tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    aside = tmp_path / f".out.replaced-{dead}"
    os.rename(old_output, aside)  # a replacement killed after moving the old output aside
    (tmp_path / f".out.partial-{dead}").mkdir()
    (tmp_path / f".out.partial-{dead}" / "model.safetensors").write_bytes(b"half")
    dry = cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", old_output, "--dry-run")
    assert dry.exit_code == 0 and aside.exists()  # a dry run changes nothing
    result = cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", old_output, "--force")
    assert result.exit_code == 0, result.output
    assert f"restored {old_output}, which an interrupted replacement had moved aside" in result.stderr
    assert f"removed .out.partial-{dead}, left by an interrupted run" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert json.loads((old_output / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


# ---------------------------------------------------------------------------------------------
# --force and links: nothing of an input or of a user's own is ever deleted


def test_force_never_deletes_an_input_reached_through_a_link(llama_fp32, old_output, tmp_path):
    shutil.copytree(llama_fp32[0], old_output / "inner")
    alias = tmp_path / "alias"
    alias.symlink_to(old_output / "inner")
    before = tree_digest(old_output / "inner")
    result = cli("average", "-m", alias, "-m", llama_fp32[1], "-o", old_output, "--force")
    assert result.exit_code == 2, result.output
    assert f"the input {alias} (through links: it is {old_output / 'inner'}) is inside the output" in result.stderr
    assert tree_digest(old_output / "inner") == before


@pytest.mark.parametrize("target", ["a directory", "nothing"])
def test_an_output_that_is_a_link_is_refused(llama_fp32, tmp_path, target):
    real = tmp_path / "real"
    if target == "a directory":
        real.mkdir()
        (real / "mine.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(real)
    result = cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", link, "--force")
    assert result.exit_code == 2 and f"output {link} is a symbolic link" in result.stderr, result.output
    assert sorted(p.name for p in real.iterdir()) == ["mine.txt"] if target == "a directory" else not real.exists()


def test_force_refuses_a_folder_whose_recipe_says_output_is_itself(llama_fp32, tmp_path):
    """A recipe kept beside its outputs says `output = "."`: that does not make the folder mergecli's."""
    project = tmp_path / "proj"
    project.mkdir()
    (project / "mergecli.toml").write_text(f'output = "."\n[[models]]\npath = "{llama_fp32[0]}"\n'
                                           f'[[models]]\npath = "{llama_fp32[1]}"\n')
    (project / "thesis.txt").write_text("four years of work")
    result = cli("average", project / "mergecli.toml", "--force")
    assert result.exit_code == 2, result.output
    assert f"--force does not replace {project}: it holds thesis.txt, which mergecli did not write" in result.stderr
    assert (project / "thesis.txt").read_text() == "four years of work"


def test_force_refuses_an_output_with_a_file_added_or_changed(llama_fp32, old_output):
    (old_output / "notes.md").write_text("my notes")
    result = cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", old_output, "--force")
    assert result.exit_code == 2 and "it holds notes.md, which mergecli did not write" in result.stderr
    (old_output / "notes.md").unlink()
    with open(old_output / "config.json", "a") as config:
        config.write("\n")
    result = cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", old_output, "--force")
    assert result.exit_code == 2 and "config.json has changed since mergecli wrote it" in result.stderr
