"""Which errors mean "another process died or hung" (the one-line lost-contact message) and which are shown as
they are: an NCCL error is not by itself a lost peer."""




def test_every_process_group_deepspeed_made_gets_the_step_timeout_at_the_first_step(tmp_path):
    """ZeRO reduces on groups of its own (`new_group`, torch's default timeout); a hung peer must be noticed after
    distributed.step_timeout_s on those too, not after 10 or 30 minutes."""
    from helpers import run_env, worker_report

    report = worker_report("timeout_worker.py", str(tmp_path / "run"), env=run_env(tmp_path / "cache"))
    assert len(report["after"]) >= 2  # the default group and DeepSpeed's own
    assert any(t != 42 for t in report["before"])  # set up with other timeouts (the control)
    assert report["after"] == [42.0] * len(report["after"])
