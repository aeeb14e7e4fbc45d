"""What an evaluation reports beyond loss and accuracy (per-class accuracy, the confusion matrix, test-time
augmentation), stopping at a target accuracy, and `alexdist predict`. One 2-rank quickstart run on digits."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, check, error_line, launch, read_jsonl, summary


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("eval") / "run"
    check(launch(["eval.tta=flip", "train.stop_at_acc=0.8", "eval.confusion_png=true", f"output_dir={out}"],
                 cache_dir, nproc=2))
    return out


@pytest.mark.learned
def test_the_run_stops_at_the_first_evaluation_that_reaches_the_target(run, cache_dir):
    s = summary(run)
    tests = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "test"]
    assert s["status"] == "target_reached" and s["steps"] < s["total_steps"]
    assert tests[-1]["acc"] >= 0.8 and all(e["acc"] < 0.8 for e in tests[:-1])
    assert (run / "model.safetensors").is_file()
    last = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert last.name == f"step-{s['steps']:07d}"  # checkpointed where it stopped
    again = launch(["eval.tta=flip", "train.stop_at_acc=0.8", "eval.confusion_png=true", f"output_dir={run}"],
                   cache_dir, nproc=2)
    check(again)  # the same command again: the run is over, nothing more is trained
    assert summary(run)["status"] == "target_reached" and summary(run)["steps"] == s["steps"]


def test_every_evaluation_logs_per_class_accuracy_a_confusion_matrix_and_tta(run):
    tests = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "test"]
    for e in tests:
        cm = e["confusion"]
        n = sum(map(sum, cm))
        assert n == 359  # every test image once (digits: 359), over both ranks
        assert sum(cm[i][i] for i in range(10)) / n == pytest.approx(e["acc"])
        assert e["per_class_acc"] == pytest.approx([cm[i][i] / sum(cm[i]) for i in range(10)])
        assert e["tta_loss"] > 0
    assert any(e["tta_loss"] != e["loss"] for e in tests)  # TTA ran its own forwards, not a copy of the plain ones
    assert (run / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_reproduces_the_logged_figures_with_tta_and_names_the_classes(run):
    proc = subprocess.run([sys.executable, "-m", "alexdist", "evaluate", str(run / "model.safetensors"), "--tta",
                           "flip", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    logged = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "test"][-1]
    assert r["classes"] == [str(i) for i in range(10)]  # digits' names, from the weights' metadata
    assert r["test_acc"] == logged["acc"] and r["confusion"] == logged["confusion"]
    assert r["tta_acc"] == pytest.approx(logged["tta_acc"], abs=1 / 359)  # one image may flip on rounding
    text = subprocess.run([sys.executable, "-m", "alexdist", "evaluate", str(run / "model.safetensors")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=True).stdout
    assert len([line for line in text.splitlines() if line.startswith("  ")]) == 10  # one line per class


def test_predict_reads_images_of_any_size_and_names_the_top_classes(run, tmp_path, cache_dir, monkeypatch):
    from PIL import Image

    from alexdist.config import load_recipe
    from alexdist.data.cache import load_dataset

    monkeypatch.setenv("ALEXDIST_CACHE", str(cache_dir))
    ds = load_dataset(load_recipe("quickstart").data)
    paths = []
    for i in range(20):
        img = Image.fromarray(ds.test_x[i].permute(1, 2, 0).numpy())
        path = tmp_path / f"{i}.png"
        img.save(path)
        paths.append(str(path))
    big = tmp_path / "big.jpg"
    Image.fromarray(ds.test_x[0].permute(1, 2, 0).numpy()).resize((97, 61)).save(big, quality=95)
    proc = subprocess.run([sys.executable, "-m", "alexdist", "predict", *paths, str(big), "--weights",
                           str(run / "model.safetensors"), "--top-k", "3", "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == 21 and all(len(r["top"]) == 3 for r in results)
    for r in results:
        probs = [t["prob"] for t in r["top"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    # The PNGs are the test images unchanged (32x32, lossless): predict must name exactly the classes the
    # weights give those images through the evaluation's own path, and a trained run gets most of them right.
    from alexdist.artifacts.export import load_source
    from alexdist.checkpoint.weights import model_for
    from alexdist.data.batches import normalize

    weights, meta, _ = load_source(run / "model.safetensors")
    with torch.no_grad():
        expected = model_for(meta, weights)(normalize(ds.test_x[:20], int(meta["input_size"]))).argmax(1)
    assert [r["top"][0]["class"] for r in results[:20]] == [str(int(c)) for c in expected]
    right = sum(r["top"][0]["class"] == str(int(ds.test_y[i])) for i, r in enumerate(results[:20]))
    assert right >= 12  # the run stops at test accuracy 0.8; an untrained model gets about 2 of 20
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    proc = subprocess.run([sys.executable, "-m", "alexdist", "predict", str(bad), "--weights",
                           str(run / "model.safetensors")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3 and "is not a readable image" in error_line(proc)


def test_export_writes_an_onnx_model_and_a_hub_folder_that_match_the_run(run, tmp_path, cache_dir, monkeypatch):
    import numpy as np
    import onnxruntime
    from safetensors.torch import load_file

    from alexdist.checkpoint.weights import load_weights, model_for
    from alexdist.config import load_recipe
    from alexdist.data.batches import normalize
    from alexdist.data.cache import load_dataset

    onnx, hub = tmp_path / "model.onnx", tmp_path / "hub"
    proc = subprocess.run([sys.executable, "-m", "alexdist", "export", str(run / "model.safetensors"), "--onnx",
                           str(onnx), "--hub-dir", str(hub)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setenv("ALEXDIST_CACHE", str(cache_dir))
    ds = load_dataset(load_recipe("quickstart").data)
    x = normalize(ds.test_x[:64], 32)
    weights, meta = load_weights(run / "model.safetensors")
    model = model_for(meta, weights)
    with torch.no_grad():
        want = model(x).numpy()
    session = onnxruntime.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    assert np.abs(got - want).max() < 1e-4 and (got.argmax(1) == want.argmax(1)).all()

    assert sorted(p.name for p in hub.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    ours, theirs = load_file(str(hub / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = json.loads((hub / "config.json").read_text())
    logged = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "test"][-1]
    assert config["architecture"] == "alexnet_bn" and config["classes"] == [str(i) for i in range(10)]
    assert config["test_accuracy"] == logged["acc"]
    card = (hub / "README.md").read_text()
    import yaml

    front = yaml.safe_load(card.split("---\n")[1])  # the Hub's YAML front matter
    assert front["library_name"] == "alexdist" and front["pipeline_tag"] == "image-classification"
    assert card.count("\n| ") == 11  # the per-class table: header + 10 classes
    assert summary(run)["command"] in card and "-m alexdist.train" in summary(run)["command"]
    assert "train.stop_at_acc=0.8" in card  # the overrides it was trained with
