"""train.ema_decay: an EMA of the weights evaluated beside the model, in every checkpoint, exactly resumable,
the run's model with train.ema_is_model; refused where ranks hold shards of the weights."""

import subprocess
import sys

import pytest
import torch
from helpers import ROOT, check, comparable_events, error_line, launch, read_jsonl, summary
from safetensors.torch import load_file

EMA = ["train.ema_decay=0.9", "train.ema_is_model=true", "train.epochs=2", "tracking.wandb=false"]


@pytest.mark.parametrize("strategy", [[], ["distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=2"]],
                         ids=["ddp", "zero2"])
def test_a_stopped_and_resumed_ema_run_is_bit_identical_and_its_final_weights_are_the_ema(
        strategy, tmp_path, cache_dir):
    ref, run = tmp_path / "ref", tmp_path / "run"
    check(launch(EMA + strategy + [f"output_dir={ref}"], cache_dir, nproc=2))
    check(launch(EMA + strategy + ["train.max_steps=13", f"output_dir={run}"], cache_dir, nproc=2))
    check(launch(EMA + strategy + [f"output_dir={run}"], cache_dir, nproc=2))
    assert summary(run)["resumed_at_step"] == 13
    want, got = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert all(torch.equal(want[k], got[k]) for k in want)  # the EMA and the BN statistics: bit for bit
    assert comparable_events(run) == comparable_events(ref)
    tests = [e for e in read_jsonl(ref / "metrics.jsonl") if e["event"] == "test"]
    assert all("ema_acc" in e and "ema_loss" in e for e in tests)
    assert summary(ref)["final_test_acc"] == tests[-1]["ema_acc"]  # ema_eval: the EMA is the run's model
    last = sorted((ref / "checkpoints").glob("step-*"))[-1]
    if not strategy:  # DDP checkpoints hold the live weights: the final weights (the EMA) differ from them
        live = load_file(str(last / "model.safetensors"))
        assert any(not torch.equal(live[k], want[k]) for k in want if not k.endswith("num_batches_tracked"))
    out = tmp_path / "export.safetensors"
    subprocess.run([sys.executable, "-m", "alexdist", "export", str(last), str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    exported = load_file(str(out))
    assert all(torch.equal(exported[k], want[k]) for k in want)  # export of an ema_eval checkpoint: the EMA


def test_ema_is_refused_in_one_line_where_ranks_hold_shards_or_16_bit_copies(tmp_path, cache_dir):
    for name, extra in [("FSDP", ["distributed.strategy=fsdp"]),
                        ("ZeRO-3", ["distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=3"]),
                        ("DeepSpeed and precision=bf16", ["distributed.strategy=deepspeed", "precision=bf16"])]:
        proc = launch(EMA + extra + [f"output_dir={tmp_path / name.replace(' ', '_')}"], cache_dir, nproc=2)
        assert f"train.ema_decay is not supported with {name}" in error_line(proc)
