"""GPU check: what a CPU cannot show, in one call of at most ~8 minutes on a bare GPU machine.

    bash benchmarks/gpu_check.sh             # on the GPU machine (see gpu_check.sh for the wheels it needs)
    bash benchmarks/gpu_check.sh --cpu       # dry run on a CPU: the same script, tiny runs (CI runs it)

Every row runs in its own process, capped at --row-timeout seconds, and is written to $OUT/gpu_check.{md,jsonl}
as soon as it finishes, so a call cut short still returns what it measured. Rows:
- a bare PyTorch loop and alexdist (recipes/bn.yaml on synthetic CIFAR-sized images, the same batch and number
  of steps) in fp32 (+TF32), bf16 and fp16, with channels_last and with torch.compile; img/s of the second of
  two epochs (warm-up and compilation fall in the first), peak GPU memory, ratio to the bare loop;
- DeepSpeed ZeRO-2 in fp16 and bf16; FSDP2 (fully_shard, bf16 policy, DCP checkpoint); DDP with a real
  process group (torchrun with one process: its type and backend are shown; Accelerate's non-distributed mode
  would say NO);
- probes run in-process on alexdist's own loop: host syncs per optimizer step (torch.cuda.set_sync_debug_mode),
  an fp16 overflow (skipped, the schedule not advanced, the scale lowered); and a NaN loss from step 3 on under
  fp16 (skipped, then the divergence stop with exit 6);
- the headline: seconds per CIFAR-sized epoch (50,000 images + evaluation of 10,000) of the bn recipe in its
  fastest setting.
The error column shows the `alexdist: error:` line, or the Python exception, never the launcher's wrapper.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alexdist.distributed.launcher import free_port, launch_command  # noqa: E402 (after the sys.path line)
from alexdist.distributed.processes import run_bounded  # noqa: E402

ZERO2 = "recipes/accelerate/zero2.yaml"


@dataclass
class Setting:
    """The sizes a check runs at: the real ones on a GPU, tiny ones for the CPU dry run."""

    device: str
    batch: int
    width: float
    steps: int  # optimizer steps per epoch (two epochs are run)
    precisions: list[str]
    epoch_images: int  # the headline epoch
    test_images: int


GPU = Setting("cuda", 128, 1.0, 120, ["no", "bf16", "fp16"], 50_000, 10_000)
CPU = Setting("cpu", 16, 0.25, 6, ["no"], 512, 128)


@dataclass
class Row:
    name: str
    kind: str  # bare | train | probe | headline
    precision: str = "no"
    options: list[str] = field(default_factory=list)
    launcher: str = "accelerate1"
    config_file: str | None = None
    needs_cuda: bool = False
    env: dict[str, str] = field(default_factory=dict)
    expect_exit: int = 0
    needs_deepspeed: bool = False


def plan(s: Setting) -> list[Row]:
    """The rows, most important first (a call that runs out of time loses the last ones)."""
    cuda = s.device == "cuda"
    fast = ["speed.channels_last=true", "speed.compile=true"] if cuda else ["speed.channels_last=true"]
    half = "bf16" if cuda else "no"
    fsdp = ["distributed.strategy=fsdp"]
    rows = [
        Row("ceiling: matmul throughput of this device", "ceiling", half),
        Row(f"bare loop {half}", "bare", half), Row(f"alexdist {half}", "train", half),
        Row("headline: one CIFAR-sized epoch, fastest setting", "headline", half, fast),
        # Host syncs per optimizer step and per evaluation, each strategy in a real process group of one.
        Row("host syncs, DDP", "probe:syncs", half, ["distributed.strategy=ddp"], launcher="torchrun"),
        Row("host syncs, FSDP2", "probe:syncs", half, fsdp, launcher="torchrun"),
        Row("host syncs, ZeRO-2", "probe:syncs", half, ["distributed.strategy=deepspeed"], launcher="torchrun",
            needs_deepspeed=True),
        Row("fp16 overflow at step 1: skipped, momentum zero, then trains", "probe:overflow_first", "fp16",
            needs_cuda=True),
        Row("fp16 overflow after a step: skipped, scale lowered", "probe:overflow", "fp16", needs_cuda=True),
        Row("NaN loss from step 3: skipped, then exit 6", "train", "fp16" if cuda else "no",
            ["train.max_bad_steps=3"], launcher="python", env={"ALEXDIST_FAULT": "nan:3-"}, expect_exit=6),
        Row("ZeRO-2 AdamW: 2 CPU ranks -> 1 device, universal checkpoint", "probe:universal", half,
            launcher="torchrun", needs_deepspeed=True),
        Row("ZeRO-2 fp16", "train", "fp16", config_file=ZERO2, needs_cuda=True, needs_deepspeed=True),
        Row(f"ZeRO-2 {half}", "train", half, config_file=ZERO2, needs_deepspeed=True),
        # `accelerate launch --num_processes 1` gives Accelerate's non-distributed mode and `--multi_gpu` wants 2
        # processes: torchrun with one process forms a real group (NCCL on a GPU) and DDP wraps the model.
        Row(f"DDP, real process group, {half}", "train", half, launcher="torchrun"),
        # FSDP2 needs a process group (a group of one still shards, with whole shards, and writes DCP checkpoints).
        Row(f"FSDP2 {half}, real process group", "train", half, fsdp, launcher="torchrun"),
        Row(f"FSDP2 {half} channels_last (contiguous parameters)", "train", half,
            fsdp + ["speed.channels_last=true"], launcher="torchrun"),
    ]
    for p in s.precisions:
        if p != half:
            rows += [Row(f"bare loop {p}", "bare", p), Row(f"alexdist {p}", "train", p)]
    rows += [Row(f"alexdist {half} channels_last", "train", half, ["speed.channels_last=true"]),
             Row(f"alexdist {half} compile", "train", half, ["speed.compile=true"], needs_cuda=not cuda),
             Row(f"alexdist {half} channels_last+compile", "train", half, fast, needs_cuda=not cuda)]
    return rows


# -- running one row ---------------------------------------------------------------------------------------

def error_line(stderr: str) -> str:
    """What went wrong, as the user would want it: alexdist's one line, else the Python exception's last line
    (not torchrun's ChildFailedError wrapper), else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    ours = [line for line in lines if "alexdist: error:" in line]
    if ours:
        return ours[0][ours[0].index("alexdist: error:"):]
    wrapper = re.compile(r"ChildFailedError|CalledProcessError|elastic|subprocess|launch\.py")
    exc = [line for line in lines if re.match(r"^(\[rank\d+\]:\s*)?[\w.]+(Error|Exception)\b", line)
           and not wrapper.search(line)]
    return (exc[-1] if exc else lines[-1] if lines else "no output")[:300]


# The bn recipe with SGD (its LARS has no fused kernel and no DeepSpeed path): the check measures the framework
# against a bare loop with the same fused SGD, and runs every strategy.
SGD = ["optim.name=sgd", "optim.lr=0.1", "optim.lr_scaling=none"]


def _recipe_args(s: Setting, row: Row, out: Path, epoch_images: int | None = None, test_images: int = 0) -> list[str]:
    return ["bn", *SGD, "data.source=synthetic", f"data.synthetic_train={epoch_images or s.batch * s.steps}",
            f"data.synthetic_test={test_images or 4 * s.batch}", "train.epochs=2", f"train.batch_size={s.batch}",
            f"model.width_mult={s.width}", f"precision={row.precision}", "checkpoint.at_epoch_end=false",
            "train.log_every=0", "tracking.wandb=false", f"output_dir={out}", *row.options]


def run_train(s: Setting, row: Row, env: dict, timeout: int, headline: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        args = _recipe_args(s, row, out, s.epoch_images if headline else None, s.test_images if headline else 0)
        cmd = launch_command(args, 1, row.launcher, row.config_file)
        proc = run_bounded(cmd, timeout, cwd=ROOT, env={**env, **row.env})
        result = {"exit": proc.returncode}
        if proc.returncode != row.expect_exit:
            return {**result, "error": error_line(proc.stderr)}
        events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        if row.expect_exit:
            bad = [e["step"] for e in events if e["event"] == "bad_step"]
            return {**result, "ok": bad == [3, 4, 5], "bad_steps": bad, "message": error_line(proc.stderr)}
        summary = json.loads((out / "summary.json").read_text())
        train = [e for e in events if e["event"] == "train"]
        tests = [e for e in events if e["event"] == "test"]
        result.update(images_per_s=train[-1]["images_per_s"], loss=train[-1]["loss"],
                      peak_memory_gib=(summary.get("peak_memory_bytes") or 0) / 2**30,
                      distributed_type=summary["distributed_type"], backend=summary.get("backend"))
        if headline:  # the second epoch, evaluation included: from one test event to the next
            result["epoch_s"] = tests[-1]["time"] - tests[-2]["time"]
            result["train_s"] = train[-1]["epoch_time_s"]
        return result


def bare(s: Setting, precision: str) -> dict:
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
    x = torch.randn(s.batch, 3, 32, 32, device=s.device)
    y = torch.randint(0, 10, (s.batch,), device=s.device)
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


def run_child(s: Setting, row: Row, env: dict, timeout: int) -> dict:
    """A bare loop or a probe, in a process of its own (a crash or a hang stays in its row); under torchrun with
    one process when the row asks for a real process group."""
    args = [__file__, "--child", row.kind, "--precision", row.precision, *(["--cpu"] if s.device == "cpu" else []),
            *[f"--option={o}" for o in row.options]]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
              str(free_port())] if row.launcher == "torchrun" else [sys.executable]
    proc = run_bounded([*launch, *args], timeout, cwd=ROOT, env=env)
    if proc.returncode != 0:
        return {"exit": proc.returncode, "error": error_line(proc.stderr)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ceiling(s: Setting, precision: str) -> dict:
    """The device's matmul throughput (TFLOP/s) in bf16 and fp32 (TF32 on CUDA): what a training step could reach."""
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


def training_tflop(s: Setting, images: int) -> float:
    """Training FLOP for `images` images of the bn recipe's model: 3 x the forward (backward ~2x forward)."""
    from alexdist.models import build_model, flops_per_image

    return 3 * flops_per_image(build_model("alexnet_bn", 32, width_mult=s.width), 32) * images / 1e12


# -- the probes (in-process on alexdist's own loop) ---------------------------------------------------------

def _probe_run(s: Setting, precision: str, tmp: str, options: list[str] = (), out: str | None = None):
    from alexdist.config import load_recipe
    from alexdist.training.evaluation import EpochMeter
    from alexdist.training.setup import setup

    os.environ["ALEXDIST_CACHE"] = tmp
    recipe = load_recipe("bn", [*SGD, "data.source=synthetic", f"data.synthetic_train={s.batch * 16}",
                                f"data.synthetic_test={s.batch}", f"train.batch_size={s.batch}",
                                f"model.width_mult={s.width}", f"precision={precision}", "tracking.wandb=false",
                                "train.log_every=0", f"output_dir={out or tmp + '/run'}", *options])
    run = setup(recipe)
    run.meter = EpochMeter(run.accelerator.device)
    return run


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


def probe_overflow(s: Setting, precision: str = "fp16", options: list[str] = ()) -> dict:
    """An fp16 step whose scaled gradients overflow: skipped, the schedule not advanced, the scale halved."""
    import torch

    from alexdist.training.loop import record_step, train_step

    with tempfile.TemporaryDirectory() as tmp:
        run = _probe_run(s, "fp16", tmp)
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


def probe_overflow_first(s: Setting, precision: str = "fp16", options: list[str] = ()) -> dict:
    """fp16's first step overflows (the fused SGD kernel is handed found_inf before any momentum exists): the
    momentum must start at zero, not from uninitialised memory, and the next steps must train normally."""
    import torch

    from alexdist.training.loop import record_step, train_step

    with tempfile.TemporaryDirectory() as tmp:
        run = _probe_run(s, "fp16", tmp)
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


def probe_universal(s: Setting, precision: str, options: list[str] = ()) -> dict:
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
        args = _recipe_args(s, Row("u", "train", "no", common + ["train.max_steps=2"]), Path(out))
        saved = run_bounded(launch_command(args, 2, "accelerate"), 300, cwd=ROOT, env=env)
        if saved.returncode:
            return {"ok": False, "error": "2-rank save: " + error_line(saved.stderr)}
        run = _probe_run(s, precision, tmp, common + ["train.epochs=2", "train.log_every=0"], out=out)
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


# -- the table ---------------------------------------------------------------------------------------------

def fmt(row: Row, r: dict, bare_ips: dict[str, float]) -> str:
    if r.get("skipped"):
        return f"| {row.name} | skipped: {r['skipped']} | | | | |"
    if "error" in r:
        return f"| {row.name} | failed (exit {r.get('exit')}): {r['error'].replace('|', '/')} | | | | |"
    if "images_per_s" in r:
        base = bare_ips.get(row.precision)
        ratio = "1.00" if row.kind == "bare" else (f"{r['images_per_s'] / base:.2f}" if base else "")
        extra = f"{r['epoch_s']:.2f} s per epoch ({r['train_s']:.2f} s training)" if "epoch_s" in r else ""
        if r.get("achieved_tflop_per_s"):
            extra += f"; {r['achieved_tflop_per_s']} TFLOP/s = {r.get('of_matmul')} of the matmul ceiling"
        if r.get("distributed_type"):
            extra += f" {r['distributed_type'].split('.')[-1]}{'/' + r['backend'] if r.get('backend') else ''}"
        return (f"| {row.name} | {r['images_per_s']:,.0f} img/s | {ratio} | {r['peak_memory_gib']:.2f} | "
                f"{r.get('loss', float('nan')):.3f} | {extra.strip()} |")
    detail = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("ok", "exit"))
    return f"| {row.name} | {'pass' if r.get('ok') else 'FAIL'} | | | | {detail.replace('|', '/')} |"


def write(out: Path, head: list[str], lines: list[str], records: list[dict]) -> None:
    (out / "gpu_check.md").write_text("\n".join(head + lines) + "\n")
    (out / "gpu_check.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def half_precision(s: Setting) -> bool:
    return s.device == "cuda"  # the fastest setting runs in bf16 on a GPU, fp32 on the CPU dry run


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    ap.add_argument("--cpu", action="store_true", help="dry run on a CPU: tiny runs, CUDA-only rows skipped")
    ap.add_argument("--budget", type=int, default=450, help="seconds for all rows together")
    ap.add_argument("--row-timeout", type=int, default=120)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="no", help=argparse.SUPPRESS)
    ap.add_argument("--option", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--only", help="run only the rows whose name contains this (a rerun of one row)")
    ap.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed rows (DeepSpeed not installed)")
    args = ap.parse_args()
    import torch

    s = CPU if args.cpu else GPU
    if args.child:
        probes = {"probe:syncs": probe_syncs, "probe:overflow": probe_overflow, "probe:universal": probe_universal,
                  "probe:overflow_first": probe_overflow_first}
        if args.child in probes:
            result = probes[args.child](s, args.precision, args.option)
        else:
            result = {"bare": bare, "ceiling": ceiling}[args.child](s, args.precision)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result), flush=True)
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --cpu for a dry run", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    if args.cpu:
        env.setdefault("OMP_NUM_THREADS", "1")  # every row alike on a small CPU
    env.update(WANDB_MODE="disabled", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               ALEXDIST_CACHE=str(Path(tempfile.gettempdir()) / "alexdist-gpu-check-cache"),
               PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
    device = torch.cuda.get_device_name(0) if s.device == "cuda" else f"CPU dry run ({os.cpu_count()} cores)"
    head = [f"# GPU check: {device}", "",
            f"torch {torch.__version__}; alexnet_bn x{s.width} (recipes/bn.yaml), batch {s.batch}, 2 epochs of "
            f"{s.steps} steps on synthetic 32 px images; img/s of the second epoch. Precision `no` is fp32 (+TF32 "
            "on CUDA). Ratio: alexdist / bare loop in the same precision.", "",
            "| row | result | ratio to bare | peak GiB | loss | notes |", "|---|---|---|---|---|---|"]
    lines, records, bare_ips, t_start, peak = [], [], {}, time.time(), None
    for row in [r for r in plan(s) if not args.only or args.only in r.name]:
        left = args.budget - (time.time() - t_start)
        if row.needs_cuda and s.device != "cuda":
            r = {"skipped": "needs CUDA"}
        elif row.needs_deepspeed and args.no_deepspeed:
            r = {"skipped": "DeepSpeed not installed (no wheel carried)"}
        elif left < 20:
            r = {"skipped": f"out of time (budget {args.budget} s)"}
        else:
            timeout = int(min(args.row_timeout * (2 if row.kind == "headline" else 1), left))
            try:
                if row.kind in ("train", "headline"):
                    r = run_train(s, row, env, timeout, headline=row.kind == "headline")
                else:
                    r = run_child(s, row, env, timeout)
            except subprocess.TimeoutExpired:
                r = {"error": f"did not finish in {timeout} s"}
        if row.kind == "bare" and "images_per_s" in r:
            bare_ips[row.precision] = r["images_per_s"]
        if row.kind == "ceiling" and "bf16_tflop_per_s" in r:
            peak = r["bf16_tflop_per_s" if half_precision(s) else "fp32_tflop_per_s"]
        if row.kind == "headline" and "train_s" in r:
            tflop = training_tflop(s, s.epoch_images)
            r["epoch_tflop"] = round(tflop, 2)
            r["achieved_tflop_per_s"] = round(tflop / r["train_s"], 2)
            r["of_matmul"] = round(r["achieved_tflop_per_s"] / peak, 3) if peak else None
        records.append({"row": row.name, "precision": row.precision, "options": row.options, **r})
        lines.append(fmt(row, r, bare_ips))
        print(lines[-1], flush=True)
        write(out, head, lines, records)
    failed = [r for r in records if "error" in r or r.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    from alexdist.distributed.collectives import exit_now

    exit_now(main())  # a probe's gloo group can abort at interpreter exit (pytorch#190489)
