"""Run by test_fsdp.py under `torchrun --nproc_per_node 2`: LARS on FSDP2's sharded parameters (float64, the
BatchNorm model) against timm's LARS on the same model unsharded, 3 steps; rank 0 reports how far the weights
are apart and how many all-reduces each sharded optimizer step issued (DTensor collectives counted by torch's
CommDebugMode)."""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor.debug import CommDebugMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for helpers
from helpers import plain_and_sharded

from alexdist.config import load_recipe
from alexdist.distributed.collectives import full
from alexdist.models import build_model
from alexdist.training.optim import make_optimizer

dist.init_process_group("gloo")
rank = dist.get_rank()
plain, model = plain_and_sharded("alexnet_bn")
recipe = load_recipe(None, ["optim.name=lars", "optim.lr=2.0", "optim.trust_coeff=0.01",
                            f"optim.trust_clip={sys.argv[1]}"])
opts = make_optimizer(model, recipe, 2.0), make_optimizer(plain, recipe, 2.0)
g = torch.Generator().manual_seed(1)
counts = []
for _ in range(3):
    x, y = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)
    half = slice(rank * 4, rank * 4 + 4)
    F.cross_entropy(model(x[half]), y[half]).backward()
    # The unsharded model sees both halves as two batches of 4 (BatchNorm's statistics per half, as per rank).
    (F.cross_entropy(plain(x[:4]), y[:4]) / 2 + F.cross_entropy(plain(x[4:]), y[4:]) / 2).backward()
    with CommDebugMode() as comm:
        opts[0].step()
    opts[1].step()
    counts.append(comm.get_total_counts())
    for o in opts:
        o.zero_grad(set_to_none=True)
moved = max((full(a.detach()) - b.detach()).abs().max().item()
            for a, b in zip(model.parameters(), plain.parameters(), strict=True))
torch.manual_seed(0)
start = build_model("alexnet_bn", 32, 0.0, 0.25).double()
travel = max((b.detach() - s.detach()).abs().max().item()
             for b, s in zip(plain.parameters(), start.parameters(), strict=True))
if rank == 0:
    print("REPORT " + json.dumps({"optimizer": type(opts[0]).__name__, "max_diff": moved, "travel": travel,
                                  "allreduces_per_step": counts}), flush=True)
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
