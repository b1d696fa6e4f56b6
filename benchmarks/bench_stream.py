"""`make bench-stream`: merging Hub models with `--stream` against download-then-merge, on a link of a
set rate.

The fake hub of the tests (tests/fakehub) serves three LLaMA-shaped bf16 checkpoints of about 1 GB
each (those of `make bench-average`) on 127.0.0.1 through one throttled link: RATE bytes per second
shared by every connection, each answer after LATENCY seconds. Each contender runs in a child started
by `/usr/bin/time -v`, with an empty HF_HOME:

  - download, then merge: `mergecli average -m org/m0 -m org/m1 -m org/m2` (huggingface_hub's
    snapshot_download fills the cache, then the merge reads it);
  - `--stream`: the same with --stream (range requests, nothing stored);
  - the transfer alone: every input byte fetched over the same link (8 connections, 16 MB ranges), kept
    nowhere: the least any merge of these inputs over this link can take.

Reported, over REPEATS rounds of the three in turn: the median wall time and its ratio to the transfer
alone's, the highest peak RSS above the import baseline, disk used under HF_HOME and by the output,
and the bytes the server sent divided by the input bytes (the most of any round).

Usage: python benchmarks/bench_stream.py [WORKDIR] [--rate 200e6] [--latency 0.02] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import bench_average  # noqa: E402  (benchmarks/, put on the path above)

from fakehub import FakeHub  # noqa: E402  (tests/fakehub)

MB = 10**6
REPOS = ["org/m0", "org/m1", "org/m2"]

TRANSFER = """
import os, sys, time
from concurrent.futures import ThreadPoolExecutor
from huggingface_hub import hf_hub_url
from huggingface_hub.utils import build_hf_headers, get_session
started = time.perf_counter()
chunk = 16 * 2**20
jobs = []
for spec in sys.argv[1:]:
    repo, name, size = spec.split("|")
    url = hf_hub_url(repo, name)
    jobs += [(url, start, min(int(size), start + chunk) - 1) for start in range(0, int(size), chunk)]
def get(job):
    url, first, last = job
    with get_session().stream("GET", url, headers={**build_hf_headers(), "Range": f"bytes={first}-{last}"},
                              follow_redirects=True, timeout=60) as response:
        return sum(len(piece) for piece in response.iter_bytes())
with ThreadPoolExecutor(8) as pool:
    total = sum(pool.map(get, jobs))
open(os.environ["BENCH_WORK_FILE"], "w").write(str(time.perf_counter() - started))
"""


def disk_used(path: Path) -> int:
    if not path.exists():
        return 0
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    return sum(p.stat().st_blocks * 512 for p in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", nargs="?", default="bench-out", type=Path)
    parser.add_argument("--rate", type=float, default=200e6, help="bytes per second of the link")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds before each answer")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the three contenders (median wall)")
    options = parser.parse_args()
    work = options.work.resolve()
    models = [work / f"vocab32000-{i}" for i in range(3)]
    for seed, path in enumerate(models):  # the inputs of bench-average, built in a child if missing
        subprocess.run([sys.executable, str(HERE / "bench_average.py"), "--build", str(path), "32000", str(seed)],
                       check=True)
    _, _, baseline = bench_average.measure([sys.executable, "-c", bench_average.BASELINE], work / "work-seconds")

    hub = FakeHub().start()
    try:
        specs, input_bytes = [], 0
        for repo, path in zip(REPOS, models):
            files = {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}
            hub.add_repo(repo, files)
            for name, data in files.items():
                if name.endswith(".safetensors"):
                    specs.append(f"{repo}|{name}|{len(data)}")
                    input_bytes += len(data)
            del files
        for repo in REPOS:  # hash each file once now, not during the first contender
            for blob in hub.repos[repo].commits[hub.head(repo)].files.values():
                _ = blob.sha256
        hub.throttle(options.rate, options.latency)
        merge = [arg for repo in REPOS for arg in ("-m", repo)]
        home, out = work / "stream-home", work / "stream-out"
        # the command as users run it: with --stream, fetching starts while torch is still importing
        mergecli = [sys.executable, "-m", "mergecli", "average", *merge, "-q", "-o", str(out)]
        contenders = {
            "download, then merge": mergecli,
            "mergecli average --stream": [*mergecli, "--stream"],
            "the transfer alone (8 connections)": [sys.executable, "-c", TRANSFER, *specs],
        }
        runs: dict[str, list[tuple]] = {name: [] for name in contenders}
        for _ in range(options.repeats):  # rounds of every contender in turn: a slow spell hits them all
            for name, command in contenders.items():
                for path in (home, out):
                    shutil.rmtree(path, ignore_errors=True)
                home.mkdir(parents=True)
                env = hub.subprocess_env(home)
                env.pop("PYTHONPATH", None)
                # torch's libraries warm in the page cache, as on a machine that runs mergecli: the round's
                # download (3 GB written, then removed) may have pushed them out
                subprocess.run([sys.executable, "-c", bench_average.BASELINE], check=True)
                sent = hub.bytes_sent
                wall, _, rss = bench_average.measure(command, work / "work-seconds", env=env)
                runs[name].append((wall, rss - baseline, disk_used(home), disk_used(out),
                                   (hub.bytes_sent - sent) / input_bytes))
                print(f"{name}: {wall:.1f} s", file=sys.stderr)
                for path in (home, out):
                    shutil.rmtree(path, ignore_errors=True)
    finally:
        hub.stop()
    rows = [(name, statistics.median(run[0] for run in measured), max(run[1] for run in measured),
             *measured[0][2:4], max(run[4] for run in measured)) for name, measured in runs.items()]
    transfer = rows[-1][1]
    print(f"\nthree bf16 LLaMA-shaped inputs, {input_bytes / MB:.0f} MB in all; link {options.rate / MB:.0f} MB/s, "
          f"{options.latency * 1000:.0f} ms latency; {os.cpu_count()} cores; median of {options.repeats} rounds; "
          f"baseline RSS {baseline:.0f} MB "
          f"(import mergecli + torch)\n")
    print("| contender | wall s | ÷ transfer alone | peak RSS − baseline (MB) | disk under HF_HOME (MB) "
          "| disk of the output (MB) | bytes sent ÷ input bytes |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, wall, rss, home_bytes, out_bytes, ratio in rows:
        print(f"| {name} | {wall:.1f} | {wall / transfer:.2f} | {rss:.0f} | {home_bytes / MB:.1f} | "
              f"{out_bytes / MB:.0f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
