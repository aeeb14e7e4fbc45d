"""The GPU check's script, on this CPU: its dry run writes every row of the plan (CUDA-only rows marked
skipped), and its error column shows what went wrong, not the launcher's wrapper."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check


def test_the_error_column_shows_alexdists_line_or_the_exception_not_the_launchers_wrapper():
    ours = "[rank0]: blah\nalexdist: error: training diverged: x\nTraceback...\nChildFailedError: 1\n"
    assert gpu_check.error_line(ours) == "alexdist: error: training diverged: x"
    theirs = ("Traceback (most recent call last):\n  File x\n[rank0]: torch.OutOfMemoryError: CUDA out of memory.\n"
              "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
              "subprocess.CalledProcessError: Command '['python', ...]' returned non-zero exit status 1.\n")
    assert gpu_check.error_line(theirs) == "[rank0]: torch.OutOfMemoryError: CUDA out of memory."


@pytest.mark.slow
def test_the_dry_run_writes_every_row_of_the_plan(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    plan = gpu_check.plan(gpu_check.CPU)
    assert [r["row"] for r in records] == [row.name for row in plan]
    for row, r in zip(plan, records, strict=True):
        if row.needs_cuda:
            assert r["skipped"] == "needs CUDA"
        else:
            assert "error" not in r and r.get("ok", True), r
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("\n| ") == len(plan) + 1  # header + one line per row
    headline = next(r for r in records if r["row"].startswith("headline"))
    assert headline["epoch_s"] > 0 and headline["achieved_tflop_per_s"] > 0
