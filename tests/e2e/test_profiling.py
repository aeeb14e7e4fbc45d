"""tracking.profile_steps writes a torch.profiler trace of those steps on rank 0; the summary has every rank's peak
memory."""

import json

from helpers import check, launch, summary


def test_a_trace_of_the_chosen_steps_is_written_on_rank_0_and_peak_memory_per_rank_recorded(tmp_path, cache_dir):
    run = tmp_path / "run"
    check(launch(["tracking.profile_steps=[3,4]", "train.max_steps=6", "tracking.wandb=false", f"output_dir={run}"],
                 cache_dir, nproc=2))
    traces = list((run / "profile").iterdir())
    assert [t.name for t in traces] == ["rank0.steps-3-4.pt.trace.json"]  # rank 0 only
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert any(n.startswith("aten::") and "conv" in n for n in names)  # the model's convolutions were traced
    assert any("Optimizer.step" in n for n in names)  # and the optimizer step
    peaks = summary(run)["peak_memory_bytes_per_rank"]
    assert len(peaks) == 2 and all(p > 50 * 2**20 for p in peaks)  # a rank with torch loaded is > 50 MiB


