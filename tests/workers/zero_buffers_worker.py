"""Run by test_zero_buffers.py under `torchrun --nproc_per_node 2`: a ZeRO-2 run of the BatchNorm model built in
this process counts torch.distributed.broadcast calls during its optimizer steps (2 micro-batches each), one
save and one evaluation; rank 0 prints the counts."""

import json
import os
import sys

import torch

from alexdist.config import load_recipe
from alexdist.distributed.processes import exit_now
from alexdist.training.build_run import build_run
from alexdist.training.epoch_end import evaluate_epoch
from alexdist.training.evaluation import EpochMeter
from alexdist.training.loop import record_step, train_step

recipe = load_recipe("quickstart", ["distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=2",
                                    "data.source=synthetic", "data.synthetic_train=512", "data.synthetic_test=64",
                                    "train.batch_size=8", "train.grad_accum=2", "tracking.wandb=false",
                                    f"output_dir={sys.argv[1]}"])
run = build_run(recipe)
run.meter = EpochMeter(run.accelerator.device)
calls = []
real = torch.distributed.broadcast


def counted(tensor, *args, **kwargs):
    calls.append(tensor.numel())
    return real(tensor, *args, **kwargs)


torch.distributed.broadcast = counted
batches = run.batches.epoch(0)
for _ in range(4):
    record_step(run, train_step(run, next(batches), run.state.global_step + 1), 0)
steps, calls[:] = list(calls), []
run.save_if_due(final=True)
save, calls[:] = list(calls), []
evaluate_epoch(run)
evaluation = list(calls)
buffers = sum(b.numel() for b in run.model.module.buffers() if b.is_floating_point())
if int(os.environ["RANK"]) == 0:
    print("REPORT " + json.dumps({"steps": steps, "save": save, "evaluation": evaluation, "buffers": buffers}),
          flush=True)
run.accelerator.wait_for_everyone()
exit_now(0)
