"""The ImageNet recipes, end to end on a small set in ImageNet's folder layout (train/CLASS/*.JPEG, val/CLASS/*.JPEG),
indexed by `alexdist index` as a user would: each recipe trains as shipped but for the size, the batch and the
steps, streamed from disk, and reports top-5 beside top-1 (12 classes). In this process, one rank: seconds."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import in_this_process, train_here
from PIL import Image

from alexdist.fileio import read_jsonl

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 12, 4, 2
# 64 px: the smallest input torchvision's AlexNet takes (its 3x3/2 pools need a 3 px map after the 11x11/4 stem).
SMALL = ["data.image_size=64", "model.input_size=64", "data.eval_resize=73", "train.global_batch=8",
         "train.max_steps=2", "train.eval_batch_size=24", "data.workers=0", "train.log_every=1",
         "tracking.wandb=false"]
OWN = {"imagenet_torchvision": [], "imagenet_alexnet_bn_lars": ["model.width_mult=0.125"]}


def imagenet_folder(root):
    """CLASSES classes named as ImageNet's synsets, JPEGs of mixed sizes and modes, in ImageNet's folder layout."""
    rng = np.random.default_rng(0)
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = (int(s) for s in rng.integers(60, 120, 2))
                img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                (img.convert("L") if i == 1 else img).save(folder / f"{c}_{i}.JPEG", quality=85)
    return root


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    from alexdist import cli

    root = tmp_path_factory.mktemp("imagenet")
    folder, cache = imagenet_folder(root / "imagenet"), root / "cache"
    assert cli.main(["index", str(folder), "--cache-dir", str(cache), "--workers", "0", "--quiet"]) == 0
    return folder, cache


@pytest.mark.parametrize("recipe", list(OWN))
def test_each_imagenet_recipe_streams_an_indexed_imagenet_folder_and_reports_top5(recipe, indexed, tmp_path,
                                                                                  capsys, monkeypatch):
    folder, cache = indexed
    monkeypatch.setenv("ALEXDIST_CACHE", str(cache))
    run = tmp_path / "run"
    with in_this_process():
        train_here(recipe, [f"data.source={folder}", *SMALL, *OWN[recipe], f"output_dir={run}"])
    out = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "max_steps" and summary["data_loader"] == "stream" and summary["steps"] == 2
    assert "data streamed from disk" in out
    # Top-5 beside top-1 with more than 10 classes: in summary.json, the test event, the epoch and end lines.
    assert summary["final_test_acc"] <= summary["final_test_acc5"] <= 1
    test = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "test"][-1]
    assert len(test["per_class_acc"]) == CLASSES and test["acc5"] == summary["final_test_acc5"]
    assert f"acc {summary['final_test_acc']:.4f} top-5 {summary['final_test_acc5']:.4f}" in out
    done = next(line for line in out.splitlines() if line.startswith("alexdist: done at step 2"))
    assert f"final test acc {summary['final_test_acc']:.4f} top-5 " in done
    # The recipe's own choices reached the run (only the sizes and steps above were overridden).
    config = (run / "config.yaml").read_text()
    assert "random_resized_crop: true" in config and "0.485" in config and os.path.isfile(run / "model.safetensors")
    # `alexdist evaluate` on the run's weights: the same top-1 and top-5 as the run's own final evaluation.
    from alexdist.artifacts.weights_evaluation import evaluate_weights, report

    r = evaluate_weights(run / "model.safetensors")
    assert (r["test_acc"], r["test_acc5"]) == (summary["final_test_acc"], summary["final_test_acc5"])
    assert f"acc {r['test_acc']:.4f} top-5 {r['test_acc5']:.4f}" in report(r).splitlines()[0]
