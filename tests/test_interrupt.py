"""Interrupted merges (SIGTERM, SIGKILL, failures) leave nothing that looks complete and lose nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mergecli
from conftest import tree_digest
from mergecli.errors import MergecliError
from mergecli.io.atomic import atomic_directory


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory) -> list[Path]:
    """Two 256 MB fp32 checkpoints: large enough that a merge is still running when signalled."""
    root = tmp_path_factory.mktemp("big")
    paths = []
    for i in range(2):
        tensors = {f"layer.{j}.weight": torch.full((4096, 2048), float(i + j)) for j in range(8)}
        paths.append(root / f"big{i}.safetensors")
        save_file(tensors, paths[-1])
    return paths


def start_merge(pair: list[Path], out: Path, *extra: str, quiet: bool = True) -> subprocess.Popen:
    command = [sys.executable, "-m", "mergecli", "average", "-m", str(pair[0]), "-m", str(pair[1]),
               "-o", str(out), *(["--quiet"] if quiet else []), *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_partial(out: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not list(out.parent.glob(f".{out.name}.partial-*")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the merge never started writing"
        time.sleep(0.002)


def test_sigterm_cleans_up_and_keeps_existing_output(big_pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "mergecli.toml").write_text('output = "."\n')  # an earlier merge's files: --force may replace them
    before = {str(p): p.stat().st_mtime_ns for p in big_pair}
    process = start_merge(big_pair, out, "--force")
    wait_for_partial(out, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr  # 128 + SIGTERM
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "mergecli.toml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert {str(p): p.stat().st_mtime_ns for p in big_pair} == before


def wait_for_handlers(process: subprocess.Popen) -> None:
    """Until the process catches SIGINT and SIGTERM (its SigCgt mask in /proc): before that, a signal
    meets Python's defaults, whatever mergecli does. Waiting for the fact, not for a time, holds on a
    busy machine."""
    wanted = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = Path(f"/proc/{process.pid}/status").read_text()
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        if caught & wanted == wanted:
            return
        time.sleep(0.001)
    raise AssertionError("the process never installed its signal handlers")


def wait_for_torch(process: subprocess.Popen) -> None:
    """Until torch's library is mapped into the process: its import has begun (and takes a few hundred ms
    more to finish). A fixed delay lands after the whole merge on a machine whose page cache holds torch:
    then the signal meets the output's swap, which completes by design."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if "libtorch" in Path(f"/proc/{process.pid}/maps").read_text():
            return
        time.sleep(0.001)
    raise AssertionError("torch was never loaded")


@pytest.mark.parametrize("moment", ["while-python-starts", "while-torch-loads"])
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_starting_up_is_one_line_and_its_exit_code(big_pair, tmp_path, sig, code, moment):
    """From the moment the handlers are in place (the first thing mergecli does), through the imports."""
    command = [sys.executable, "-m", "mergecli", "average", "-m", str(big_pair[0]), "-m", str(big_pair[1]),
               "-o", str(tmp_path / "out")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_handlers(process)
    if moment == "while-torch-loads":
        wait_for_torch(process)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert "interrupted" in stderr and not (tmp_path / "out").exists()


def test_the_process_ends_as_soon_as_the_result_is_out(tmp_path):
    """Once the command's result is out (flushed, even into a pipe), the process ends with its code,
    without the interpreter's half-second teardown of torch: nothing after `main()` runs, and no
    signal can land in a teardown and turn a success into a kill."""
    code = ("import signal, sys, torch\n"
            "from mergecli.__main__ import main\n"
            "sys.argv = ['mergecli', '--version']\n"
            "try:\n    main()\nfinally:\n    print('after main')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert result.stdout.splitlines() == [f"mergecli {mergecli.__version__}"] and result.stderr == ""
    failed = subprocess.run([sys.executable, "-m", "mergecli", "validate", str(tmp_path / "none.toml")],
                            capture_output=True, text=True, timeout=60)
    assert failed.returncode == 2 and failed.stderr.startswith("error: ")


def test_sigkill_leaves_no_complete_looking_output_and_rerun_cleans(big_pair, tmp_path):
    out = tmp_path / "out"
    process = start_merge(big_pair, out)
    wait_for_partial(out, process)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert not out.exists()
    partials = list(tmp_path.glob(".out.partial-*"))
    assert partials and all(p.name.startswith(".") for p in partials)
    rerun = start_merge(big_pair, out)
    _, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the stale partial was removed


def test_failure_inside_atomic_directory_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")
    before = tree_digest(out)
    with pytest.raises(MergecliError), atomic_directory(out, force=True) as temporary:
        (temporary / "model.safetensors").write_bytes(b"new, half written")
        raise MergecliError("disk full")
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_plain_progress_lines_when_not_a_terminal(big_pair, tmp_path):
    """Non-terminal stderr: one plain line per step, no bar animation; the summary on stdout."""
    process = start_merge(big_pair, tmp_path / "out", quiet=False)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    lines = stderr.strip().splitlines()
    assert lines[0].startswith("merging: 8 tensors") and lines[-1].startswith("merging: 100%")
    assert "\r" not in stderr and "\x1b[" not in stderr
    assert "output" in stdout and "written" in stdout


def test_write_failure_mid_merge_is_an_io_error(big_pair, tmp_path):
    """A write that fails part-way (file size limit, as on a full disk): exit 1, nothing left."""
    import resource

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (50 * 2**20, 50 * 2**20))

    out = tmp_path / "out"
    command = [sys.executable, "-m", "mergecli", "average", "-m", str(big_pair[0]), "-m", str(big_pair[1]),
               "-o", str(out), "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, preexec_fn=limit_file_size, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "File too large" in result.stderr and "nothing was written" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.fixture
def tiny_filesystem(tmpfs):
    """A real 8 MB tmpfs."""
    return tmpfs("small-disk", "size=8M")


def test_not_enough_disk_space_fails_before_writing(big_pair, tiny_filesystem):
    out = tiny_filesystem / "out"
    process = start_merge(big_pair, out)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    assert "not enough disk space" in stderr and "writes 0.27 GB" in stderr
    assert list(tiny_filesystem.iterdir()) == []
