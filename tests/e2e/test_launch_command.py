"""`alexdist launch` with 2 CPU processes: a bad input anywhere is one line and alexdist's exit code (a bare
`accelerate launch` prints the line, then Accelerate's defaults warning and torchrun's ChildFailedError report,
and exits 1); a stop request is 75 and the same command resumes; Ctrl-C checkpoints; a terminal still gets the
progress bar."""

import fcntl
import os
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

from helpers import ROOT, run_env, summary, wait_for_step

from alexdist.distributed.launcher import free_port


def _command(*args: str) -> list[str]:
    # As the Makefile's quickstart, with a rendezvous port of its own (other tests may be launching meanwhile).
    return [sys.executable, "-m", "alexdist", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            "quickstart", *args]


def _run(args: list[str], cache_dir, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(*args), cwd=ROOT, env=run_env(cache_dir, CUDA_VISIBLE_DEVICES="", **env),
                          capture_output=True, text=True, timeout=300, check=False)


def _one_line(proc: subprocess.CompletedProcess, says: str) -> None:
    assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr[-3000:]
    assert proc.stderr.startswith(f"alexdist: error: {says}"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout and "ChildFailedError" not in proc.stderr + proc.stdout


def test_a_bad_override_is_one_line_and_exit_2_before_any_process_starts(tmp_path, cache_dir):
    started = time.monotonic()
    proc = _run(["train.epoch=5", f"output_dir={tmp_path / 'run'}"], cache_dir)
    took = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-3000:]
    _one_line(proc, "unknown key 'train.epoch'; did you mean 'train.epochs'?")
    assert not (tmp_path / "run").exists() and proc.stdout == ""
    print(f"\nbad override refused in {took:.1f} s")
    assert took < 5  # a launch takes 8 s or more to fail: here no process was started


def test_a_missing_dataset_inside_the_ranks_is_one_line_and_exit_3(tmp_path, cache_dir):
    proc = _run(["data.source=/nonexistent", f"output_dir={tmp_path / 'run'}"], cache_dir)
    assert proc.returncode == 3, proc.stderr[-3000:]
    _one_line(proc, "data.source '/nonexistent' does not exist")


def test_a_stop_request_exits_75_and_the_same_command_resumes_and_finishes(tmp_path, cache_dir):
    run = tmp_path / "run"
    args = ["train.max_steps=10", "tracking.wandb=false", f"output_dir={run}"]
    stopped = _run(args, cache_dir, ALEXDIST_FAULT="stop:3")
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert stopped.stderr == "" and summary(run)["status"] == "stopped"
    resumed = _run(args, cache_dir, ALEXDIST_FAULT="stop:3")  # step 3 is behind it now
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and summary(run)["status"] != "stopped"


def test_ctrl_c_makes_every_rank_checkpoint_and_exit_75(tmp_path, cache_dir):
    run = tmp_path / "run"
    proc = subprocess.Popen(_command("train.max_steps=400", "train.log_every=1", "tracking.wandb=false",
                                     f"output_dir={run}"), cwd=ROOT,
                            env=run_env(cache_dir, CUDA_VISIBLE_DEVICES=""), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while not (run / "metrics.jsonl").is_file() and proc.poll() is None:  # fail at once if it did not start
        time.sleep(0.2)
    wait_for_step(run, 5)
    os.kill(proc.pid, signal.SIGINT)
    _out, err = proc.communicate(timeout=180)
    assert proc.returncode == 75, err[-3000:]
    assert summary(run)["status"] == "stopped" and "Traceback" not in err


def test_a_short_run_in_a_terminal_exits_0_with_the_progress_bar_and_nothing_of_the_launchers(tmp_path, cache_dir):
    terminal, ranks_side = os.openpty()
    fcntl.ioctl(ranks_side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(_command("train.max_steps=2", f"output_dir={tmp_path / 'run'}"), cwd=ROOT,
                            env=run_env(cache_dir, CUDA_VISIBLE_DEVICES=""), stdout=subprocess.PIPE,
                            stderr=ranks_side)
    os.close(ranks_side)
    shown: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(terminal, 65536)
            except OSError:  # EIO: every writer has gone
                return
            if not data:
                return
            shown.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    out, _ = proc.communicate(timeout=300)
    reader.join(30)
    os.close(terminal)
    err = b"".join(shown).decode(errors="replace")
    assert proc.returncode == 0, err[-3000:]
    assert "epoch 1:" in err and "/22 [" in err, err  # the ranks saw a terminal: tqdm's bar, not log lines
    assert "The following values were not passed" not in err and "alexdist: done at step 2" in out.decode()
