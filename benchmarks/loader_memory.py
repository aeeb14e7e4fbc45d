"""Memory of the streamed path per training sample: the summed proportional set size (PSS, /proc/PID/smaps_rollup)
of a training process and its loader workers while streaming, for an index of N and of 10 N training entries;
the difference over 9 N is what each added sample costs (issue 39's goal: <= 64 B, so that ImageNet's 1.28 M
entries cost <= 82 MB per process, and a set 10x its size stays in reach).

    nice -n 10 .venv/bin/python benchmarks/loader_memory.py   # -> benchmarks/results/loader_memory.{json,md}

PSS splits each shared page between the processes that map it, so the sum counts every page of the group once:
the index's memory-mapped arrays, the batches in shared memory, and the copy-on-write pages the workers share
with the trainer. Libraries and code are reported but left out of the sum: other processes on the machine map the
same files (another run's torch), so their share moves with whatever else runs. The entries are hard links to
1,000 small JPEGs (benchmarks/index_scale.py's files), so each is a file of its own to the index; the run is
`alexdist train` itself (quickstart's model, 1 process, 2 loader workers), measured after WARMUP steps, a few
times, while it trains. PSS is read from /proc/PID/smaps (smaps_rollup's total, by mapping).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, env, write
from index_scale import FILES, make_files

from alexdist.distributed.launcher import launch_command

N, CLASSES, VAL_PER_CLASS = 20_000, 10, 10
WARMUP, SAMPLES, WORKERS = 30, 5, 2  # steps before measuring; PSS readings, one every few steps
RUN = ["data.loader=stream", f"data.workers={WORKERS}", "train.epochs=1", "train.batch_size=64", "train.log_every=1",
       "tracking.wandb=false", "optim.ref_batch=null"]


def make_tree(root: Path, files: list[Path], n: int) -> None:
    """root/train/cNN/ with n entries and root/val/cNN/ with a few, all hard links to `files`."""
    for split, per in (("train", n // CLASSES), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            folder = root / split / f"c{c:02d}"
            folder.mkdir(parents=True)
            for k in range(per):
                os.link(files[(c * 7 + k) % FILES], folder / f"{k:07d}.JPEG")


def build(root: Path, cache: Path) -> None:
    """The index, built ahead in a process of its own (as `alexdist index` does), so the run only loads it."""
    code = ("import sys; from alexdist.config import DataConfig; from alexdist.data.index import build_index; "
            "build_index(DataConfig(source=sys.argv[1], cache_dir=sys.argv[2], workers=2), progress=False)")
    subprocess.run([sys.executable, "-c", code, str(root), str(cache)], cwd=ROOT, check=True)


KINDS = ("index arrays", "batches in shared memory", "heap and anonymous", "code and other files")


def _kind(name: str) -> str:
    if name.endswith(".npy"):
        return KINDS[0]
    if name.startswith(("/dev/shm/", "/memfd:")):  # torch's shared batches (file_descriptor strategy)
        return KINDS[1]
    if not name.startswith("/"):
        return KINDS[2]
    return KINDS[3]


def pss(pid: int) -> dict[str, int]:
    """Bytes of PSS of the process `pid` by kind of mapping (/proc/PID/smaps); {} where it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return {}
    out, kind = dict.fromkeys(KINDS, 0), KINDS[2]
    for line in text.splitlines():
        head = line.split()
        if head and "-" in head[0] and ":" not in head[0]:  # a mapping's first line: range perms offset dev inode name
            kind = _kind(" ".join(head[5:]) if len(head) > 5 else "")
        elif head and head[0] == "Pss:":
            out[kind] += int(head[1]) * 1024
    return out


def group_pss(pid: int) -> tuple[int, list[dict[str, int]]]:
    """Summed PSS of the process and all its descendants (the loader workers), libraries and code left out (their
    pages are shared with whatever else on the machine maps the same files, so their share moves with other
    work), and each one's by kind."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    each = [pss(p.pid) for p in procs]
    return sum(sum(v for k, v in e.items() if k != KINDS[3]) for e in each), each


def steps_done(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def measure(root: Path, cache: Path, run: Path) -> dict:
    """PSS readings of a training run over `root`, after WARMUP steps, then the run is ended."""
    cmd = launch_command(["quickstart", *RUN, f"data.source={root}", f"data.cache_dir={cache}", f"output_dir={run}"],
                         1, "python")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    readings = []
    try:
        while len(readings) < SAMPLES:
            if proc.poll() is not None:
                raise RuntimeError(f"the run ended early:\n{proc.stderr.read()[-3000:]}")
            step = steps_done(run)
            if step >= WARMUP + 3 * len(readings):
                total, each = group_pss(proc.pid)
                readings.append({"step": step, "pss": total, "each": each})
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return {"readings": readings, "pss": sorted(r["pss"] for r in readings)[len(readings) // 2]}


def main() -> None:
    rounds = int(os.environ.get("LOADER_MEMORY_ROUNDS", "2"))
    base = Path(tempfile.mkdtemp(prefix="alexdist-loader-memory-"))
    files = make_files(base / "files")
    res = {"n": N, "classes": CLASSES, "workers": WORKERS, "warmup_steps": WARMUP, "rounds": rounds}
    try:
        for n in (N, 10 * N):
            make_tree(base / f"set-{n}", files, n)
            build(base / f"set-{n}", base / f"cache-{n}")
        for r in range(rounds):  # interleaved, the least of each kept: a busy spell inflates, never deflates
            for n in (N, 10 * N):
                got = measure(base / f"set-{n}", base / f"cache-{n}", base / f"run-{n}-{r}")
                print(n, got["pss"] / 1e6, "MB", flush=True)
                if str(n) not in res or got["pss"] < res[str(n)]["pss"]:
                    res[str(n)] = got
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)
    small, large = res[str(N)]["pss"], res[str(10 * N)]["pss"]
    res["bytes_per_sample"] = (large - small) / (9 * N)
    write("loader_memory", res, report(res), "nice -n 10 .venv/bin/python benchmarks/loader_memory.py")


def _median(res: dict, n: int) -> dict:
    readings = sorted(res[str(n)]["readings"], key=lambda r: r["pss"])
    return readings[len(readings) // 2]


def report(res: dict) -> list[str]:
    mb, big = 1e6, 10 * N
    rows = []
    for n in (N, big):
        each = _median(res, n)["each"]
        rows.append(f"| {n:,} | {res[str(n)]['pss'] / mb:.1f} MB | "
                    f"{' + '.join(f'{sum(e.values()) / mb:.1f}' for e in each)} | "
                    + " | ".join(f"{sum(e[k] for e in each) / mb:.1f}" for k in KINDS) + " |")
    per = [(k, (sum(e[k] for e in _median(res, big)["each"]) - sum(e[k] for e in _median(res, N)["each"])) / (9 * N))
           for k in KINDS]
    return [f"`alexdist train` (quickstart, 1 process, {WORKERS} loader workers, data.loader=stream) over image "
            f"folders of N = {N:,} and 10 N = {big:,} training entries (hard links to {FILES:,} small JPEGs, "
            f"{CLASSES} classes), the index built ahead. PSS summed over the trainer and its workers, the median of "
            f"{SAMPLES} readings taken every 3 steps from step {WARMUP}; the least of {res['rounds']} runs a size.",
            "",
            "| training entries | summed PSS (without code) | trainer + workers (MB) | " + " | ".join(KINDS)
            + " (MB) |",
            "|---|---|---|" + "---|" * len(KINDS), *rows, "",
            f"**Per added sample: {res['bytes_per_sample']:.1f} B** (goal <= 64 B): "
            + ", ".join(f"{k} {b:.1f} B" for k, b in per) + ".", "",
            "The per-process column counts code too; code and libraries (torch's CUDA libraries, loaded even on a "
            "CPU run) are shared with every process on the machine that maps them, so their share here moves with "
            "other work, not with the set.", ""]


if __name__ == "__main__":
    main()
