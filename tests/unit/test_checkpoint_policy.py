"""The checkpointer's decisions (pure functions): when to save, which checkpoints rotation keeps, and which
recipe changes make a checkpoint another run's."""

import json
from dataclasses import asdict

import pytest
import yaml

from alexdist.checkpoint.config_changes import config_changes, refusal
from alexdist.checkpoint.policy import keep_after_rotation, save_due
from alexdist.config import CheckpointConfig, load_recipe


def _due(cfg, step, step_in_epoch, steps_per_epoch=10, **kw):
    return save_due(cfg, steps_per_epoch, step, step_in_epoch, **kw)


def test_every_steps_saves_after_those_steps_and_leaves_epoch_ends_to_the_evaluated_save():
    cfg = CheckpointConfig(every_steps=5, at_epoch_end=True)
    assert [s for s in range(1, 31) if _due(cfg, s, (s - 1) % 10 + 1)] == [5, 15, 25]  # 10, 20, 30 end epochs
    assert _due(cfg, 10, 0, epoch_end=True)  # ...and are saved after their evaluation


def test_without_epoch_end_saves_every_steps_covers_epoch_boundaries_too():
    cfg = CheckpointConfig(every_steps=5, at_epoch_end=False)
    assert [s for s in range(1, 31) if _due(cfg, s, (s - 1) % 10 + 1)] == [5, 10, 15, 20, 25, 30]
    assert not _due(cfg, 10, 0, epoch_end=True)


def test_nothing_but_epoch_ends_by_default_and_a_stopping_run_always_saves():
    cfg = CheckpointConfig()
    assert not any(_due(cfg, s, (s - 1) % 10 + 1) for s in range(1, 31))
    assert _due(cfg, 7, 7, stopping=True)
    assert _due(CheckpointConfig(at_epoch_end=False), 7, 7, stopping=True)


@pytest.mark.parametrize("steps, keep, want", [
    ([(10, None), (20, 0.5), (30, None), (40, 0.4)], 2, {30, 40, 20}),  # newest 2 + the best (20)
    ([(10, 0.5), (20, 0.5), (30, None)], 1, {30, 10}),  # ties: the first of the best, as selection picks it
    ([(10, None), (20, None), (30, None)], 2, {20, 30}),  # no accuracy recorded: newest only
    ([(10, 0.9), (20, 0.1)], 5, {10, 20}),
])
def test_rotation_keeps_the_newest_and_the_best_by_test_accuracy(steps, keep, want):
    assert keep_after_rotation(steps, keep) == want


def test_resume_changes_are_sorted_into_run_defining_training_and_free_keys(tmp_path):
    ckpt = tmp_path / "step-0000010"
    ckpt.mkdir()
    saved = load_recipe("quickstart")
    (ckpt / "config.yaml").write_text(yaml.safe_dump(saved.to_dict()))
    free = load_recipe("quickstart", ["train.max_steps=9", "train.log_every=3", "tracking.wandb=false",
                                      "checkpoint.every_steps=5", "speed.channels_last=true", "train.grad_accum=2"])
    changes = config_changes(ckpt, free)
    assert changes.guarded == [] and len(changes.free) == 6 and refusal(ckpt, changes, 10) is None
    training = load_recipe("quickstart", ["train.epochs=40", "optim.lr=0.01", "schedule.name=constant",
                                          "train.seed=3", "augment.crop_padding=3", "model.dropout=0.1",
                                          "train.grad_clip=1", "train.label_smoothing=0.1", "precision=bf16"])
    changes = config_changes(ckpt, training)
    assert changes.defining == [] and len(changes.training) == 9
    line = refusal(ckpt, changes, 10)
    assert "optim.lr: 0.05 -> 0.01" in line and "train.epochs: 12 -> 40" in line and "from step 10" in line
    other = load_recipe("quickstart", ["model.name=alexnet_3x3", "data.source=synthetic", "optim.name=adamw"])
    changes = config_changes(ckpt, other)
    assert changes.defining == ["model.name: 'alexnet_bn' -> 'alexnet_3x3'", "data.source: 'digits' -> 'synthetic'",
                                "optim.name: 'sgd' -> 'adamw'"]
    assert "another model, data or optimizer" in refusal(ckpt, changes, 10)
    assert config_changes(tmp_path / "no-config", other).guarded == []  # nothing to compare with


def _amendable(tmp_path, world_size=2):
    """A checkpoint as a stop request leaves it (no evaluation), with its manifest, and a one-process
    Checkpointer that resumed from it on another world size."""
    import json
    from dataclasses import asdict
    from types import SimpleNamespace

    from alexdist.checkpoint.checkpointer import Checkpointer
    from alexdist.checkpoint.manifest import write_manifest
    from alexdist.checkpoint.state import TrainState

    ckpt = tmp_path / "checkpoints" / "step-0000022"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    saved = TrainState(global_step=22, step_in_epoch=22, world_size=world_size, epoch_sums=[1.0, 2.0, 3.0])
    (ckpt / "trainer_state.json").write_text(json.dumps(asdict(saved)))
    write_manifest(ckpt)
    accelerator = SimpleNamespace(is_main_process=True, num_processes=1, device="cpu")
    strategy = SimpleNamespace(register_checkpoint_hooks=lambda *a: None)
    recipe = load_recipe("quickstart", [f"output_dir={tmp_path}"])
    checkpointer = Checkpointer(accelerator, recipe, strategy, None, None, 22)
    checkpointer.resumed_from = ckpt
    return checkpointer, ckpt


def test_a_checkpoint_saved_before_its_evaluation_gains_it_and_keeps_what_its_tensors_were_saved_with(tmp_path):
    from alexdist.checkpoint.manifest import damage
    from alexdist.checkpoint.state import TrainState, read_state

    checkpointer, ckpt = _amendable(tmp_path, world_size=2)
    evaluated = TrainState(global_step=22, epoch=1, step_in_epoch=0, world_size=1, test_acc=0.9, best_acc=0.9,
                           best_epoch=1, selection_acc=0.9)
    assert checkpointer.save(evaluated) is None  # the step's checkpoint exists: not written again
    state = read_state(ckpt)
    assert (state.test_acc, state.best_epoch, state.epoch, state.step_in_epoch) == (0.9, 1, 1, 0)
    assert state.world_size == 2  # the partitions are still cut for the world size that saved them
    assert damage(ckpt) is None
    # A crash between the manifest and the state file: the old state file still passes the manifest.
    (ckpt / "trainer_state.json").write_text(json.dumps(asdict(TrainState(global_step=22, step_in_epoch=22,
                                                                          world_size=2, epoch_sums=[1.0, 2.0, 3.0]))))
    assert damage(ckpt) is None
    (ckpt / "trainer_state.json").write_text("{}")
    assert damage(ckpt) is not None  # (the control: anything else is damage)


def test_a_checkpoint_this_attempt_did_not_resume_from_is_never_amended(tmp_path):
    from alexdist.checkpoint.state import TrainState, read_state

    checkpointer, ckpt = _amendable(tmp_path)
    checkpointer.resumed_from = tmp_path / "checkpoints" / "step-0000010"  # rewound: another run's step 22
    assert checkpointer.save(TrainState(global_step=22, test_acc=0.5)) is None
    assert read_state(ckpt).test_acc is None
