"""One run per run directory, and a damaged checkpoint that does not stop a requeued job."""

from __future__ import annotations

import json
import os
import time

from alexdist.checkpoint.run_dir import LOCK_FILE, STALE_S, RunLock, takeover_reason, this_run


def _holder(**kw):
    return {**this_run(), **kw}


def test_a_second_run_is_refused_naming_the_holder_and_the_first_keeps_the_directory(tmp_path):
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    assert first.acquire() is None
    second.me = {**second.me, "pid": first.me["pid"] + 1, "slurm_job": "999"}
    refused = second.acquire()
    assert refused and f"pid {first.me['pid']}" in refused and "in use by another run" in refused
    assert "\n" not in refused
    second.release()  # not the holder: releasing changes nothing
    assert (tmp_path / LOCK_FILE).is_file()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_who_may_take_a_held_directory_over():
    me = this_run()
    # The same Slurm job (requeued), even from another host and while the lock is fresh.
    assert takeover_reason(_holder(host="node9", slurm_job="42"), 1.0, {**me, "slurm_job": "42"})
    # This host, the holder's process gone (a crash).
    assert takeover_reason(_holder(pid=2**22 + 12345), 1.0, me) == "its process is gone"
    # This host, the holder alive: no.
    assert takeover_reason(_holder(pid=os.getpid()), 1.0, {**me, "pid": os.getpid() + 1}) is None
    # Another host: only once the lock has not been refreshed for STALE_S (a lost node).
    assert takeover_reason(_holder(host="node9"), 5.0, me) is None
    assert takeover_reason(_holder(host="node9"), STALE_S + 1, me)
    assert takeover_reason(None, 0.0, me)  # a lock file cut short by a crash


def test_a_pid_in_another_pid_namespace_says_nothing_about_the_holder():
    """Two containers on one host (or with the host's hostname) share a run directory: a pid read from the other
    namespace may be free here, or an unrelated live process. Only the heartbeat decides."""
    me = this_run()
    assert me["pid_ns"] and me["pid_ns"].startswith("pid:[")
    other = _holder(pid_ns="pid:[1]", pid=2**22 + 12345)  # gone here, but here is not its namespace
    assert takeover_reason(other, 5.0, me) is None
    assert takeover_reason(other, STALE_S + 1, me)


def test_torchruns_default_run_id_identifies_no_job(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # `--rdzv-id` not given: shared by unrelated jobs
    assert this_run()["elastic_run"] is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    assert this_run()["elastic_run"] == "job-7"


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps(_holder(pid=2**22 + 12345)))
    lock = RunLock(tmp_path)
    assert lock.acquire() is None
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_fresh_lock_is_refreshed_while_held(tmp_path, monkeypatch):
    import alexdist.checkpoint.run_dir as rundir

    monkeypatch.setattr(rundir, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path)
    assert lock.acquire() is None
    path = tmp_path / LOCK_FILE
    os.utime(path, (time.time() - 1000, time.time() - 1000))
    deadline = time.time() + 30  # however busy the machine: the holder's thread gets to run within this
    while time.time() - path.stat().st_mtime > 5 and time.time() < deadline:
        time.sleep(0.05)
    assert time.time() - path.stat().st_mtime < 5  # the holder's thread touched it
    lock.release()
