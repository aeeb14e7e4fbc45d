"""One run per run directory, and a damaged checkpoint that does not stop a requeued job."""

from __future__ import annotations

import os
import subprocess

import torch
from helpers import ROOT, check, error_line, launch, launch_command, run_env, summary, wait_for_step
from safetensors.torch import load_file

from alexdist.checkpoint.run_dir import LOCK_FILE, takeover_reason, this_run


def _holder(**kw):
    return {**this_run(), **kw}


def test_a_re_formed_torchelastic_job_takes_over_from_its_earlier_round():
    """torchrun stops every worker of a round before it starts the next: the holder, rank 0 of an earlier round of
    the same job (`--rdzv-id`), is gone even if its host is, and rank 0 may now sit on another host."""
    me = {**this_run(), "elastic_run": "job-7"}
    holder = _holder(host="pod0", elastic_run="job-7")  # fresh: its host went a moment ago
    assert takeover_reason(holder, 1.0, me) == "the same TorchElastic job, re-formed"
    assert takeover_reason(_holder(host="pod0", elastic_run="job-8"), 1.0, me) is None  # another job: no


def test_a_job_submitted_twice_runs_once(tmp_path, cache_dir):
    """The first run is still training when the second starts and is refused (it runs until asked to stop: a run
    with a step cap could end, and free the directory, while the second was still importing on a busy machine)."""
    run = tmp_path / "run"
    args = ["tracking.wandb=false", "train.log_every=1", "train.epochs=200", f"output_dir={run}"]
    first = subprocess.Popen(launch_command(args, nproc=2), cwd=ROOT, env=run_env(cache_dir),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(run, 3)
        second = launch(args, cache_dir)
        (run / "STOP").touch()  # the first stops at the end of its step, checkpointed
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()  # a no-op once it ended; a 200-epoch run must not outlive a failed test
    assert summary(run)["status"] == "stopped", err[-3000:]
    assert second.returncode == 4, second.stderr[-3000:]
    line = error_line(second)
    assert "in use by another run" in line and f"host {os.uname().nodename}" in line
    assert not (run / LOCK_FILE).exists()  # released at the end
    steps = summary(run)["steps"]
    check(launch(args[:-1] + [f"train.max_steps={steps + 2}", f"output_dir={run}"], cache_dir, nproc=2))  # the next
    assert summary(run)["steps"] == steps + 2


def test_resume_auto_skips_a_damaged_newest_checkpoint_and_ends_as_the_uninterrupted_run(tmp_path, cache_dir):
    common = ["tracking.wandb=false", "train.log_every=1", "checkpoint.every_steps=2", "checkpoint.keep=2"]
    whole, run = tmp_path / "whole", tmp_path / "run"
    check(launch(common + ["train.max_steps=10", f"output_dir={whole}"], cache_dir))
    check(launch(common + ["train.max_steps=6", f"output_dir={run}"], cache_dir))
    newest = run / "checkpoints" / "step-0000006"
    shard = newest / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])  # a disk fault after the save
    proc = check(launch(common + ["train.max_steps=10", f"output_dir={run}"], cache_dir))
    warning = [line for line in proc.stderr.splitlines() if line.startswith("alexdist: warning:")]
    assert len(warning) == 1 and "step-0000006 is damaged (model.safetensors has" in warning[0]
    assert "resumed from" in proc.stdout and "step-0000004 at step 4" in proc.stdout
    assert (run / "checkpoints" / ".damaged-step-0000006").is_dir()
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


