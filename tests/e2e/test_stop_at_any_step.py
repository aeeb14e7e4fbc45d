"""A stop request may land at any step, the last one included (Slurm's SIGTERM at the time limit often does): at
the first step, a middle step, an epoch's last step, the train.max_steps step and the run's last step, with
accumulation, the relaunches end where the uninterrupted run ends, with the same weights bit for bit, the same
logged evaluations, and a true summary. The stops are injected at exact steps (ALEXDIST_FAULT=stop:N), not by
racing a file. 2 CPU processes, DDP and FSDP2."""

from __future__ import annotations

import pytest
import torch
from helpers import check, comparable_events, launch, read_jsonl, run_env, summary
from safetensors.torch import load_file

# 2 processes x 16 x accumulation 2 = 64 per step: 22 steps per epoch on the digits, 44 in all. No confusion.png
# (nothing here reads it; drawing it imports matplotlib in every launch that evaluates).
RUN = ["tracking.wandb=false", "train.log_every=1", "train.epochs=2", "train.batch_size=16", "train.grad_accum=2",
       "eval.confusion_png=false"]
EPOCH, CAP, LAST = 22, 30, 44
STRATEGIES = {"ddp": [], "fsdp": ["distributed.strategy=fsdp"]}


def _launch(extra, run, cache_dir, fault=None):
    env = run_env(cache_dir, **({"ALEXDIST_FAULT": fault} if fault else {}))
    return launch(RUN + extra + [f"output_dir={run}"], cache_dir, nproc=2, env=env)


def _stopped_at(proc, run, step):
    assert proc.returncode != 0 and "exitcode  : 75" in proc.stderr, proc.stderr[-3000:]
    assert summary(run)["status"] == "stopped" and summary(run)["steps"] == step


def _finished_despite_the_stop(proc, run, step, status):
    """A stop request during the attempt's last step: the end comes first (exit 0, evaluated, true summary)."""
    check(proc)
    assert "during the last step: finishing the run first" in proc.stdout
    s = summary(run)
    assert (s["status"], s["steps"]) == (status, step) and s["final_test_acc"] is not None


def _same_weights(a_dir, b_dir):
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module", params=list(STRATEGIES))
def reference(request, tmp_path_factory, cache_dir):
    """The uninterrupted run: to train.max_steps, then on to the end (two launches, no stop)."""
    extra = STRATEGIES[request.param]
    run = tmp_path_factory.mktemp(f"stop-{request.param}") / "reference"
    check(_launch(extra + [f"train.max_steps={CAP}"], run, cache_dir))
    check(_launch(extra, run, cache_dir))
    return request.param, extra, run


def test_stops_at_the_first_middle_epoch_end_cap_and_last_step_resume_to_the_uninterrupted_run(
        reference, tmp_path, cache_dir):
    strategy, extra, ref = reference
    run = tmp_path / "stopped"
    rank = "1" if strategy == "fsdp" else "0"  # a request seen by one rank stops both
    fault = ",".join(f"stop:{s}:{rank}" for s in (1, 9, EPOCH, CAP, LAST))
    cap = extra + [f"train.max_steps={CAP}"]
    _stopped_at(_launch(cap, run, cache_dir, fault), run, 1)  # the first step
    _stopped_at(_launch(cap, run, cache_dir, fault), run, 9)  # a middle step
    _stopped_at(_launch(cap, run, cache_dir, fault), run, EPOCH)  # an epoch's last step, before its evaluation
    _finished_despite_the_stop(_launch(cap, run, cache_dir, fault), run, CAP, "max_steps")
    _finished_despite_the_stop(_launch(extra, run, cache_dir, fault), run, LAST, "finished")
    done = summary(run)
    events = len(read_jsonl(run / "metrics.jsonl"))
    for _ in range(2):  # relaunched twice: it ends at once, with the same true summary and no new evaluation
        proc = check(_launch(extra, run, cache_dir, fault))
        assert "done at step 44" in proc.stdout
        s = summary(run)
        assert (s["status"], s["final_test_acc"], s["best_epoch"]) == ("finished", done["final_test_acc"], 2)
    assert [e["event"] for e in read_jsonl(run / "metrics.jsonl")[events:]] == ["start", "start"]
    _same_weights(ref, run)
    assert comparable_events(run) == comparable_events(ref)
    assert summary(run)["final_test_acc"] == summary(ref)["final_test_acc"]


@pytest.mark.parametrize("reference", ["ddp"], indirect=True)  # the checkpointer's record: any strategy's
def test_a_relaunch_that_ends_where_a_checkpoint_was_not_yet_evaluated_evaluates_it_once(
        reference, tmp_path, cache_dir):
    """A stop at step 22 (an epoch's last step) checkpoints before the epoch's evaluation; a relaunch capped at
    that very step owes it: it evaluates, records it in the checkpoint, and a second relaunch does not again."""
    _strategy, extra, ref = reference
    run = tmp_path / "owed"
    _stopped_at(_launch(extra, run, cache_dir, f"stop:{EPOCH}"), run, EPOCH)
    cap = extra + [f"train.max_steps={EPOCH}"]
    check(_launch(cap, run, cache_dir))
    s = summary(run)
    assert (s["status"], s["steps"]) == ("max_steps", EPOCH) and s["final_test_acc"] is not None
    tests = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "test"]
    ref_test = next(e for e in read_jsonl(ref / "metrics.jsonl") if e["event"] == "test")
    assert len(tests) == 1 and tests[0]["acc"] == ref_test["acc"] and tests[0]["step"] == EPOCH
    check(_launch(cap, run, cache_dir))
    assert len([e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "test"]) == 1
    check(_launch(extra, run, cache_dir))  # and on to the end, as the uninterrupted run
    _same_weights(ref, run)
