"""The fast tier's tour of the package: tiny in-process runs (one rank, DDP and FSDP2 alike) and what a user does
with them (export, evaluate, predict, compare, a Hub folder, ONNX), plus a 2-step launch of each strategy on 2
processes. Seconds each; the thorough versions of these checks are the slow tests named in each docstring."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, check, import_probe_env, imported, launch, read_jsonl, summary

TINY = ["data.source=digits", "model.width_mult=0.25", "train.epochs=1", "train.max_steps=4", "train.batch_size=16",
        "train.eval_batch_size=180", "checkpoint.every_steps=2", "train.log_every=2", "tracking.wandb=false"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, cache_dir):
    """A DDP run and an FSDP2 run of 4 steps, trained in this process (one rank: no process group), under umask
    002 (a team's shared disk: test_every_file_a_run_writes_gets_the_mode_of_the_umask)."""
    import os

    from helpers import in_this_process, train_here

    root = tmp_path_factory.mktemp("tiny")
    out = {}
    umask = os.umask(0o002)
    try:
        with in_this_process(ALEXDIST_CACHE=str(cache_dir)):
            for name, extra in [("ddp", []), ("fsdp", ["distributed.strategy=fsdp"]),
                                ("resumed", ["train.max_steps=2"]), ("resumed", [])]:  # stopped at 2, resumed to 4
                out[name] = root / name
                train_here("quickstart", TINY + extra + [f"output_dir={out[name]}"])
    finally:
        os.umask(umask)
    return out


def _alexdist(*args: str, cache_dir: Path) -> subprocess.CompletedProcess:
    from helpers import run_env

    return subprocess.run([sys.executable, "-m", "alexdist", *args], cwd=ROOT, env=run_env(cache_dir),
                          capture_output=True, text=True, timeout=300, check=False)


def test_a_tiny_run_writes_its_weights_checkpoints_and_log(tiny):
    for name in ("ddp", "fsdp"):
        run = tiny[name]
        s = summary(run)
        assert s["status"] == "max_steps" and s["steps"] == 4 and s["strategy"] == name
        assert [p.name for p in sorted((run / "checkpoints").glob("step-*"))] == ["step-0000002", "step-0000004"]
        assert [e["step"] for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "step"] == [2, 4]
        assert (run / "model.safetensors").is_file() and (run / "confusion.png").is_file()


def test_every_file_a_run_writes_gets_the_mode_of_the_umask(tiny):
    """Weights, checkpoints (DDP's safetensors, FSDP2's DCP shards), summary, config, metrics and figures: group
    members read (and under 002 write) them. Thorough for each writer: tests/unit/test_file_modes.py."""
    import stat

    for name in ("ddp", "fsdp", "resumed"):
        modes = {str(p.relative_to(tiny[name])): oct(stat.S_IMODE(p.stat().st_mode))
                 for p in tiny[name].rglob("*") if p.is_file()}
        assert "model.safetensors" in modes and "checkpoints/step-0000004/manifest.json" in modes
        assert modes == dict.fromkeys(modes, oct(0o664)), name


def test_a_resumed_tiny_run_ends_with_the_uninterrupted_weights(tiny):
    """Thorough: test_resume.py, test_crash_recovery.py."""
    from safetensors.torch import load_file

    assert summary(tiny["resumed"])["resumed_at_step"] == 2
    a, b = load_file(str(tiny["ddp"] / "model.safetensors")), load_file(str(tiny["resumed"] / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_export_takes_a_checkpoint_of_either_strategy_and_a_run_directory(tiny, tmp_path, cache_dir):
    """Thorough: test_zero_equivalence.py, test_fsdp.py (export of every strategy's checkpoints)."""
    from safetensors.torch import load_file

    for name in ("ddp", "fsdp"):
        run = tiny[name]
        out = tmp_path / f"{name}.safetensors"
        proc = _alexdist("export", str(run / "checkpoints" / "step-0000004"), str(out), cache_dir=cache_dir)
        assert proc.returncode == 0, proc.stderr
        final, exported = load_file(str(run / "model.safetensors")), load_file(str(out))
        assert final.keys() == exported.keys() and all((final[k] == exported[k]).all() for k in final)
    proc = _alexdist("export", str(tiny["ddp"]), str(tmp_path / "from-run.safetensors"), cache_dir=cache_dir)
    assert proc.returncode == 0 and "is a run directory: using its final weights" in proc.stderr


def test_a_run_directory_without_final_weights_gives_its_newest_complete_checkpoint(tiny, tmp_path):
    import shutil

    from alexdist.artifacts.export import resolve_source

    run = tmp_path / "unfinished"
    shutil.copytree(tiny["ddp"], run)
    (run / "model.safetensors").unlink()
    source, said = resolve_source(run)
    assert source == run / "checkpoints" / "step-0000004" and "newest complete checkpoint (step-0000004)" in said
    assert resolve_source(run / "checkpoints" / "step-0000002") == (run / "checkpoints" / "step-0000002", None)


def test_evaluate_and_predict_read_a_run_directory(tiny, tmp_path, cache_dir):
    """Thorough: test_evaluation_features.py."""
    proc = _alexdist("evaluate", str(tiny["fsdp"]), "--json", cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.splitlines()[-1])
    assert r["images"] == 359 and r["test_acc"] == summary(tiny["fsdp"])["final_test_acc"]
    from PIL import Image

    image = tmp_path / "digit.png"
    Image.new("RGB", (40, 30), (200, 200, 200)).save(image)
    proc = _alexdist("predict", str(image), "--weights", str(tiny["ddp"]), "--top-k", "2", "--json",
                     cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert [t["class"] in [str(i) for i in range(10)] for t in json.loads(proc.stdout)["top"]] == [True, True]


def test_compare_plots_and_a_hub_folder(tiny, tmp_path, cache_dir):
    """Thorough: test_compare.py, test_evaluation_features.py (Hub folder, ONNX)."""
    proc = _alexdist("compare", str(tiny["ddp"]), str(tiny["fsdp"]), "--plots", str(tmp_path / "plots"),
                     cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert len([line for line in proc.stdout.splitlines() if line.startswith("| ")]) == 3  # header + 2 runs
    assert (tmp_path / "plots" / "test_acc_vs_epoch.png").read_bytes()[:4] == b"\x89PNG"
    proc = _alexdist("export", str(tiny["ddp"]), "--hub-dir", str(tmp_path / "hub"), "--onnx",
                     str(tmp_path / "m.onnx"), cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert "onnxruntime vs PyTorch logits: max difference" in proc.stdout
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["architecture"] == "alexnet_bn" and (tmp_path / "hub" / "README.md").is_file()


def test_a_damaged_checkpoint_is_found_by_its_manifest(tiny, tmp_path):
    import shutil

    from alexdist.checkpoint.manifest import damage

    ckpt = tmp_path / "step"
    shutil.copytree(tiny["ddp"] / "checkpoints" / "step-0000004", ckpt)
    assert damage(ckpt) is None
    (ckpt / "optimizer.bin").write_bytes(b"x")
    assert "optimizer.bin" in damage(ckpt)


@pytest.mark.parametrize("strategy", [[], ["distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=2"],
                                      ["distributed.strategy=fsdp"]], ids=["ddp", "zero2", "fsdp"])
def test_each_strategy_takes_two_steps_on_two_processes(strategy, tmp_path, cache_dir):
    """Thorough: test_ddp_equivalence.py, test_zero_equivalence.py, test_fsdp.py. And only ZeRO's processes import
    DeepSpeed (0.2 s each; Accelerate's unwrap_model would import it in every run)."""
    run = tmp_path / "run"
    env = import_probe_env(cache_dir, tmp_path / "imports", ["deepspeed", "alexdist.training.loop"])
    check(launch(TINY[:-4] + strategy + ["train.max_steps=2", "tracking.wandb=false", f"output_dir={run}"],
                 cache_dir, nproc=2, env=env))
    s = summary(run)
    assert s["world_size"] == 2 and s["steps"] == 2 and s["effective_batch"] == 32
    zero = "distributed.strategy=deepspeed" in strategy
    assert imported(tmp_path / "imports") == {"alexdist.training.loop": 2, **({"deepspeed": 2} if zero else {})}
