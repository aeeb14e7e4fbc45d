"""Run by test_fsdp.py under `torchrun --nproc_per_node 2`: one optimizer step of 2 micro-batches on a model
sharded by alexdist.distributed.fsdp, reporting after each micro-batch whether the sharded gradients exist yet
(FSDP2 writes them only when it reduce-scatters) and the step's total gradient norm against the same step
unsharded."""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for helpers
from helpers import plain_and_sharded

from alexdist.distributed.collectives import full
from alexdist.distributed.fsdp import FSDP2Strategy

dist.init_process_group("gloo")
rank = dist.get_rank()
plain, model = plain_and_sharded("alexnet_3x3")
g = torch.Generator().manual_seed(1)
x = torch.randn(2, 8, 3, 32, 32, generator=g, dtype=torch.float64)
y = torch.randint(0, 10, (2, 8), generator=g)
report = {"sharded": all(hasattr(p, "device_mesh") for p in model.parameters()), "grads_after_micro": []}
for micro in range(2):
    FSDP2Strategy().set_gradient_sync(model, micro == 1)
    half = slice(rank * 4, rank * 4 + 4)
    (F.cross_entropy(model(x[micro, half]), y[micro, half]) / 2).backward()
    report["grads_after_micro"].append(any(p.grad is not None for p in model.parameters()))
    (F.cross_entropy(plain(x[micro]), y[micro]) / 2).backward()
norm = full(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
report["norm"], report["plain_norm"] = norm.item(), torch.nn.utils.get_total_norm(
    [p.grad for p in plain.parameters()]).item()
if rank == 0:
    print("REPORT " + json.dumps(report), flush=True)
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
