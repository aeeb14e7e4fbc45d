"""Run by test_noise_scale.py under `torchrun --nproc_per_node 2`: DDP (gloo) on a linear regression with Gaussian
noise held at fixed weights, its local gradients seen by the CommHookProbe as in training; rank 0 prints the
estimated noise scale and the closed form."""

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from linear_regression import DECAY, SIGMA, STEPS, D, regression_at, sample

from alexdist.distributed.gradient_probe import CommHookProbe
from alexdist.training.noise_scale import GradientNoiseScale

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
batch = 8
model, truth = regression_at()
ddp = DDP(model)
probe = CommHookProbe(torch.device("cpu"), ddp, batch)
estimate = GradientNoiseScale(batch, batch * world, decay=DECAY)
g = torch.Generator().manual_seed(1000 + rank)  # each rank its own examples
for _ in range(STEPS):
    probe.start_step()
    x, y = sample(batch, g)
    (0.5 * (ddp(x).squeeze(1) - y).square().mean()).backward()
    big_sq = model.weight.grad.square().sum()  # all-reduced: the mean gradient over batch x world examples
    measures = torch.stack([probe.small_sq, big_sq])
    dist.all_reduce(measures)
    estimate.update(*(measures / world).tolist())
    model.weight.grad = None
if rank == 0:
    print("REPORT " + json.dumps({"estimate": estimate.value, "truth": truth, "steps": estimate.steps,
                                  "d": D, "sigma": SIGMA}), flush=True)
# The DDP module's reducer (its communication hook registered) holds the process group: left to the interpreter's
# exit, the group's gloo threads are torn down there and the process aborted ("terminate called without an active
# exception") in 14 of 40 runs on the 2-core AMD EPYC; released first, 0 of 30.
del ddp, probe
gc.collect()
dist.destroy_process_group()
