"""GPU check: the bn recipe's training step on one GPU in fp16 and bf16, DDP and DeepSpeed ZeRO-2, with and
without channels_last / torch.compile, against a bare PyTorch loop on the same card. Driven by gpu_check.sh.

    python benchmarks/gpu_check.py --out DIR            # on a GPU machine (a few minutes)
    python benchmarks/gpu_check.py --out DIR --cpu      # dry run on a CPU: the same matrix, tiny, fp32/bf16

Every alexdist run is `python -m alexdist.train recipes/bn.yaml` on synthetic CIFAR-shaped images for a fixed
number of optimizer steps (one epoch, no checkpoint), started with `accelerate launch --num_processes 1`
(ZeRO-2 through recipes/accelerate/zero2.yaml). Images/s are the runs' own (training epoch, evaluation
excluded, first steps and compilation included, as a user would see them over that many steps).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare(precision: str, batch: int, steps: int, width: float, device: str) -> float:
    """A hand-written loop: autocast + GradScaler (fp16) or autocast (bf16), SGD, the same model and batch."""
    import torch
    import torch.nn.functional as F

    from alexdist.models import build_model

    torch.manual_seed(0)
    model = build_model("alexnet_bn", 32, dropout=0.5, width_mult=width).to(device)
    from alexdist.optim import kernel_kwargs

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          **kernel_kwargs("auto", device))  # the same kernel as alexdist's default
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    t0 = None
    for i in range(steps + 1):  # the first half warms up; the second half is timed, as for alexdist
        if i == steps // 2:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return (steps + 1 - steps // 2) * batch / (time.perf_counter() - t0)


def alexdist(precision: str, batch: int, steps: int, width: float, options: list[str], zero: bool, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as out:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
                  "--main_process_port", str(_port())]
        launch += ["--config_file", "recipes/accelerate/zero2.yaml"] if zero else ["--num_machines", "1",
                                                                                 "--dynamo_backend", "no"]
        cmd = launch + ["-m", "alexdist.train", "recipes/bn.yaml", "data.source=synthetic",
                        f"data.synthetic_train={batch * steps}", "data.synthetic_test=1000", "train.epochs=1",
                        f"train.batch_size={batch}", f"model.width_mult={width}", f"precision={precision}",
                        "checkpoint.epoch_end=false", "train.log_every=1", "tracking.wandb=false",
                        f"output_dir={out}", *options]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else f"exit {proc.returncode}"}
        events = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        train = [e for e in events if e["event"] == "train"][-1]
        test = [e for e in events if e["event"] == "test"][-1]
        # Steady state: the second half of the steps (compilation and warm-up fall in the first).
        times = [e["time"] for e in events if e["event"] == "step"]
        half = times[len(times) // 2 :]
        steady = (len(half) - 1) * batch / (half[-1] - half[0]) if len(half) > 1 and half[-1] > half[0] else None
        return {"images_per_s": steady, "epoch_images_per_s": train["images_per_s"], "epoch_s": train["epoch_time_s"],
                "loss": train["loss"], "test_acc": test["acc"], "wall_s": time.time() - t0}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu", action="store_true", help="dry run on a CPU: fp32 + bf16, tiny model, few steps")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    if args.cpu:
        device, precisions, batch, width, steps = "cpu", ["no", "bf16"], 16, 0.25, args.steps or 8
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; use --cpu for a dry run", file=sys.stderr)
            return 2
        device, precisions, batch, width, steps = "cuda", ["fp16", "bf16"], 128, 1.0, args.steps or 150
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update(WANDB_MODE="disabled", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", PYTHONPATH=f"{ROOT}:{env.get('PYTHONPATH', '')}")
    variants = [("ddp", [], False), ("ddp channels_last", ["speed.channels_last=true"], False),
                ("ddp compile", ["speed.compile=true"], False),
                ("ddp channels_last+compile", ["speed.channels_last=true", "speed.compile=true"], False),
                ("zero2", [], True)]
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    results = {"device": device_name, "torch": torch.__version__, "batch": batch, "width_mult": width, "steps": steps,
               "rows": []}
    lines = [f"# GPU check on {device_name}", "", f"alexnet_bn x{width} (recipes/bn.yaml), batch {batch}, {steps} "
             f"steps, synthetic 32 px images; torch {torch.__version__}. img/s over the second half of the steps (warm-up "
             "and compilation excluded); ratio: alexdist / bare loop; epoch (s): the whole epoch, compilation "
             "included.", "",
             "| precision | run | img/s | ratio to bare | epoch (s) | wall (s) | train loss |", "|---|---|---|---|---|---|---|"]
    for precision in precisions:
        b = bare(precision, batch, steps, width, device)
        results["rows"].append({"precision": precision, "run": "bare loop", "images_per_s": b})
        lines.append(f"| {precision} | bare loop | {b:,.0f} | 1.00 | | | |")
        for name, options, zero in variants:
            r = alexdist(precision, batch, steps, width, options, zero, env)
            results["rows"].append({"precision": precision, "run": name, **r})
            if "error" in r:
                lines.append(f"| {precision} | {name} | failed: {r['error']} | | | | |")
            else:
                ips = r["images_per_s"] or r["epoch_images_per_s"]
                lines.append(f"| {precision} | {name} | {ips:,.0f} | {ips / b:.2f} | "
                             f"{r['epoch_s']:.1f} | {r['wall_s']:.0f} | {r['loss']:.3f} |")
            print(lines[-1], flush=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all("error" not in r for r in results["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
