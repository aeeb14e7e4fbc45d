"""What leaves a run carries its input pipeline: the weights record the image size, the evaluation's resize and
centre crop and the normalization the run used, and `evaluate`, `predict`, the ONNX export and the Hub card use
them, not CIFAR's 32 px and constants. One streamed run in this process, on a folder of 64 x 80 px images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dataset_files import image_folder
from helpers import in_this_process, train_here
from PIL import Image

from alexdist.artifacts.export import load_source
from alexdist.checkpoint.weights import Pipeline, model_for, pipeline_of
from alexdist.data.batches import CIFAR_MEAN, CIFAR_STD, normalize
from alexdist.data.decode import decode_eval

MEAN, STD = (0.3, 0.6, 0.2), (0.1, 0.4, 0.3)  # far from CIFAR-10's


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch (3-step) streamed run at data.image_size=48 with data.eval_resize=56 and its own mean and std."""
    tmp = tmp_path_factory.mktemp("pipeline")
    data = image_folder(tmp / "data", per_class=8, shape=(64, 80))
    mp = pytest.MonkeyPatch()
    mp.setenv("ALEXDIST_CACHE", str(tmp / "cache"))
    with in_this_process():
        train_here("quickstart", [
            f"data.source={data}", "data.loader=stream", "data.workers=0", "data.image_size=48", "data.eval_resize=56",
            f"data.mean={list(MEAN)}", f"data.std={list(STD)}", "model.input_size=48", "model.width_mult=0.125",
            "model.dropout=0", "train.batch_size=8", "train.epochs=1", "train.eval_batch_size=8",
            "tracking.wandb=false", f"output_dir={tmp / 'run'}"])
    yield tmp / "run"
    mp.undo()


def test_a_runs_weights_and_its_checkpoints_export_carry_its_input_pipeline(run):
    want = Pipeline(image_size=48, eval_resize=56, input_size=48, mean=MEAN, std=STD)
    assert pipeline_of(load_source(run / "model.safetensors")[1]) == want
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert pipeline_of(load_source(checkpoint)[1]) == want  # `alexdist export` of a checkpoint: the same


def test_a_run_without_data_mean_and_std_carries_its_indexs_figures_also_from_a_checkpoint_without_them(
        run, tmp_path, monkeypatch):
    """data.mean/std unset: the streamed run normalizes with the index's measured mean and std (TrainState's
    normalization), and its weights say so. A second run on the module run's data and index (a few seconds).
    Streamed checkpoints written before TrainState recorded the normalization: the export takes the index's
    figures (what such a run normalized with), not CIFAR-10's; without the index, one line says so."""
    import shutil

    from alexdist.checkpoint.consolidate import consolidate
    from alexdist.checkpoint.manifest import MANIFEST
    from alexdist.checkpoint.state import STATE_FILE
    from alexdist.config import DataConfig
    from alexdist.data.index import load_index
    from alexdist.errors import CheckpointError

    data, cache = run.parent / "data", run.parent / "cache"
    with in_this_process(ALEXDIST_CACHE=str(cache)):
        train_here("quickstart", [
            f"data.source={data}", "data.loader=stream", "data.workers=0", "data.image_size=32", "model.input_size=32",
            "model.width_mult=0.125", "train.batch_size=8", "train.epochs=1", "train.max_steps=1",
            "train.eval_batch_size=24", "tracking.wandb=false", f"output_dir={tmp_path / 'run'}"])
    index = load_index(DataConfig(source=str(data), cache_dir=str(cache)))
    got = pipeline_of(load_source(tmp_path / "run" / "model.safetensors")[1])
    assert (got.mean, got.std) == (pytest.approx(index.mean), pytest.approx(index.std))
    assert (got.mean, got.std) != (CIFAR_MEAN, CIFAR_STD) and got.mean != MEAN

    old = tmp_path / "old" / "step-0000001"
    shutil.copytree(sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1], old)
    state = json.loads((old / STATE_FILE).read_text())
    del state["normalization"]  # as written then (and without the manifest that would list the edit as damage)
    (old / STATE_FILE).write_text(json.dumps(state))
    (old / MANIFEST).unlink()
    monkeypatch.setenv("ALEXDIST_CACHE", str(cache))
    got = pipeline_of(consolidate(old)[1])
    assert (got.mean, got.std) == (pytest.approx(index.mean), pytest.approx(index.std))
    (old / STATE_FILE).write_text(json.dumps({**state, "data_fingerprint": "other data"}))
    with pytest.raises(CheckpointError, match="now describes other data than the run's"):
        consolidate(old)  # an index of other data measured other figures than the run used
    (old / STATE_FILE).write_text(json.dumps(state))
    monkeypatch.setenv("ALEXDIST_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(CheckpointError, match=r"before alexdist recorded its normalization.*alexdist index"):
        consolidate(old)


def test_evaluate_reads_the_test_split_through_the_stored_pipeline(run):
    from alexdist.artifacts.weights_evaluation import evaluate_weights
    from alexdist.fileio import read_jsonl

    logged = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "test"][-1]
    r = evaluate_weights(run / "model.safetensors")
    assert r["images"] == 24 and r["confusion"] == logged["confusion"]
    assert r["test_loss"] == pytest.approx(logged["loss"], rel=1e-5)


def _photo(path, size=(90, 70)):
    """A smooth colour JPEG of another size and aspect than the data's (resize and crop both matter)."""
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    arr = np.stack([xx * 255 // size[0], yy * 255 // size[1], (xx + yy) * 255 // sum(size)], -1).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=95)
    return path


def test_predict_feeds_the_model_the_stored_pipeline_and_not_cifars(run, tmp_path):
    from alexdist.artifacts.prediction import predict, preprocess

    jpg = _photo(tmp_path / "photo.jpg")
    weights, meta, _ = load_source(run / "model.safetensors")
    model = model_for(meta, weights)
    crop = decode_eval(jpg.read_bytes(), 48, 56)  # the shorter side to 56, the centre 48 x 48
    by_hand = (crop.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    as_cifar = normalize(decode_eval(jpg.read_bytes(), 32, None)[None], 48)  # the former pipeline
    with torch.no_grad():
        want = torch.softmax(model(by_hand[None]), 1)[0]
        cifar = torch.softmax(model(as_cifar), 1)[0]
    got = {t["class"]: t["prob"] for t in predict([str(jpg)], str(run / "model.safetensors"), top_k=3)[0]["top"]}
    got = torch.tensor([got[c] for c in ("cat", "dog", "fox")])
    assert (preprocess([jpg], pipeline_of(meta))[0] - by_hand).abs().max() < 1e-5
    assert (by_hand - as_cifar[0]).abs().mean() > 0.5  # another input altogether (normalised units)
    assert (got - want).abs().max() < 1e-6
    assert (got - cifar).abs().max() > 1e-4  # and other probabilities (0.0012 measured) for a barely trained model


def test_the_onnx_model_takes_the_stored_size_and_records_the_pipeline(run, tmp_path):
    import onnx

    from alexdist.artifacts.onnx import export_onnx

    weights, meta, _ = load_source(run / "model.safetensors")
    export_onnx(weights, meta, tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    dims = [d.dim_value or d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 48, 48] and isinstance(dims[0], str)
    props = {p.key: p.value for p in m.metadata_props}
    assert json.loads(props["mean"]) == list(MEAN) and json.loads(props["std"]) == list(STD)
    assert props["image_size"] == "48" and props["eval_resize"] == "56"
    assert json.loads(props["classes"]) == ["cat", "dog", "fox"]


def test_the_hub_card_states_the_stored_pipeline(run, tmp_path):
    from alexdist.artifacts.hub import write_hub_dir

    weights, meta, source = load_source(run / "model.safetensors")
    evaluation = {"classes": ["cat", "dog", "fox"], "per_class_acc": [0.5, 0.5, 0.5], "test_acc": 0.5,
                  "test_loss": 1.0, "images": 24, "confusion": [[4, 2, 2], [2, 4, 2], [2, 2, 4]]}
    out = write_hub_dir(source, weights, meta, evaluation, tmp_path / "hub")
    card = (out / "README.md").read_text()
    assert "T.Resize(56), T.CenterCrop(48)" in card and f"T.Normalize(mean={list(MEAN)}, std={list(STD)})" in card
    assert "the shorter side resized to 56 px, the centre 48 x 48 kept" in card
    config = json.loads((out / "config.json").read_text())
    assert (config["image_size"], config["eval_resize"], config["num_classes"]) == (48, 56, 3)
    assert config["normalization"]["mean"] == list(MEAN) and config["normalization"]["std"] == list(STD)


def test_a_weights_file_without_a_recorded_pipeline_evaluates_with_cifars_constants(tmp_path, monkeypatch):
    from alexdist.artifacts.weights_evaluation import evaluate_weights
    from alexdist.checkpoint.weights import save_weights, weights_metadata
    from alexdist.config import load_recipe
    from alexdist.data.batches import MemoryEvalSet
    from alexdist.data.cache import load_dataset
    from alexdist.models import build_model
    from alexdist.training.evaluation import evaluate_ranks

    monkeypatch.setenv("ALEXDIST_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe("quickstart", ["data.source=synthetic", "data.synthetic_train=16", "data.synthetic_test=32",
                                        "model.width_mult=0.125"])
    torch.manual_seed(0)
    model = build_model(recipe.model.name, 32, 0.0, 0.125).eval()
    meta = weights_metadata(recipe, 4, None, [str(i) for i in range(10)])
    del meta["pipeline"]  # as written before the pipeline was recorded
    path = save_weights(tmp_path / "old.safetensors", model.state_dict(), meta)
    assert pipeline_of(meta) == Pipeline(32, None, 32, CIFAR_MEAN, CIFAR_STD)
    ds = load_dataset(recipe.data)
    with torch.no_grad():
        want = evaluate_ranks(None, model, MemoryEvalSet(ds.test_x, ds.test_y, 32), 360, torch.float32)
    r = evaluate_weights(path)
    assert (r["test_loss"], r["confusion"]) == (pytest.approx(want.loss, rel=1e-6), want.confusion)


@pytest.mark.parametrize(("source", "loader", "refused"), [
    ("/data/photos", "auto", True), ("/data/photos", "stream", True), ("/data/photos", "memory", False),
    ("digits", "auto", False), ("uoft-cs/cifar10", "auto", False)])
def test_a_weights_file_without_a_recorded_pipeline_from_a_run_that_may_have_streamed_is_refused(source, loader,
                                                                                                refused):
    """Such a run normalized with its index's figures and cropped as its augmentation said, which the file does
    not record: CIFAR-10's constants and a plain resize would be a silent guess. In-memory runs used exactly
    those, and the built-in sets and Hub ids never streamed."""
    from alexdist.checkpoint.weights import weights_metadata
    from alexdist.config import load_recipe
    from alexdist.errors import DataError

    meta = weights_metadata(load_recipe("quickstart", [f"data.source={source}", f"data.loader={loader}"]), 4, None,
                            ["a", "b"])
    del meta["pipeline"]
    if refused:
        with pytest.raises(DataError, match=r"may have streamed .*alexdist export RUN/checkpoints/step-N"):
            pipeline_of(meta)
    else:
        assert pipeline_of(meta) == Pipeline(32, None, 32, CIFAR_MEAN, CIFAR_STD)


def test_an_export_with_onnx_or_a_hub_folder_of_a_file_whose_pipeline_is_unknown_writes_nothing(tmp_path, capsys):
    from alexdist.checkpoint.weights import save_weights, weights_metadata
    from alexdist.commands.export import main
    from alexdist.config import load_recipe
    from alexdist.models import build_model

    classes = [str(i) for i in range(10)]
    meta = weights_metadata(load_recipe("quickstart", ["data.source=/data/photos"]), 4, None, classes)
    del meta["pipeline"]
    src = save_weights(tmp_path / "old.safetensors", build_model("alexnet_bn", 32, 0.0, 0.25).state_dict(), meta)
    assert main([str(src), str(tmp_path / "out.safetensors"), "--hub-dir", str(tmp_path / "hub")]) != 0
    assert "may have streamed" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "hub").exists()
