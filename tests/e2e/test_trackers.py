"""Any of Accelerate's trackers beside W&B (tracking.log_with): TensorBoard offline, read back from its event
files, records the same values as metrics.jsonl; a tracker whose package is missing stops the run in one line."""

import pytest
from helpers import check, launch, read_jsonl


def test_tensorboard_event_files_hold_the_values_of_metrics_jsonl(tmp_path, cache_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    check(launch(["tracking.log_with=[wandb,tensorboard]", "tracking.wandb=true", "train.max_steps=30",
                  "train.log_every=5", f"output_dir={run}"], cache_dir, nproc=2))
    events = EventAccumulator(str(run / "tensorboard" / "alexdist"))
    events.Reload()
    logged = read_jsonl(run / "metrics.jsonl")
    for kind, key in [("test", "acc"), ("test", "loss"), ("train", "loss"), ("step", "loss"), ("step", "lr")]:
        want = [(e["step"], e[key]) for e in logged if e["event"] == kind]
        got = [(s.step, s.value) for s in events.Scalars(f"{kind}/{key}")]
        assert want and [s for s, _ in got] == [s for s, _ in want], (kind, key)
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # TensorBoard keeps float32
    assert (run / "wandb").is_dir()  # W&B ran beside it


