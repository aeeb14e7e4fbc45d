"""What the GPU check measures in a process of its own (gpu_runners.child runs `gpu_check.py --child NAME`,
NAME a function here): the device's matmul ceiling, a bare PyTorch loop, and probes on alexdist's own loop
(host syncs, fp16 overflows, a universal-checkpoint resume, collectives per step, LARS under FSDP2,
SyncBatchNorm). Each takes (setting, precision, options) and returns its result as a dict, `ok` for a check.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from common import ROOT, error_line
from gpu_runners import SGD, recipe_args

from alexdist.distributed.launcher import launch_command
from alexdist.distributed.processes import run_bounded

if TYPE_CHECKING:
    from gpu_plan import Setting


def ceiling(s: Setting, precision: str, options: list[str]) -> dict:
    """The device's matmul throughput (TFLOP/s) in bf16 and fp32 (TF32 on CUDA): what a training step could
    reach (the headline row compares its own rate with the row's `precision`)."""
    import torch

    n = 8192 if s.device == "cuda" else 1024
    sync = torch.cuda.synchronize if s.device == "cuda" else (lambda: None)
    torch.backends.cuda.matmul.allow_tf32 = True
    out = {"ok": True}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(n, n, device=s.device, dtype=dtype)
        b = torch.randn(n, n, device=s.device, dtype=dtype)
        a @ b
        sync()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_tflop_per_s"] = round(2 * n**3 / best / 1e12, 2)
    return out



def bare_loop(s: Setting, precision: str, options: list[str]) -> dict:
    """A hand-written loop with the same model, batch, optimizer kernel and precision, two epochs' steps."""
    import torch
    import torch.nn.functional as F

    from alexdist.models import build_model
    from alexdist.training.optim import kernel_kwargs

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # alexdist's default
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = build_model("alexnet_bn", 32, dropout=0.5, width_mult=s.width).to(s.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          **kernel_kwargs("auto", s.device))
    scaler = torch.amp.GradScaler(s.device, enabled=precision == "fp16")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    x, y = torch.randn(s.batch, 3, 32, 32, device=s.device), torch.randint(0, 10, (s.batch,), device=s.device)
    sync = torch.cuda.synchronize if s.device == "cuda" else (lambda: None)
    t0 = 0.0
    for i in range(2 * s.steps):
        if i == s.steps:  # the first epoch warms up (cuDNN's algorithm search, allocator), the second is timed
            sync()
            t0 = time.perf_counter()
        with torch.autocast(s.device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    sync()
    peak = torch.cuda.max_memory_allocated() / 2**30 if s.device == "cuda" else 0.0
    return {"images_per_s": s.steps * s.batch / (time.perf_counter() - t0), "loss": float(loss),
            "peak_memory_gib": peak}


def _probe_run(s: Setting, precision: str, tmp: str, options: list[str] = (), out: str | None = None):
    from alexdist.config import load_recipe
    from alexdist.training.build_run import build_run

    os.environ["ALEXDIST_CACHE"] = tmp
    recipe = load_recipe("bn", [*SGD, "data.source=synthetic", "data.val_split=null",
                                f"data.synthetic_train={s.batch * 16}", f"data.synthetic_test={s.batch}",
                                f"train.batch_size={s.batch}", f"model.width_mult={s.width}", f"precision={precision}",
                                "tracking.wandb=false", "train.log_every=0", f"output_dir={out or tmp + '/run'}",
                                *options])
    return build_run(recipe)


def _steps(run, batches, n: int) -> None:
    from alexdist.training.loop import record_step, train_step

    for _ in range(n):
        record_step(run, train_step(run, next(batches), run.state.global_step + 1), 0)


def probe_syncs(s: Setting, precision: str, options: list[str]) -> dict:
    """Host syncs per optimizer step and per evaluation, after 3 warm-up steps: CUDA's sync debug mode on a GPU,
    the CPU counter in the dry run (benchmarks/host_syncs.py)."""
    from host_syncs import count_syncs

    from alexdist.training.epoch_end import evaluate_epoch

    with tempfile.TemporaryDirectory() as tmp:
        run = _probe_run(s, precision, tmp, options)
        batches = run.batches.epoch(0)
        _steps(run, batches, 3)
        steps = 8
        syncs = count_syncs(lambda: _steps(run, batches, steps))
        ev = count_syncs(lambda: evaluate_epoch(run))
        return {"ok": True, "strategy": run.strategy.name, "syncs_per_step": len(syncs) / steps,
                "syncs_per_evaluation": len(ev), "first": syncs[:3]}


def probe_overflow(s: Setting, precision: str, options: list[str]) -> dict:
    """An fp16 step whose scaled gradients overflow: skipped, the schedule not advanced, the scale halved."""
    import torch

    from alexdist.training.loop import record_step, train_step

    with tempfile.TemporaryDirectory() as tmp:
        run = _probe_run(s, precision, tmp, options)
        batches = run.batches.epoch(0)
        record_step(run, train_step(run, next(batches), 1), 0)  # a normal step first
        run.accelerator.scaler.update(new_scale=2.0**60)
        before = [p.detach().clone() for p in run.model.parameters()]
        epoch_before = run.scheduler.scheduler.last_epoch
        result = train_step(run, next(batches), 2)
        record_step(run, result, 0)
        unchanged = all(torch.equal(a, p) for a, p in zip(before, run.model.parameters(), strict=True))
        checks = {"skipped": bool(result.bad), "weights unchanged": unchanged,
                  "schedule not advanced": run.scheduler.scheduler.last_epoch == epoch_before,
                  "scale lowered": run.accelerator.scaler.get_scale() < 2.0**60,
                  "fused optimizer": bool(run.optimizer.optimizer.defaults.get("fused"))}
        return {"ok": all(checks.values()), **checks}


def probe_overflow_first(s: Setting, precision: str, options: list[str]) -> dict:
    """fp16's first step overflows (the fused SGD kernel is handed found_inf before any momentum exists): the
    momentum must start at zero, not from uninitialised memory, and the next steps must train normally."""
    import torch

    from alexdist.training.loop import record_step, train_step

    with tempfile.TemporaryDirectory() as tmp:
        run = _probe_run(s, precision, tmp, options)
        batches = run.batches.epoch(0)
        run.accelerator.scaler.update(new_scale=2.0**60)
        result = train_step(run, next(batches), 1)
        record_step(run, result, 0)
        opt = run.optimizer.optimizer
        momentum = [opt.state[p].get("momentum_buffer") for g in opt.param_groups for p in g["params"]]
        zero = all(m is not None and not m.any() for m in momentum)
        run.accelerator.scaler.update(new_scale=2.0**10)
        _steps(run, batches, 3)
        finite = all(torch.isfinite(p).all() for p in run.model.parameters())
        finite_m = all(torch.isfinite(opt.state[p]["momentum_buffer"]).all() for g in opt.param_groups
                       for p in g["params"])
        checks = {"first step skipped": bool(result.bad), "momentum zero after the skip": zero,
                  "weights finite after 3 more steps": bool(finite), "momentum finite": bool(finite_m),
                  "fused optimizer": bool(opt.defaults.get("fused"))}
        return {"ok": all(checks.values()), **checks}


def probe_universal(s: Setting, precision: str, options: list[str]) -> dict:
    """ZeRO-2 with AdamW saved by 2 CPU ranks, resumed on this one device through the universal checkpoint:
    every `step` tensor of a fused/capturable optimizer must be on its parameter's device (the fused CUDA Adam
    reads it through a device pointer), and training must go on with finite losses."""
    import torch

    from alexdist.training.loop import record_step, train_step

    common = ["optim.name=adamw", "optim.lr=1e-3", "distributed.strategy=deepspeed",
              "distributed.deepspeed.zero_stage=2",
              f"train.global_batch={2 * s.batch}", "checkpoint.every_steps=2",
              f"data.synthetic_train={s.batch * 16}", f"data.synthetic_test={s.batch}"]
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/run"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ALEXDIST_CACHE": tmp}
        env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        args = recipe_args(s, "no", [*common, *options, "train.max_steps=2"], Path(out))
        saved = run_bounded(launch_command(args, 2, "accelerate"), 300, cwd=ROOT, env=env)
        if saved.returncode:
            return {"ok": False, "error": "2-rank save: " + error_line(saved.stderr)}
        run = _probe_run(s, precision, tmp, [*common, *options, "train.epochs=2"], out=out)
        opt = run.optimizer.optimizer.optimizer  # Accelerate's wrapper -> ZeRO's optimizer -> torch's AdamW
        placed = [(str(st["step"].device), str(p.device), str(st["step"].dtype))
                  for g in opt.param_groups if g.get("fused") or g.get("capturable")
                  for p in g["params"] for st in [opt.state[p]] if "step" in st]
        batches = run.batches.epoch(run.state.epoch, start_step=run.state.step_in_epoch)
        losses = []
        for _ in range(2):
            result = train_step(run, next(batches), run.state.global_step + 1)
            record_step(run, result, run.state.epoch)
            losses.append(float(result.loss))
        checks = {"resumed at step 2": run.state.global_step == 4 and run.resumed_from is not None,
                  "step tensors on their parameter's device": all(a == b for a, b, _ in placed),
                  "step tensors float32": all(d == "torch.float32" for _, _, d in placed),
                  "losses finite": all(torch.isfinite(torch.tensor(losses)))}
        return {"ok": all(checks.values()), **checks, "fused_groups": len(placed), "losses": losses}


def _count_collectives(fn) -> dict[str, int]:
    """The collectives `fn` issues, by op, counted by torch.profiler: c10d's ops (`c10d::allreduce_`,
    `_c10d_functional::all_reduce`, ...) on any backend, not the backend's own kernels beneath them."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith(("c10d::", "_c10d_functional::"))}


def _per_step(counts: dict[str, int], steps: int, word: str) -> float:
    return sum(v for k, v in counts.items() if word in k.replace("_", "")) / steps


def probe_collectives(s: Setting, precision: str, options: list[str]) -> dict:
    """Collectives per optimizer step on 2 processes (ZeRO-2 with accumulation): no buffer broadcast in a step
    (rank 0's BatchNorm statistics are broadcast once per save and per evaluation, coalesced)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = _probe_run(s, precision, tmp, [*options, f"data.synthetic_train={s.batch * 64}"])
        batches = run.batches.epoch(0)
        _steps(run, batches, 2)
        counts = _count_collectives(lambda: _steps(run, batches, 4))
    broadcasts = _per_step(counts, 4, "broadcast")
    return {"ok": broadcasts == 0, "broadcasts_per_step": broadcasts, "per_step": {k: v / 4 for k, v in counts.items()}}


def probe_lars_fsdp(s: Setting, precision: str, options: list[str]) -> dict:
    """LARS under FSDP2 on 2 processes: all-reduces per optimizer step with alexdist's ShardedLars (every tensor's
    norm in one) against timm's own Lars on the same run (the control: one per DTensor norm)."""
    from timm.optim import Lars

    with tempfile.TemporaryDirectory() as tmp:
        run = _probe_run(s, precision, tmp, [*options, "optim.name=lars", "optim.lr=1.0"])
        batches = run.batches.epoch(0)
        _steps(run, batches, 2)
        sharded = _per_step(_count_collectives(lambda: _steps(run, batches, 2)), 2, "allreduce")
        name = type(run.optimizer).__name__
        run.optimizer = Lars([dict(g) for g in run.optimizer.param_groups])  # timm's own, on the same parameters
        timm = _per_step(_count_collectives(lambda: _steps(run, batches, 2)), 2, "allreduce")
    return {"ok": name == "ShardedLars" and sharded + 10 < timm, "optimizer": name,
            "all_reduces_per_step": sharded, "with_timms_lars": timm}


def probe_sync_bn(s: Setting, precision: str, options: list[str]) -> dict:
    """SyncBatchNorm against plain DDP at the same global batch on 2 GPUs: img/s of each, their losses, and the
    running statistics equal on both ranks without any broadcast (SyncBatchNorm computes them on the global
    batch)."""
    import os
    import time

    import torch

    out = {}
    for name, extra in (("ddp", []), ("sync_bn", ["model.sync_bn=true"])):
        with tempfile.TemporaryDirectory() as tmp:
            run = _probe_run(s, precision, tmp, [*options, *extra])
            batches = run.batches.epoch(0)
            _steps(run, batches, 2)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            _steps(run, batches, 6)
            torch.cuda.synchronize()
            stats = torch.cat([b.float().flatten() for b in run.model.module.buffers() if b.is_floating_point()])
            gathered = run.accelerator.gather(stats[None])
            out[name] = {"images_per_s": 6 * run.batches.effective_batch / (time.perf_counter() - t0),
                         "ranks_agree": bool(torch.equal(gathered[0], gathered[1]))}
    ratio = out["sync_bn"]["images_per_s"] / out["ddp"]["images_per_s"]
    result = {"ok": out["sync_bn"]["ranks_agree"], "speed_ratio_sync_over_ddp": round(ratio, 3), **out}
    return result if int(os.environ.get("RANK", "0")) == 0 else {"ok": True}
