"""End-to-end runs through the real launchers (`accelerate launch --multi_gpu`, `torchrun`) on 2 CPU ranks."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import check, launch, read_jsonl, run_env, summary
from safetensors.torch import load_file

from alexdist.models import build_model

pytestmark = pytest.mark.slow

# A BatchNorm-free model (BN statistics depend on the per-process batch), no dropout (its masks depend on the
# rank): the conditions under which 2 ranks x B must equal 1 rank x 2B. Random images, not digits: the digits'
# flat background makes exact ties in max-pool windows, and the last-bit differences between a 16-sample and an
# 8-sample convolution then decide which input gets the gradient (measured: 2e-5 relative after 6 steps on
# digits; in fp64 the two agree to 1e-17).
EQUIV = ["model.name=alexnet_3x3", "model.width_mult=0.25", "model.dropout=0", "train.max_steps=6",
         "optim.lr=0.02", "data.source=synthetic", "data.synthetic_train=2048", "data.synthetic_test=256", "schedule.warmup_frac=0", "tracking.wandb=false", "train.log_every=0"]


def _flat(path):
    sd = load_file(str(path / "model.safetensors"))
    return torch.cat([sd[k].double().flatten() for k in sorted(sd)])


def _rel(a, b):
    return ((a - b).norm() / a.norm()).item()


def _init_weights():
    torch.manual_seed(0)  # train.seed: the initial weights every run starts from
    sd = build_model("alexnet_3x3", 32, 0.0, 0.25).state_dict()
    return torch.cat([sd[k].double().flatten() for k in sorted(sd)])


def assert_same_training(ref, other, name):
    moved = (ref - _init_weights()).norm()
    assert moved / ref.norm() > 1e-4, "training barely moved the weights: the comparison would mean nothing"
    assert _rel(ref, other) < 1e-5, name
    assert (ref - other).norm() < 1e-3 * moved, name  # differences are rounding, not a different update


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("equiv")
    cases = {
        "1x16": dict(nproc=1, extra=["train.batch_size=16"]),
        "2x8": dict(nproc=2, extra=["train.batch_size=8"]),
        "2x4x2acc": dict(nproc=2, extra=["train.batch_size=4", "train.grad_accum=2"]),
        "1x8x2acc": dict(nproc=1, extra=["train.batch_size=8", "train.grad_accum=2"]),
        "torchrun2x8": dict(nproc=2, extra=["train.batch_size=8"], launcher="torchrun"),
    }
    runs = {}
    for name, c in cases.items():
        out = root / name
        proc = launch(EQUIV + c["extra"] + [f"output_dir={out}"], cache_dir, nproc=c["nproc"],
                      launcher=c.get("launcher", "accelerate"))
        check(proc)
        runs[name] = out
    return runs


def test_two_ranks_really_form_one_gloo_group(equivalence_runs):
    for name in ("2x8", "2x4x2acc", "torchrun2x8"):
        s = summary(equivalence_runs[name])
        assert s["world_size"] == 2 and s["distributed_type"] == "DistributedType.MULTI_CPU", name
        assert len(s["rank_param_sums"]) == 2
        assert s["rank_param_sums"][0] == s["rank_param_sums"][1], "ranks drifted apart: no gradient all-reduce"


def test_two_ranks_of_batch_b_equal_one_rank_of_batch_2b(equivalence_runs):
    ref = _flat(equivalence_runs["1x16"])
    for name in ("2x8", "torchrun2x8"):
        assert_same_training(ref, _flat(equivalence_runs[name]), name)


def test_gradient_accumulation_equals_one_larger_step(equivalence_runs):
    ref = _flat(equivalence_runs["1x16"])
    assert_same_training(ref, _flat(equivalence_runs["1x8x2acc"]), "1 rank: 2 x 8 == 1 x 16")
    assert_same_training(ref, _flat(equivalence_runs["2x4x2acc"]), "2 ranks: 2 x (2 x 4) == 1 x 16")


def test_max_steps_caps_training_and_still_ends_with_a_logged_test_evaluation(equivalence_runs):
    run = equivalence_runs["2x8"]
    events = read_jsonl(run / "metrics.jsonl")
    assert events[0]["event"] == "start" and events[0]["effective_batch"] == 16
    assert events[-1]["event"] == "test" and events[-1]["step"] == 6
    assert 0.0 <= events[-1]["acc"] <= 1.0
    s = summary(run)
    assert s["steps"] == 6 and s["final_test_acc"] == events[-1]["acc"]


def test_quickstart_learns_digits_on_two_processes_and_logs_to_wandb_offline(tmp_path, cache_dir):
    out = tmp_path / "qs"
    proc = check(launch([f"output_dir={out}"], cache_dir, nproc=2))
    s = summary(out)
    assert s["world_size"] == 2 and s["effective_batch"] == 64
    assert s["final_test_acc"] >= 0.90, s
    assert s["rank_param_sums"][0] == s["rank_param_sums"][1]
    assert "effective batch 64 = 32 per process x 2 processes x 1 accumulation" in proc.stdout
    config = (out / "config.yaml").read_text()
    assert "source: digits" in config and "name: alexnet_bn" in config
    events = read_jsonl(out / "metrics.jsonl")
    tests = {e["step"]: e for e in events if e["event"] == "test"}
    assert len(tests) == 12

    # What W&B itself recorded offline, read back with W&B's own tool, matches metrics.jsonl.
    run_dirs = list((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    wandb_bin = [sys.executable, "-c", "from wandb.cli.cli import cli; cli()"]
    dump = subprocess.run(wandb_bin + ["leet", "inspect", "--json", str(run_dirs[0])], capture_output=True,
                          text=True, timeout=120, env=run_env(cache_dir))
    assert dump.returncode == 0, dump.stderr
    history = {}
    config_seen = {}
    for line in dump.stdout.splitlines():
        rec = json.loads(line)
        if rec["type"] == "history":
            item = rec["history"]["item"]
            history.setdefault(item["_step"], {}).update(item)
        elif rec["type"] == "config":
            config_seen.update(rec["config"]["update"])
    for step, e in tests.items():
        assert history[step]["test/acc"] == pytest.approx(e["acc"], abs=1e-12)
        assert history[step]["test/loss"] == pytest.approx(e["loss"], abs=1e-12)
    assert config_seen["model.name"] == "alexnet_bn" and config_seen["run.world_size"] == 2


def test_fp16_without_a_gpu_is_refused_with_a_hint(tmp_path, cache_dir):
    proc = launch(["precision=fp16", f"output_dir={tmp_path / 'run'}"], cache_dir)
    assert proc.returncode == 4
    err = [line for line in proc.stderr.splitlines() if line.startswith("alexdist: error:")]
    assert len(err) == 1 and "bf16" in err[0] and "GPU" in err[0]
    assert "Traceback" not in proc.stderr


def test_bad_override_stops_before_any_work_on_every_rank(tmp_path, cache_dir):
    out = tmp_path / "run"
    proc = launch(["train.epochz=3", f"output_dir={out}"], cache_dir, nproc=2)
    assert proc.returncode != 0
    err = [line for line in proc.stderr.splitlines() if line.startswith("alexdist: error:")]
    assert err == ["alexdist: error: unknown key 'train.epochz'; did you mean 'train.epochs'?"]
    assert not out.exists()
