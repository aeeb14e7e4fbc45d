"""Run by test_failure_classification.py under `torchrun --nproc_per_node 2`: a ZeRO-2 run built in this process
reports every process group's timeout before its first optimizer step and after it (when
distributed.step_timeout_s takes over from the setup allowance)."""

import json
import os
import sys

from alexdist.config import load_recipe
from alexdist.distributed.collectives import group_timeouts
from alexdist.distributed.processes import exit_now
from alexdist.training.build_run import build_run
from alexdist.training.evaluation import EpochMeter
from alexdist.training.loop import record_step, train_step

recipe = load_recipe("quickstart", ["distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=2",
                                    "distributed.step_timeout_s=42", "data.source=synthetic",
                                    "data.synthetic_train=256", "data.synthetic_test=32", "tracking.wandb=false",
                                    f"output_dir={sys.argv[1]}"])
run = build_run(recipe)
run.meter = EpochMeter(run.accelerator.device)
before = group_timeouts()
record_step(run, train_step(run, next(run.batches.epoch(0)), 1), 0)
if int(os.environ["RANK"]) == 0:
    print("REPORT " + json.dumps({"before": before, "after": group_timeouts()}), flush=True)
run.accelerator.wait_for_everyone()
exit_now(0)
