"""`alexdist compare` on real runs, from run directories and from what W&B itself recorded offline."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, check, launch, launch_command, read_jsonl, run_env, summary, wait_for_step
from PIL import Image

from alexdist.distributed.processes import kill_tree
from alexdist.tracking.compare import STALE_AFTER_S, build_row, from_run_dir, from_wandb_records

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 hex chars, shaped like a W&B API key
BASE = ["train.epochs=3", "train.log_every=5", "tracking.time_to_acc=0.5", "tracking.wandb=true"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """Three short runs of different models/strategies, one run stopped and resumed, one killed."""
    root = tmp_path_factory.mktemp("runs")
    env = run_env(cache_dir, WANDB_API_KEY=FAKE_KEY)  # offline W&B (run_env), with a key in the environment
    specs = {
        "bn-1p": (1, ["model.name=alexnet_bn"]),
        "3x3-2p": (2, ["model.name=alexnet_3x3", "model.dropout=0.2", "data.val_split=0.15"]),  # selects on val
        "alexnet-zero2": (2, ["model.name=alexnet", "model.input_size=32", "distributed.strategy=deepspeed",
                              "distributed.deepspeed.zero_stage=2"]),
    }
    out = {}
    for name, (nproc, extra) in specs.items():
        check(launch(BASE + extra + [f"output_dir={root / name}"], cache_dir, nproc=nproc, env=env))
        out[name] = root / name
    resumed = root / "bn-resumed"
    check(launch(BASE + ["train.max_steps=30", f"output_dir={resumed}"], cache_dir, nproc=2, env=env))
    check(launch(BASE + [f"output_dir={resumed}"], cache_dir, nproc=2, env=env))
    out["bn-resumed"] = resumed
    killed = root / "bn-killed"
    proc = subprocess.Popen(launch_command(BASE + [f"output_dir={killed}"], nproc=2), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_step(killed, 25)  # past the first epoch's evaluation
    # The whole tree at once (a node lost): killing only the launcher would let the workers checkpoint and stop.
    kill_tree(proc.pid)
    proc.wait()
    out["bn-killed"] = killed
    return out


def _compare(*args):
    proc = subprocess.run([sys.executable, "-m", "alexdist", "compare", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def _table(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=False)) for line in lines[2:]]


def test_table_has_one_row_per_run_with_values_from_its_metrics(runs, tmp_path):
    proc = _compare(*(str(p) for p in runs.values()), "--csv", str(tmp_path / "t.csv"), "--plots", str(tmp_path / "p"))
    table = {r["run"]: r for r in _table(proc.stdout)}
    assert set(table) == set(runs)
    expected = {"bn-1p": ("alexnet_bn", "ddp", "1"), "3x3-2p": ("alexnet_3x3", "ddp", "2"),
                "alexnet-zero2": ("alexnet", "deepspeed", "2"), "bn-resumed": ("alexnet_bn", "ddp", "2")}
    for name, (model, strategy, procs) in expected.items():
        row = table[name]
        assert (row["model"], row["strategy"], row["procs"], row["status"]) == (model, strategy, procs, "finished")
        events = read_jsonl(runs[name] / "metrics.jsonl")
        tests = [e for e in events if e["event"] == "test"]
        chosen = [e for e in events if e["event"] == "val"] or tests  # a run with a split is ranked by it
        best = max(chosen, key=lambda e: e["acc"])
        test_there = next(e for e in tests if e["step"] == best["step"])
        assert row["best acc"] == f"{best['acc']:.4f}" and row["final test acc"] == f"{tests[-1]['acc']:.4f}"
        assert row["best epoch"] == str(best["epoch"]) and row["test acc there"] == f"{test_there['acc']:.4f}"
        assert row["on"] == ("val" if name == "3x3-2p" else "test")
        assert row["img/s"] == f"{summary(runs[name])['images_per_s']:,.1f}"
    assert table["bn-killed"]["status"] == "running"  # no summary, metrics moved seconds ago
    # Sorted by best accuracy (the default), unknowns last.
    accs = [float(r["best acc"]) for r in _table(proc.stdout) if r["best acc"] != "—"]
    assert accs == sorted(accs, reverse=True)
    # Recipe keys that differ between the runs get their own columns (the model already has one).
    header = _table(proc.stdout)[0]
    assert "model.input_size" in header and "model.name" not in header  # only alexnet-zero2 sets input_size
    csv_rows = (tmp_path / "t.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + len(runs) and csv_rows[0].startswith("run,model,strategy")


def test_plots_are_real_pngs_of_the_expected_size(runs, tmp_path):
    _compare(*(str(p) for p in runs.values()), "--plots", str(tmp_path))
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["test_acc_vs_epoch.png", "test_acc_vs_time.png", "test_loss_vs_epoch.png", "test_loss_vs_time.png"]
    for p in tmp_path.glob("*.png"):
        with Image.open(p) as im:
            im.load()
            assert im.size == (1000, 600)
            assert len(set(im.convert("RGB").getdata())) > 20  # lines and text, not a blank canvas


def test_a_resumed_run_appears_once_with_its_full_history(runs):
    rec = from_run_dir(runs["bn-resumed"])
    row = build_row(rec)
    assert [e["epoch"] for e in rec.history] == [1, 2, 3]  # the mid-epoch stop's evaluation was superseded
    assert row["status"] == "finished" and row["final_test_acc"] == rec.history[-1]["acc"]
    assert len(list((runs["bn-resumed"] / "wandb").glob("offline-run-*"))) == 2  # two attempts, one W&B run id


def test_a_killed_run_is_shown_as_died_once_its_metrics_go_stale(runs):
    rec = from_run_dir(runs["bn-killed"], now=time.time() + STALE_AFTER_S + 1)
    row = build_row(rec)
    assert row["status"] == "died" and row["best_acc"] is not None and row["images_per_s"] is None


def _wandb_records(run_dir: Path) -> list[dict]:
    records = []
    for d in sorted((run_dir / "wandb").glob("offline-run-*")):
        out = subprocess.run([sys.executable, "-c", "from wandb.cli.cli import cli; cli()", "leet", "inspect",
                              "--json", str(d)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        records += [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    return records


def test_rows_built_from_what_wandb_recorded_equal_the_rows_from_run_directories(runs):
    for name in ("bn-1p", "3x3-2p", "alexnet-zero2", "bn-resumed"):
        from_wandb = from_wandb_records(_wandb_records(runs[name]))
        assert len(from_wandb) == 1, name  # a resumed run's two offline directories merge into one run
        assert build_row(from_wandb[0]) == build_row(from_run_dir(runs[name])), name


def test_no_api_key_is_written_anywhere_a_run_writes(runs):
    for run in runs.values():
        for f in run.rglob("*"):
            if f.is_file():
                assert FAKE_KEY.encode() not in f.read_bytes(), f"API key leaked into {f}"


def test_evaluate_can_record_an_eval_run_in_wandb(runs, tmp_path, cache_dir):
    env = run_env(cache_dir, WANDB_DIR=str(tmp_path))
    weights = str(runs["bn-1p"] / "model.safetensors")
    proc = subprocess.run([sys.executable, "-m", "alexdist", "evaluate", weights, "--json",
                           "--wandb-project", "alexdist-tests", "--wandb-group", "bn-1p"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    records = []
    for d in (tmp_path / "wandb").glob("offline-run-*"):
        out = subprocess.run([sys.executable, "-c", "from wandb.cli.cli import cli; cli()", "leet", "inspect",
                              "--json", str(d)], capture_output=True, text=True, timeout=120)
        records += [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["job_type"] == "eval" and run["run_group"] == "bn-1p"
    summary_items = {}
    for r in records:
        if r["type"] == "summary":
            summary_items.update(r["summary"].get("update", {}))
    assert summary_items["test/acc"] == result["test_acc"]
    assert result["test_acc"] == summary(runs["bn-1p"])["final_test_acc"]  # and it agrees with training's log
