"""Per-rank memory of DDP vs DeepSpeed ZeRO-1/2/3 vs FSDP2, read from the live engines, and checkpoint cost.

    bash benchmarks/zero_memory.sh    # all five strategies on 2 CPU ranks -> benchmarks/results/zero_memory.{json,md}

One invocation measures one strategy (run it under a launcher with 2 processes):
    accelerate launch --multi_gpu --num_processes 2 benchmarks/zero_memory.py --strategy zero2 --out FILE

Bytes are those of the tensors each rank holds after one optimizer step of alexnet_bn (fp32, SGD momentum):
parameters (ZeRO-3 and FSDP: the rank's partition), gradients (measured after backward, before the step: DDP's
.grad, ZeRO's reduced partitions, FSDP's sharded gradients), and optimizer state (momentum plus ZeRO's fp32
master partitions; FSDP's momentum shards). Storage shared between tensors is counted once. Checkpoint
save/load go through the same Checkpointer as training; the baseline is one safetensors file of the model's
state dict.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _bytes(tensors) -> int:
    from alexdist.distributed.collectives import local

    seen, total = set(), 0
    for t in tensors:
        t = local(t) if torch.is_tensor(t) else t  # an FSDP shard: this rank's part
        if not torch.is_tensor(t) or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _flatten(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _flatten(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _flatten(v)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build(strategy_name: str, workdir: Path):
    """The recipe, strategy, Accelerator, prepared model and optimizer, as training/build_run.py builds them."""
    from alexdist.config import load_recipe
    from alexdist.distributed.accelerator import make_accelerator
    from alexdist.distributed.strategies import resolve_strategy
    from alexdist.models import build_model
    from alexdist.training.optim import make_optimizer

    overrides = ["model.name=alexnet_bn", "data.source=synthetic", "tracking.wandb=false", "train.batch_size=16",
                 "model.dropout=0"]
    if strategy_name == "fsdp":
        overrides += ["distributed.strategy=fsdp"]
    elif strategy_name != "ddp":
        overrides += ["distributed.strategy=deepspeed", f"distributed.deepspeed.zero_stage={strategy_name[-1]}"]
    recipe = load_recipe("recipes/quickstart.yaml", overrides + [f"output_dir={workdir}"])
    strategy = resolve_strategy(recipe)
    acc = make_accelerator(recipe, strategy)
    torch.manual_seed(0)
    model = strategy.shard(build_model("alexnet_bn", 32, 0.0).to(acc.device), recipe)
    optimizer = make_optimizer(model, recipe, 0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model, optimizer, _ = strategy.prepare(acc, model, optimizer, scheduler, recipe)
    return recipe, strategy, acc, model, optimizer


def memory_row(acc, model, optimizer) -> dict[str, int]:
    """This rank's bytes of parameters, gradients (at the moment the optimizer steps) and optimizer state."""
    module = acc.unwrap_model(model)
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper -> torch / DeepSpeed optimizer
    measured = {}

    def grad_tensors():
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        for attr in ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer",
                     "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"):
            grads += list(_flatten(getattr(inner, attr, None)))
        return grads

    # Gradients are measured at the moment the optimizer steps: Accelerate's DeepSpeed backward() runs the
    # engine's step itself, after which ZeRO frees its gradient partitions.
    original_step = inner.step

    def measuring_step(*a, **kw):
        measured["grad_bytes"] = _bytes(grad_tensors())
        return original_step(*a, **kw)

    inner.step = measuring_step
    x = torch.randn(16, 3, 32, 32, device=acc.device)
    y = torch.randint(0, 10, (16,), device=acc.device)
    with acc.accumulate(model):
        acc.backward(F.cross_entropy(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
    inner.step = original_step
    params = [getattr(p, "ds_tensor", p) for p in module.parameters()]
    torch_opt = getattr(inner, "optimizer", inner)  # DeepSpeed's ZeRO optimizer wraps the torch one
    opt_tensors = [s for st in torch_opt.state.values() for s in st.values() if torch.is_tensor(s)]
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        opt_tensors += list(_flatten(getattr(inner, attr, None)))
    return {"params_bytes": _bytes(params), "grad_bytes": measured["grad_bytes"],
            "optimizer_bytes": _bytes(opt_tensors)}


def checkpoint_costs(recipe, strategy, acc, model, optimizer) -> tuple[dict, dict]:
    """Seconds and bytes of a save and a load through the run's own Checkpointer (atomic rename, per-rank files);
    and the final weights (a collective)."""
    from alexdist.checkpoint.checkpointer import Checkpointer
    from alexdist.checkpoint.state import TrainState

    ckpt = Checkpointer(acc, recipe, strategy, model, optimizer, steps_per_epoch=1)
    t0 = time.perf_counter()
    path = ckpt.save(TrainState(global_step=1, world_size=acc.num_processes, strategy=strategy.name,
                                zero_stage=strategy.zero_stage))
    save_s = time.perf_counter() - t0
    acc.wait_for_everyone()
    t0 = time.perf_counter()
    strategy.load_checkpoint(acc, model, optimizer, path, acc.num_processes)
    costs = {"save_s": save_s, "load_s": time.perf_counter() - t0, "bytes": _dir_bytes(path)}
    return costs, strategy.final_weights(acc, model, recipe.precision)


def plain_safetensors_costs(state_dict: dict, workdir: Path) -> dict:
    from safetensors.torch import load_file, save_file

    plain = workdir / "plain.safetensors"
    t0 = time.perf_counter()
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(plain))
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_file(str(plain))
    return {"save_s": save_s, "load_s": time.perf_counter() - t0, "bytes": plain.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=["ddp", "zero1", "zero2", "zero3", "fsdp"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", required=True, help="scratch directory shared by the ranks (removed at the end)")
    args = ap.parse_args()
    from alexdist.distributed.processes import exit_now

    workdir = Path(args.workdir)
    recipe, strategy, acc, model, optimizer = build(args.strategy, workdir)
    row = memory_row(acc, model, optimizer)
    costs, state_dict = checkpoint_costs(recipe, strategy, acc, model, optimizer)
    per_rank = acc.gather(torch.tensor([list(row.values())], dtype=torch.float64, device=acc.device)).tolist()
    if acc.is_main_process:
        result = {"strategy": args.strategy, "world_size": acc.num_processes,
                  "per_rank": [dict(zip(row, r, strict=False)) for r in per_rank], "checkpoint": costs,
                  "plain_safetensors": plain_safetensors_costs(state_dict, workdir)}
        out = Path(args.out)
        data = json.loads(out.read_text()) if out.is_file() else {}
        data[args.strategy] = result
        out.write_text(json.dumps(data, indent=2) + "\n")
        shutil.rmtree(workdir, ignore_errors=True)
    acc.wait_for_everyone()
    exit_now(0)


if __name__ == "__main__":
    main()
