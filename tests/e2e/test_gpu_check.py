"""The GPU check's script, on this CPU: its dry run writes every row of the plan (CUDA-only rows marked
skipped), and its error column shows what went wrong, not the launcher's wrapper."""

import json
import os
import subprocess
import sys
import time

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check


def test_the_error_column_shows_alexdists_line_or_the_exception_not_the_launchers_wrapper():
    ours = "[rank0]: blah\nalexdist: error: training diverged: x\nTraceback...\nChildFailedError: 1\n"
    assert gpu_check.error_line(ours) == "alexdist: error: training diverged: x"
    theirs = ("Traceback (most recent call last):\n  File x\n[rank0]: torch.OutOfMemoryError: CUDA out of memory.\n"
              "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
              "subprocess.CalledProcessError: Command '['python', ...]' returned non-zero exit status 1.\n")
    assert gpu_check.error_line(theirs) == "[rank0]: torch.OutOfMemoryError: CUDA out of memory."


def test_the_dry_run_writes_every_row_of_the_plan(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=2700, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    plan = gpu_check.plan(gpu_check.CPU)
    assert [r["row"] for r in records] == [row.name for row in plan]
    for row, r in zip(plan, records, strict=True):
        if row.needs_cuda:
            assert r["skipped"] == "needs CUDA"
        else:
            assert "error" not in r and "skipped" not in r and r.get("ok", True), r  # none left "out of time"
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("\n| ") == len(plan) + 1  # header + one line per row
    headline = next(r for r in records if r["row"].startswith("headline"))
    assert headline["epoch_s"] > 0 and headline["achieved_tflop_per_s"] > 0


def test_a_row_past_its_time_leaves_no_process_behind_not_even_workers_in_their_own_sessions(tmp_path):
    """torchrun starts each worker in a session of its own: killing the launcher's process group would miss them."""
    import psutil

    from alexdist.distributed.processes import run_bounded

    pids = tmp_path / "pids"
    script = (f"import subprocess, time\n"
              f"kids = [subprocess.Popen(['sleep', '300'], start_new_session=True) for _ in range(2)]\n"
              f"open({str(pids)!r}, 'w').write(' '.join(str(k.pid) for k in kids))\n"
              f"time.sleep(300)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        run_bounded([sys.executable, "-c", script], timeout=3)
    workers = [int(p) for p in pids.read_text().split()]
    assert len(workers) == 2
    time.sleep(0.5)
    alive = [p for p in workers if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"workers left running: {alive}"


def test_without_its_wheels_the_check_stops_at_once_with_one_line(tmp_path):
    """A Python with nothing installed (like the GPU image without pydantic and deepspeed) and no .whl/."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    env = {**os.environ, "PY": str(tmp_path / "bare" / "bin" / "python"), "WHEELS": str(tmp_path / "none"),
           "OUT": str(tmp_path / "out")}
    t0 = time.time()
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert time.time() - t0 < 10
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gpu_check: missing torch (needs >=2.6)") and "pydantic" in last
    assert "bash benchmarks/gpu_wheels.sh" in last and ".whl/ folder" in last


