"""ZeRO broadcasts no buffers of its own; alexdist broadcasts rank 0's BatchNorm statistics where they are read
(before an evaluation and before a checkpoint), all of them in one call, never per micro-batch. (That a ZeRO-2
kill and resume stays bit-identical, statistics included, is tests/e2e/test_resume.py's.)"""

from helpers import worker_report


def test_zero_broadcasts_the_statistics_once_per_save_and_evaluation_and_never_in_a_step(tmp_path):
    r = worker_report("zero_buffers_worker.py", str(tmp_path / "run"))
    # 4 optimizer steps of 2 micro-batches: none (it was one broadcast per buffer per micro-batch: 8 x 24).
    assert r["steps"] == []
    assert r["save"] == [r["buffers"]] and r["evaluation"] == [r["buffers"]]  # one call carrying every buffer
