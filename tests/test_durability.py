"""A finished output survives a power loss: every file's data and then its directory reach the disk
(fsync) before the rename that publishes them, and the parent after it. Seen from outside, by strace
on the real process and its real files (not a mock of os.fsync)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
CALL = re.compile(r"^\d+ +(\w+)\((.*)\) += (-?\d+)")


def traced(tmp_path: Path, *args: object) -> list[tuple[str, str]]:
    """(system call, its arguments with fds shown as paths) of fsync, rename and writeback calls that
    succeeded, in order, for one run of `mergecli ARGS`."""
    log = tmp_path / "strace.log"
    command = ["strace", "-f", "-qq", "-y", "-o", str(log), "-e",
               "trace=fsync,fdatasync,rename,renameat,renameat2,sync_file_range",
               sys.executable, "-m", "mergecli", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    calls = []
    for line in log.read_text().splitlines():
        match = CALL.match(line)
        if match and match.group(3) != "-1":
            calls.append((match.group(1), match.group(2)))
    return calls


def test_files_then_directory_are_synced_before_the_rename_and_the_parent_after(llama_bf16_sharded, tmp_path):
    out = tmp_path / "out"
    calls = traced(tmp_path, "average", "-m", llama_bf16_sharded[0], "-m", llama_bf16_sharded[1], "-o", out,
                   "--set", 'shard_size="20KB"', "-q")
    publish = next(i for i, (name, args) in enumerate(calls) if name.startswith("rename") and f'"{out}"' in args)
    partial = re.search(r'"([^"]*\.out\.partial-\d+)"', calls[publish][1]).group(1)
    synced = [args for name, args in calls[:publish] if name in ("fsync", "fdatasync")]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(files) > 8 and any(name.startswith("model-00002") for name in files)  # several shards
    for name in files:
        assert any(f"<{partial}/{name}>" in args for args in synced), f"{name} was not synced before the rename"
    last_file = max(i for i, (name, args) in enumerate(calls[:publish]) if f"<{partial}/" in args)
    assert any(name in ("fsync", "fdatasync") and args.endswith(f"<{partial}>")
               for name, args in calls[last_file:publish]), "the directory was not synced after its files"
    assert any(name == "fsync" and f"<{tmp_path}>" in args for name, args in calls[publish:]), \
        "the parent was not synced after the rename"
    assert any(name == "sync_file_range" for name, _ in calls[:publish])  # blocks flushed as they were written


def test_no_sync_skips_every_sync_the_parent_directory_too(llama_bf16_sharded, tmp_path):
    """As the README says: no file, no directory and not the parent (it used to sync the parent once)."""
    out = tmp_path / "out"
    calls = traced(tmp_path, "average", "-m", llama_bf16_sharded[0], "-m", llama_bf16_sharded[1], "-o", out,
                   "-q", "--no-sync")
    assert (out / "model.safetensors").is_file()
    assert [args for name, args in calls if name in ("fsync", "fdatasync", "sync_file_range")] == []
