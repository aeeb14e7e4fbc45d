"""Every bad input gets one clear line, a non-zero exit code, and damages nothing saved before.

Each case runs the command a user would run. The messages are also the content of docs/errors.md: the last test
fails when that file and the messages drift apart (`ALEXDIST_UPDATE_DOCS=1 pytest tests/e2e/test_error_messages.py`
rewrites it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import ROOT, check, launch, launch_command, run_env
from PIL import Image

DOC = ROOT / "docs" / "errors.md"
BASE = ["data.source=synthetic", "data.synthetic_train=256", "data.synthetic_test=64", "train.batch_size=32",
        "train.epochs=2", "tracking.wandb=false", "model.width_mult=0.25"]


TITLES = [  # the cases of _cases, in order: each is a test of its own
    'malformed YAML',
    'unknown key',
    'unknown section',
    'wrong type',
    'negative learning rate',
    'zero batch size',
    'accumulation that does not divide the global batch',
    'unknown model name',
    'a dashed override (jsonargparse/Lightning habit)',
    'a fractional minimum fp16 loss scale',
    'an unknown shipped recipe name',
    'missing dataset path',
    'a folder in neither known layout',
    'a corrupt parquet file',
    'data.loader=stream on a source that is not a folder',
    'an index of a source that is not a local folder (index)',
    'an index of a folder in no indexable layout (index)',
    'an unreadable image found while indexing (index)',
    'a parquet folder with no validation or test split (index)',
    'an image folder with no val/ or test/ (index)',
    'a truncated dataset cache (not an error: rebuilt)',
    'fp16 without a GPU',
    'float64 under DeepSpeed',
    'LARS under DeepSpeed',
    'a dataset too large for memory at its image size',
    'output_dir that cannot be written',
    'disk full while saving a checkpoint',
    'resume with another model',
    'resume with other data',
    'resume at another image size',
    'resume with another validation split',
    'resume with another optimizer',
    'resume with another learning rate and schedule',
    'a validation split that leaves a class without validation images',
    'a checkpoint of another model, change allowed on purpose',
    'the only checkpoint damaged after its save (a truncated shard)',
    'resuming from a damaged checkpoint by path (a truncated optimizer file)',
    'a truncated shard in a checkpoint without a manifest (older alexdist)',
    'a truncated optimizer file in a checkpoint without a manifest',
    'a crafted pickle in a checkpoint',
    'a crafted pickle in a ZeRO checkpoint (export)',
    'a truncated weights file (evaluate)',
    'a directory that is neither a checkpoint nor a run (export)',
    'a ZeRO-3 checkpoint on another world size',
    'a ZeRO-3 checkpoint resumed with ZeRO-2',
    'a ZeRO checkpoint on another world size with another effective batch',
    'EMA with ZeRO-3',
    'SyncBatchNorm on a CPU',
    'a tracker that is not installed',
    'a missing image (predict)',
    'ONNX export of a file that is not a weights file',
    'NaN loss that does not go away',
    'a rank that dies',
]


@dataclass
class Case:
    title: str
    args: list[str]  # alexdist.train overrides (or the arguments of the `module` command)
    exit_code: int
    expect: str  # a fragment the message must contain
    module: str = "train"  # or the `alexdist` command it runs (export, evaluate, predict)
    nproc: int = 1
    env: dict[str, str] = field(default_factory=dict)
    recipe: str | None = None  # None: a copy of recipes/quickstart.yaml is not needed; BASE overrides suffice
    prepare: object = None  # callable(case_dir) run before the command
    after: object = None  # callable(case_dir) -> None: asserts that nothing saved was damaged
    normalize: object = None  # callable(message) -> message as shown in docs/errors.md
    prefix: str = "alexdist: error: "  # what the message line starts with


class Pickled:
    """A pickle that would create a file when loaded: it must never be unpickled."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _base_run(root: Path, cache_dir: Path) -> Path:
    """A 1-process run stopped at step 2 (checkpoint step-0000002): the checkpoint the resume cases damage."""
    run = root / "base"
    check(launch(BASE + ["train.max_steps=2", f"output_dir={run}"], cache_dir))
    return run


def _zero_run(root: Path, cache_dir: Path, stage: int = 2) -> Path:
    run = root / f"zero{stage}"
    check(launch(BASE + ["train.max_steps=2", f"output_dir={run}"], cache_dir, nproc=2,
                 config_file=f"recipes/accelerate/zero{stage}.yaml"))
    return run


def _ckpt(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*"))[-1]


def _unchanged(run: Path, snapshot: dict[str, bytes]):
    def check_run(_):
        now = {str(p.relative_to(run)): p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
        assert now == snapshot, "a saved checkpoint was changed"
    return check_run


def _cases(root: Path, base: Path, zero: Path, zero3: Path) -> list[Case]:
    def copy_of(src: Path, name: str) -> Path:
        dst = root / name
        shutil.copytree(src, dst)
        return dst

    def snapshot(run: Path) -> dict[str, bytes]:
        return {str(p.relative_to(run)): p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}

    bad_yaml = _write(root / "bad.yaml", "model:\n  name: alexnet_bn\n train: [epochs\n")
    neither = root / "neither"
    _write(neither / "README.txt", "some notes")
    bad_parquet = root / "bad-parquet"
    _write(bad_parquet / "plain_text" / "train-00000-of-00001.parquet", "not parquet")
    _write(bad_parquet / "plain_text" / "test-00000-of-00001.parquet", "not parquet")
    a_file = _write(root / "a-file", "x")
    bad_images, train_only, no_val = root / "bad-images", root / "train-only-parquet", root / "no-val"
    for split in ("train", "val"):
        (bad_images / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(bad_images / split / "cat" / "ok.JPEG")
    _write(bad_images / "train" / "cat" / "bad.JPEG", "not a jpeg")
    _write(train_only / "data" / "train-00000-of-00001.parquet", "x")
    (no_val / "train" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(no_val / "train" / "cat" / "0.JPEG")
    index_key = re.compile(r"-[0-9a-f]{16}/unreadable")

    other_model = copy_of(base, "other-model")
    other_allowed = copy_of(base, "other-model-allowed")
    other_data = copy_of(base, "other-data")
    other_size = copy_of(base, "other-size")
    other_split = copy_of(base, "other-split")
    other_optim = copy_of(base, "other-optim")
    other_lr = copy_of(base, "other-lr")
    from alexdist.checkpoint.manifest import MANIFEST, write_manifest

    def truncated(name: str, file: str, keep: int | None, manifest: bool) -> Path:
        run = copy_of(base, name)
        f = _ckpt(run) / file
        f.write_bytes(f.read_bytes()[: keep if keep is not None else f.stat().st_size // 2])
        if not manifest:  # a checkpoint written before alexdist recorded manifests: nothing to check it against
            (_ckpt(run) / MANIFEST).unlink()
        return run

    trunc_shard = truncated("truncated-shard", "model.safetensors", None, manifest=True)
    trunc_opt = truncated("truncated-optimizer", "optimizer.bin", 100, manifest=True)
    old_shard = truncated("old-truncated-shard", "model.safetensors", None, manifest=False)
    old_opt = truncated("old-truncated-optimizer", "optimizer.bin", 100, manifest=False)
    crafted = copy_of(base, "crafted-pickle")
    import torch

    # An attacker who can write a pickle can rewrite the manifest too: the pickle check must still refuse it.
    torch.save({"random_state": Pickled(str(root / "PWNED"))}, _ckpt(crafted) / "random_states_0.pkl")
    write_manifest(_ckpt(crafted))
    crafted_zero = copy_of(zero, "crafted-zero")
    torch.save({"optimizer_state_dict": Pickled(str(root / "PWNED"))},
               _ckpt(crafted_zero) / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    write_manifest(_ckpt(crafted_zero))
    weights = root / "weights-truncated.safetensors"
    weights.write_bytes((base / "model.safetensors").read_bytes()[:1000])
    zero3_moved = zero3
    zero3_stage = copy_of(zero3_moved, "zero3-at-stage-2")
    zero_batch = copy_of(zero, "zero2-other-batch")
    from alexdist.config import DataConfig
    from alexdist.data.cache import cache_path, load_dataset

    trunc_cache = DataConfig(source="synthetic", synthetic_train=256, synthetic_test=64, cache_dir=str(root / "cache"))
    load_dataset(trunc_cache)
    cached = cache_path(trunc_cache)
    cached.write_bytes(cached.read_bytes()[:5000])
    full = root / "full"
    diverge = root / "diverge"

    def no_pwned(_):
        assert not (root / "PWNED").exists(), "the crafted pickle was executed"

    def after_full(_):
        assert [p.name for p in (full / "checkpoints").iterdir()] == ["step-0000002"]  # intact, no .tmp-* left

    def after_diverge(_):
        names = sorted(p.name for p in (diverge / "checkpoints").iterdir())
        assert names == ["step-0000004", "step-0000006"] and not (diverge / "model.safetensors").exists()
        from safetensors.torch import load_file

        before, after = (load_file(str(diverge / "checkpoints" / n / "model.safetensors")) for n in names)
        # Steps 5 and 6 were skipped: the checkpoint after them holds the good weights of step 4, untouched.
        assert all(torch.equal(before[k], after[k]) and bool(torch.isfinite(after[k]).all()) for k in before)

    lost_peer = re.compile(r"\(.*\); the run")
    return [
        Case("malformed YAML", [], 2, "is not valid YAML at line 3", recipe=str(bad_yaml)),
        Case("unknown key", ["train.epocs=3"], 2, "did you mean 'train.epochs'"),
        Case("unknown section", ["trian.epochs=3"], 2, "did you mean 'train'"),
        Case("wrong type", ["train.epochs=many"], 2, "bad value for 'train.epochs'"),
        Case("negative learning rate", ["optim.lr=-0.1"], 2, "bad value for 'optim.lr'"),
        Case("zero batch size", ["train.batch_size=0"], 2, "bad value for 'train.batch_size'"),
        Case("accumulation that does not divide the global batch", ["train.global_batch=100", "train.grad_accum=3"],
             2, "not divisible"),
        Case("unknown model name", ["model.name=alexnet_xl"], 2, "unknown model 'alexnet_xl'"),
        Case("a dashed override (jsonargparse/Lightning habit)", ["--train.epochs=3"], 2, "write train.epochs=3"),
        Case("a fractional minimum fp16 loss scale", ["distributed.deepspeed.fp16_min_loss_scale=0.5"], 2,
             "bad value for 'distributed.deepspeed.fp16_min_loss_scale'"),
        Case("an unknown shipped recipe name", [], 2, "did you mean 'bn'?", recipe="bnn"),
        Case("missing dataset path", [f"data.source={root / 'no-such-folder'}"], 3, "does not exist"),
        Case("a folder in neither known layout", [f"data.source={neither}"], 3, "no known dataset layout"),
        Case("a corrupt parquet file", [f"data.source={bad_parquet}"], 3, "could not read the parquet files"),
        Case("data.loader=stream on a source that is not a folder", ["data.loader=stream"], 2,
             "data.loader=stream needs a local folder"),
        Case("an index of a source that is not a local folder (index)", [str(root / "no-such-folder")], 3,
             "is not a local folder", module="index"),
        Case("an index of a folder in no indexable layout (index)", [str(neither)], 3,
             "is in no layout an index is built from", module="index"),
        Case("an unreadable image found while indexing (index)", [str(bad_images), "--cache-dir",
             str(root / "idx-cache"), "--workers", "0", "--quiet"], 3, "1 unreadable image: ", module="index",
             normalize=lambda m: index_key.sub("-<key>/unreadable", m)),
        Case("a parquet folder with no validation or test split (index)", [str(train_only), "--quiet"], 3,
             "no validation-*.parquet or test-*.parquet", module="index"),
        Case("an image folder with no val/ or test/ (index)", [str(no_val), "--quiet"], 3,
             "has train/ but no val/ or test/ folder", module="index"),
        Case("a truncated dataset cache (not an error: rebuilt)", [f"data.cache_dir={root / 'cache'}",
             "train.max_steps=1", f"output_dir={root / 'cache-run'}"], 0, "is unreadable (SafetensorError); rebuilding",
             prefix="alexdist: dataset cache",
             normalize=lambda m: re.sub(r"synthetic-[0-9a-f]+", "synthetic-<hash>", m)),
        Case("fp16 without a GPU", ["precision=fp16"], 4, "precision=fp16 needs a GPU"),
        Case("float64 under DeepSpeed", ["precision=fp64", "distributed.strategy=deepspeed"], 4,
             "precision=fp64 is not supported by DeepSpeed"),
        Case("LARS under DeepSpeed", ["optim.name=lars", "distributed.strategy=deepspeed"], 4,
             "optim.name=lars is not supported by DeepSpeed"),
        Case("a dataset too large for memory at its image size", ["data.synthetic_train=100000",
             "data.image_size=512", f"output_dir={root / 'too-large'}"], 3, "lower data.image_size",
             normalize=lambda m: re.sub(r"about [0-9.]+ GiB .* than the [0-9.]+ GiB", "about <n> GiB in memory "
                                        "(decoded, plus the training copies), more than the <m> GiB", m)),
        Case("output_dir that cannot be written", [f"output_dir={a_file}/run"], 5, "is not writable"),
        Case("disk full while saving a checkpoint", ["checkpoint.every_steps=2", "train.max_steps=6",
             f"output_dir={full}"], 5, "No space left on device", env={"ALEXDIST_FAULT": "enospc:4"},
             after=after_full),
        Case("resume with another model", ["model.name=alexnet_3x3", f"output_dir={other_model}"], 5,
             "model.name: 'alexnet_bn' -> 'alexnet_3x3'", after=_unchanged(other_model, snapshot(other_model))),
        Case("resume with other data", ["data.synthetic_train=512", f"output_dir={other_data}"], 5,
             "data.synthetic_train: 256 -> 512", after=_unchanged(other_data, snapshot(other_data))),
        Case("resume at another image size", ["data.image_size=40", f"output_dir={other_size}"], 5,
             "data.image_size: 32 -> 40", after=_unchanged(other_size, snapshot(other_size))),
        Case("resume with another validation split", ["data.val_split=0.1", f"output_dir={other_split}"], 5,
             "data.val_split: None -> 0.1", after=_unchanged(other_split, snapshot(other_split))),
        Case("resume with another optimizer", ["optim.name=adamw", f"output_dir={other_optim}"], 5,
             "optim.name: 'sgd' -> 'adamw'", after=_unchanged(other_optim, snapshot(other_optim))),
        Case("resume with another learning rate and schedule", ["optim.lr=0.5", "schedule.name=constant",
             f"output_dir={other_lr}"], 5, "checkpoint.allow_config_change=true to train with the new ones from step 2",
             after=_unchanged(other_lr, snapshot(other_lr))),
        Case("a validation split that leaves a class without validation images", ["data.val_split=3",
             f"output_dir={root / 'tiny-split'}"], 3, "with no validation images",
             normalize=lambda m: re.sub(r"class '\d+' \(\d+ training", "class '<k>' (<n> training", m)),
        Case("a checkpoint of another model, change allowed on purpose", ["model.name=alexnet_3x3",
             "checkpoint.allow_config_change=true", f"output_dir={other_allowed}"], 5, "could not load checkpoint",
             after=_unchanged(other_allowed, snapshot(other_allowed)),
             normalize=lambda m: re.sub(r"\(RuntimeError: .*\); resume", "(RuntimeError: ...); resume", m)),
        Case("the only checkpoint damaged after its save (a truncated shard)", [f"output_dir={trunc_shard}"], 5,
             "every checkpoint in"),
        Case("resuming from a damaged checkpoint by path (a truncated optimizer file)",
             [f"output_dir={trunc_opt}", f"checkpoint.resume={_ckpt(trunc_opt)}"], 5,
             "optimizer.bin has 100 bytes"),
        Case("a truncated shard in a checkpoint without a manifest (older alexdist)", [f"output_dir={old_shard}"],
             5, "could not load checkpoint"),
        Case("a truncated optimizer file in a checkpoint without a manifest", [f"output_dir={old_opt}"], 5,
             "is not a readable torch file"),
        Case("a crafted pickle in a checkpoint", [f"output_dir={crafted}"], 5, "would import posix.system",
             after=no_pwned),
        Case("a crafted pickle in a ZeRO checkpoint (export)",
             [str(_ckpt(crafted_zero)), str(root / "out.safetensors")],
             5, "would import posix.system", module="export", after=no_pwned),
        Case("a truncated weights file (evaluate)", [str(weights)], 3, "is not a readable safetensors file",
             module="evaluate"),
        Case("a directory that is neither a checkpoint nor a run (export)", [str(neither), str(root / "x.st")], 3,
             "is neither a checkpoint nor a run directory", module="export"),
        Case("a ZeRO-3 checkpoint on another world size", ["distributed.strategy=deepspeed",
             "distributed.deepspeed.zero_stage=3", "train.global_batch=64", f"output_dir={zero3_moved}"], 4,
             "holds ZeRO-3 partitions for 2 processes, this run has 1",
             after=_unchanged(zero3_moved, snapshot(zero3_moved))),
        Case("a ZeRO-3 checkpoint resumed with ZeRO-2", ["distributed.strategy=deepspeed",
             "distributed.deepspeed.zero_stage=2", "train.global_batch=64", f"output_dir={zero3_stage}"], 4,
             "was written by ZeRO-3, this run uses ZeRO-2", after=_unchanged(zero3_stage, snapshot(zero3_stage))),
        Case("a ZeRO checkpoint on another world size with another effective batch",
             ["distributed.strategy=deepspeed", f"output_dir={zero_batch}"], 2,
             "was trained with an effective batch of", after=_unchanged(zero_batch, snapshot(zero_batch))),
        Case("EMA with ZeRO-3", ["distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=3",
             "train.ema_decay=0.99", f"output_dir={root / 'ema-zero3'}"], 4,
             "train.ema_decay is not supported with ZeRO-3", nproc=2),
        Case("SyncBatchNorm on a CPU", ["model.sync_bn=true", f"output_dir={root / 'sync-bn'}"], 4,
             "model.sync_bn needs GPUs"),
        Case("a tracker that is not installed", ["tracking.log_with=[mlflow]", f"output_dir={root / 'tracker'}"],
             4, "pip install mlflow"),
        Case("a missing image (predict)", [str(root / "no-such.png"), "--weights", str(base / "model.safetensors")],
             3, "does not exist", module="predict"),
        Case("ONNX export of a file that is not a weights file", [str(weights), "--onnx", str(root / "x.onnx")], 3,
             "is not a readable safetensors file", module="export"),
        Case("NaN loss that does not go away", ["checkpoint.every_steps=2", "train.max_bad_steps=3",
             f"output_dir={diverge}"], 6, "for 3 optimizer steps in a row (steps 5-7",
             env={"ALEXDIST_FAULT": "nan:5-"}, after=after_diverge),
        Case("a rank that dies", [f"output_dir={root / 'dies'}"], 1, "lost contact with the other processes",
             nproc=2, env={"ALEXDIST_FAULT": "train:3:1"}, normalize=lambda m: lost_peer.sub("(...); the run", m)),
    ]


def _run(case: Case, cache_dir: Path) -> subprocess.CompletedProcess:
    env = run_env(cache_dir, **case.env)
    if case.module == "train":
        overrides = case.args if case.recipe else BASE + case.args
        recipe = case.recipe or "recipes/quickstart.yaml"
        cmd = launch_command(overrides, case.nproc, recipe=recipe)
        if case.nproc == 1 and "distributed.strategy=deepspeed" in case.args:
            cmd = launch_command(overrides, 1, launcher="torchrun", recipe=recipe)
    else:
        cmd = [sys.executable, "-m", "alexdist", case.module, *case.args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _slow(case: Case) -> bool:
    """Starts DeepSpeed or a second process (10-20 s where a refusal before training takes 2)."""
    return case.nproc > 1 or "distributed.strategy=deepspeed" in case.args


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("errors")
    with ThreadPoolExecutor(2) as pool:
        made = [pool.submit(_zero_run, root, cache_dir, 3), pool.submit(_zero_run, root, cache_dir, 2),
                pool.submit(_base_run, root, cache_dir)]
        zero3, zero, base = (f.result() for f in made)
        cases = _cases(root, base, zero, zero3)
        assert [c.title for c in cases] == TITLES
        # The slow cases first, so that the quick ones fill in at the end and both threads finish together.
        order = sorted(cases, key=lambda c: not _slow(c))
        done = dict(zip((c.title for c in order), pool.map(lambda c: _run(c, cache_dir), order), strict=True))
    return root, [(c, done[c.title]) for c in cases]


def _message(proc: subprocess.CompletedProcess, prefix: str = "alexdist: error: ") -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0].removeprefix("alexdist: error: ")


@pytest.mark.parametrize("title", TITLES)
def test_a_bad_input_gets_one_line_an_exit_code_and_damages_nothing(outcomes, title):
    root, results = outcomes
    case, proc = next((c, p) for c, p in results if c.title == title)
    msg = _message(proc, case.prefix)
    # Single-process runs exit with the error's own code; a launcher reports a failed worker as 1.
    code = case.exit_code if case.nproc == 1 and "distributed.strategy=deepspeed" not in case.args else 1
    assert proc.returncode == code, (proc.returncode, msg)
    assert case.expect in msg, msg
    assert "Traceback" not in proc.stderr or case.nproc > 1 or "deepspeed" in " ".join(case.args)
    if case.after:
        case.after(root)


def _render(root: Path, results) -> str:
    rows = []
    for case, proc in results:
        msg = _message(proc, case.prefix).replace(str(root), "<dir>").replace(str(ROOT), ".")
        if case.normalize:
            msg = case.normalize(msg)
        msg = msg.replace("|", "\\|")
        rows.append(f"| {case.title} | {case.exit_code} | {msg} |")
    return (
        "# Errors and what to do about them\n\n"
        "Every message alexdist prints for a bad input or a failed run, with its exit code (the code of the "
        "training process, which `alexdist launch` exits with; a bare `accelerate launch` or `torchrun` reports any "
        "failed process as 1). "
        "Generated from the runs in `tests/e2e/test_error_messages.py`, which fails when this file drifts from what "
        "the code prints; `ALEXDIST_UPDATE_DOCS=1 pytest tests/e2e/test_error_messages.py` rewrites it. "
        "`<dir>` stands for the "
        "test's directory. Exit code 75 is not an error: the run stopped on request and resumes.\n\n"
        "| situation | exit | message (printed after `alexdist: error: ` unless it starts with `alexdist:`) |\n"
        "|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def test_docs_errors_md_lists_every_message(outcomes):
    text = _render(*outcomes)
    if os.environ.get("ALEXDIST_UPDATE_DOCS"):
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(text)
    assert DOC.is_file() and DOC.read_text() == text, "docs/errors.md is out of date: rerun with ALEXDIST_UPDATE_DOCS=1"


