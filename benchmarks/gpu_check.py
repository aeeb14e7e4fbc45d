"""GPU check: what a CPU cannot show, in one run of at most ~8 minutes on a GPU machine.

    bash benchmarks/gpu_check.sh             # on the GPU machine (see gpu_check.sh for the wheels it needs)
    bash benchmarks/gpu_check.sh --cpu       # dry run on a CPU: the same script, tiny runs (CI runs it)

The rows are gpu_plan.py's (each says how it runs and what it must show); gpu_runners.py runs them, gpu_probes.py
holds what runs in a process of its own. Every row runs in its own process, capped at --row-timeout seconds, and
is written to $OUT/gpu_check.{md,jsonl} as soon as it finishes, so a run cut short still has what it measured:
- a bare PyTorch loop and alexdist (recipes/bn.yaml on synthetic CIFAR-sized images, the same batch and number
  of steps) in fp32 (+TF32), bf16 and fp16, with channels_last and with torch.compile; img/s of the second of
  two epochs (warm-up and compilation fall in the first), peak GPU memory, ratio to the bare loop;
- DeepSpeed ZeRO-2 in fp16 and bf16; FSDP2; DDP with a real process group (torchrun with one process);
- probes on alexdist's own loop: host syncs per optimizer step, collectives per step (ZeRO's buffers, LARS under
  FSDP2), SyncBatchNorm against DDP, fp16 overflows, a NaN loss from step 3 (skipped, then exit 6), a ZeRO-2
  universal-checkpoint resume;
- ImageNet-size: images/s per GPU of the imagenet_alexnet_bn_lars recipe at 224 px streamed from disk against
  the same step from memory, and which of the two bounds a step (gpu_check_imagenet.py);
- the headline: seconds per CIFAR-sized epoch (50,000 images + evaluation of 10,000) of the bn recipe in its
  fastest setting, and the share of the device's matmul ceiling it reaches.
The error column shows the `alexdist: error:` line, or the Python exception, never the launcher's wrapper.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import gpu_probes  # noqa: E402 (after the sys.path line)
from common import error_line  # noqa: E402
from gpu_check_imagenet import fmt_imagenet  # noqa: E402
from gpu_plan import CPU, GPU, Row, Setting, plan  # noqa: E402
from gpu_runners import training_tflop  # noqa: E402

__all__ = ["CPU", "GPU", "error_line", "plan"]


def run_row(s: Setting, row: Row, env: dict, left: float, row_timeout: int, no_deepspeed: bool) -> dict:
    """One row's result: skipped (CUDA or DeepSpeed missing, out of time), failed, or what it measured and its
    checks."""
    if row.needs_cuda and s.device != "cuda":
        return {"skipped": "needs CUDA"}
    if row.needs_deepspeed and no_deepspeed:
        return {"skipped": "DeepSpeed not installed (no wheel given)"}
    if left < 20:
        return {"skipped": "out of time"}
    timeout = int(min(row_timeout, left))
    try:
        r = row.run(s, row, env, timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout} s"}
    if row.expect and "error" not in r:
        checks = row.expect(r)
        r = {**r, "ok": all(checks.values()), **checks}
    return r


def fmt(row: Row, r: dict, bare_ips: dict[str, float]) -> str:
    if r.get("skipped"):
        return f"| {row.name} | skipped: {r['skipped']} | | | | |"
    if "error" in r:
        return f"| {row.name} | failed (exit {r.get('exit')}): {r['error'].replace('|', '/')} | | | | |"
    if "stream_images_per_s" in r:
        return fmt_imagenet(row.name, r)
    if "images_per_s" in r:
        base = bare_ips.get(row.precision)
        bare = row.name.startswith("bare loop")
        ratio = "1.00" if bare else (f"{r['images_per_s'] / base:.2f}" if base else "")
        extra = f"{r['epoch_s']:.2f} s per epoch ({r['train_s']:.2f} s training)" if "epoch_s" in r else ""
        if r.get("achieved_tflop_per_s"):
            extra += f"; {r['achieved_tflop_per_s']} TFLOP/s = {r.get('of_matmul')} of the matmul ceiling"
        if r.get("distributed_type"):
            extra += f" {r['distributed_type'].split('.')[-1]}{'/' + r['backend'] if r.get('backend') else ''}"
        return (f"| {row.name} | {r['images_per_s']:,.0f} img/s | {ratio} | {r['peak_memory_gib']:.2f} | "
                f"{r.get('loss', float('nan')):.3f} | {extra.strip()} |")
    detail = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("ok", "exit"))
    return f"| {row.name} | {'pass' if r.get('ok') else 'FAIL'} | | | | {detail.replace('|', '/')} |"


def with_headline_figures(s: Setting, r: dict, ceiling: float | None) -> dict:
    """The headline's training TFLOP/s, and its share of the device's matmul throughput."""
    if "train_s" not in r:
        return r
    tflop = training_tflop(s, s.epoch_images)
    achieved = round(tflop / r["train_s"], 2)
    return {**r, "epoch_tflop": round(tflop, 2), "achieved_tflop_per_s": achieved,
            "of_matmul": round(achieved / ceiling, 3) if ceiling else None}


def child_main(name: str, s: Setting, precision: str, options: list[str]) -> int:
    """`--child NAME`: run gpu_probes.NAME in this process and print its result (rank 0 under torchrun)."""
    result = getattr(gpu_probes, name)(s, precision, options)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)
    return 0


def environment(cpu: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    if cpu:
        env.setdefault("OMP_NUM_THREADS", "1")  # every row alike on a small CPU
    env.update(WANDB_MODE="disabled", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               ALEXDIST_CACHE=str(Path(tempfile.gettempdir()) / "alexdist-gpu-check-cache"),
               PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
    return env


def header(s: Setting) -> list[str]:
    import torch

    device = torch.cuda.get_device_name(0) if s.device == "cuda" else f"CPU dry run ({os.cpu_count()} cores)"
    return [f"# GPU check: {device}", "",
            f"torch {torch.__version__}; alexnet_bn x{s.width} (recipes/bn.yaml), batch {s.batch}, 2 epochs of "
            f"{s.steps} steps on synthetic 32 px images; img/s of the second epoch. Precision `no` is fp32 (+TF32 "
            "on CUDA). Ratio: alexdist / bare loop in the same precision.", "",
            "| row | result | ratio to bare | peak GiB | loss | notes |", "|---|---|---|---|---|---|"]


def run_plan(s: Setting, args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env, head = environment(args.cpu), header(s)
    lines, records, bare_ips, t_start, ceiling = [], [], {}, time.time(), None
    for row in [r for r in plan(s) if not args.only or args.only in r.name]:
        left = args.budget - (time.time() - t_start)
        r = with_headline_figures(s, run_row(s, row, env, left, args.row_timeout, args.no_deepspeed), ceiling)
        if row.name.startswith("bare loop") and "images_per_s" in r:
            bare_ips[row.precision] = r["images_per_s"]
        if row.name.startswith("ceiling") and "bf16_tflop_per_s" in r:
            ceiling = r["bf16_tflop_per_s" if s.half == "bf16" else "fp32_tflop_per_s"]
        records.append({"row": row.name, "precision": row.precision, "options": row.options, **r})
        lines.append(fmt(row, r, bare_ips))
        print(lines[-1], flush=True)
        (out / "gpu_check.md").write_text("\n".join(head + lines) + "\n")
        (out / "gpu_check.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
    return 1 if [x for x in records if "error" in x or x.get("ok") is False] else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    ap.add_argument("--cpu", action="store_true", help="dry run on a CPU: tiny runs, CUDA-only rows skipped")
    # The limits fit the GPU run into a 10-minute slot. The CPU dry run checks that every row works, not how fast:
    # its limits only stop a hang, so a slower or busier machine does not fail it (a ZeRO row took >120 s on 2
    # cores with other jobs running).
    ap.add_argument("--budget", type=int, help="seconds for all rows together (GPU: 450, --cpu: 2400)")
    ap.add_argument("--row-timeout", type=int, help="seconds for one row (GPU: 120, --cpu: 600)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="no", help=argparse.SUPPRESS)
    ap.add_argument("--option", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--only", help="run only the rows whose name contains this (a rerun of one row)")
    ap.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed rows (DeepSpeed not installed)")
    args = ap.parse_args()
    s = CPU if args.cpu else GPU
    args.budget = args.budget or (2400 if args.cpu else 450)
    args.row_timeout = args.row_timeout or (600 if args.cpu else 120)
    if args.child:
        return child_main(args.child, s, args.precision, args.option)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --cpu for a dry run", file=sys.stderr)
        return 2
    return run_plan(s, args)


if __name__ == "__main__":
    from alexdist.distributed.processes import exit_now

    exit_now(main())  # a probe's gloo group can abort at interpreter exit (pytorch#190489)
