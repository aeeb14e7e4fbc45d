"""`alexdist launch` in this process: its command line, the launcher's reports it drops, the exit code it ends
with and the signals it passes on (the launched runs are in tests/e2e/test_launch_command.py)."""

import signal

import pytest

from alexdist import cli
from alexdist.commands.launch import FLAGS, is_flag, split_arguments
from alexdist.distributed import launch_supervisor
from alexdist.distributed.launch_output import LauncherOutput
from alexdist.distributed.launch_supervisor import PassOn, final_exit_code, read_exit_codes
from alexdist.distributed.launcher import EXIT_CODES_ENV, accelerate_launch, record_exit_code

TWO_CPU_PROCESSES = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                     "--dynamo_backend", "no"]

# What `accelerate launch --multi_gpu --num_processes 2 -m alexdist.train quickstart train.epoch=5` printed on
# stderr (accelerate 1.15, torch 2.14), shortened where marked.
RULE = "=" * 60
BARE = "".join(line + "\n" for line in [
    "The following values were not passed to `accelerate launch` and had defaults used instead:",
    "\t`--num_machines` was set to a value of `1`",
    "\t`--mixed_precision` was set to a value of `'no'`",
    "\t`--dynamo_backend` was set to a value of `'no'`",
    "To avoid this warning pass in values for each of the problematic parameters or run `accelerate config`.",
    "alexdist: error: unknown key 'train.epoch'; did you mean 'train.epochs'?",
    "W1207 14:50:36.853000 25670 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 25682 "
    "closing signal SIGTERM",
    "E1207 14:50:36.917000 25670 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 2) "
    "local_rank: 0 (pid: 25681) of binary: /work/main/.venv/bin/python3",
    "Traceback (most recent call last):",
    '  File "/work/main/.venv/bin/accelerate", line 8, in <module>',
    "    sys.exit(main())",
    "             ^^^^^^",
    '  File "/work/main/.venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 386, in '
    "launch_agent",
    "    raise ChildFailedError(",
    "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
    RULE,
    "alexdist.train FAILED",
    "-" * 60,
    "Failures:",
    "[1]:",
    "  exitcode  : -15 (pid: 25682)  (SIGTERM)",
    "-" * 60,
    "Root Cause (first observed failure):",
    "[0]:",
    "  exitcode  : 2 (pid: 25681) ",
    "  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html",
    RULE,
])
ONE_LINE = "alexdist: error: unknown key 'train.epoch'; did you mean 'train.epochs'?\n"


def test_the_recipe_is_the_first_word_after_accelerate_launchs_options():
    assert split_arguments([*TWO_CPU_PROCESSES, "quickstart", "train.epochs=5"]) == (
        TWO_CPU_PROCESSES, ["quickstart", "train.epochs=5"])
    assert split_arguments(["--config_file", "recipes/accelerate/zero2.yaml", "bn"]) == (
        ["--config_file", "recipes/accelerate/zero2.yaml"], ["bn"])
    assert split_arguments(["--num_processes=2", "--multi-gpu", "-q", "bn", "x=1"]) == (
        ["--num_processes=2", "--multi-gpu", "-q"], ["bn", "x=1"])
    assert split_arguments(["bn"]) == ([], ["bn"])
    assert accelerate_launch(["--cpu"], ["bn"], python="py") == [
        "py", "-m", "accelerate.commands.launch", "--cpu", "--quiet", "-m", "alexdist.train", "bn"]


def test_it_knows_every_accelerate_launch_option_that_takes_no_value():
    from accelerate.commands.launch import launch_command_parser

    actions = [a for a in launch_command_parser()._actions if a.option_strings]
    assert {s for a in actions if a.nargs == 0 for s in a.option_strings if "-" not in s.lstrip("-")} == FLAGS
    assert all(is_flag(s) == (a.nargs == 0) for a in actions for s in a.option_strings)


def test_a_bad_override_stops_in_one_line_before_any_process_starts(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(launch_supervisor, "supervise", lambda *a: pytest.fail("a process was started"))
    code = cli.main(["launch", *TWO_CPU_PROCESSES, "quickstart", "train.epoch=5", f"output_dir={tmp_path / 'run'}"])
    assert (code, capsys.readouterr().err) == (2, ONE_LINE)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("argv", "says"), [
    ([*TWO_CPU_PROCESSES, "quickstart", "--train.epochs=5"], "unknown option --train.epochs=5: overrides are "
     "key=value without dashes; write train.epochs=5"),
    (["--multi_gpu", "--train.epochs=5", "quickstart"], "unknown option --train.epochs=5"),
    (["-m", "alexdist.train", "quickstart"], "alexdist launch runs `-m alexdist.train` itself: leave out -m"),
    (TWO_CPU_PROCESSES, "alexdist launch needs a recipe after the launcher's options"),
])
def test_a_command_line_mistake_gets_one_line_with_its_fix(argv, says, capsys):
    assert cli.main(["launch", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"alexdist: error: {says}") and err.count("\n") == 1


def test_help_names_the_command_as_typed(capsys):
    assert cli.main(["launch", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: alexdist launch [ACCELERATE-LAUNCH OPTIONS] RECIPE")


def test_the_launchers_reports_are_dropped_and_whatever_the_ranks_print_is_kept():
    out = LauncherOutput()
    shown = "".join(out.feed(BARE[i:i + 97]) for i in range(0, len(BARE), 97)) + out.close()
    assert shown == ONE_LINE
    assert "exitcode  : 2" in "".join(out.dropped) and "closing signal" in "".join(out.dropped)
    # Under --quiet the report comes without its traceback; a rank's own traceback and blank lines stay.
    rank = "step 1\n\nTraceback (most recent call last):\n  File \"x.py\", line 1\n    f()\nValueError: boom\n"
    report = BARE[BARE.index(RULE):]
    out = LauncherOutput()
    assert out.feed(rank + "\n" + report + "after\n") + out.close() == rank + "after\n"
    out = LauncherOutput()
    assert out.feed("====\nnot a report\n\n") + out.close() == "====\nnot a report\n\n"


def test_a_peers_lost_contact_after_a_ranks_error_line_is_dropped_and_shown_when_it_is_the_only_line():
    error = "alexdist: error: data.source '/nonexistent' does not exist; give an existing folder\n"
    lost = "alexdist: error: rank 1 lost contact with the other processes (Connection closed by peer)\n"
    out = LauncherOutput()
    assert out.feed(error + lost) == error and out.dropped == [lost]
    out = LauncherOutput()  # rank 0 SIGKILLed: the peer's line is all there is
    assert out.feed(lost + lost.replace("rank 1", "rank 2")) == lost


def test_a_progress_bar_passes_as_soon_as_the_stream_pauses():
    out = LauncherOutput()
    assert out.feed("\repoch 1:  10%|#  | 1/10") == ""
    assert out.flush_partial() == "\repoch 1:  10%|#  | 1/10"
    assert out.feed("\repoch 1:  20%|## | 2/10") == "\repoch 1:  20%|## | 2/10"  # the rest of the line, as it comes
    assert out.feed("\r\nalexdist: done\n") == "\r\nalexdist: done\n"
    assert out.feed("Trace") == "" and out.flush_partial() == ""  # may begin a report: held until its line ends
    assert out.feed("back (most recent call last):\n  File\nValueError: x\n") == (
        "Traceback (most recent call last):\n  File\nValueError: x\n")


def test_the_run_ends_with_the_first_failing_ranks_code_and_never_0_for_a_failed_launcher(tmp_path, monkeypatch):
    codes = tmp_path / "codes"
    codes.touch()
    monkeypatch.setenv(EXIT_CODES_ENV, str(codes))
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    for rank, code in [(0, 3), (1, 1)]:
        monkeypatch.setenv("RANK", str(rank))
        record_exit_code(code)
    assert codes.read_text() == "0 3 0\n1 1 0\n" and read_exit_codes(codes) == [3, 1]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    record_exit_code(0)
    assert read_exit_codes(codes) == [0]  # a restarted round's codes replace the failed one's
    assert final_exit_code([3, 1], 1, None) == 3  # the rank that failed first; torchrun says 1
    assert final_exit_code([75, 75], 1, None) == 75  # a stop: Slurm requeues on 75
    assert final_exit_code([0, 0], 0, None) == 0 and final_exit_code([1, 0], 0, None) == 0
    assert final_exit_code([0, 0], 1, None) == 1  # every rank done, the launcher failed: not hidden
    assert final_exit_code([], -9, None) == 137 and final_exit_code([], 1, signal.SIGTERM) == 143
    monkeypatch.setenv(EXIT_CODES_ENV, str(tmp_path / "gone"))
    record_exit_code(2)  # a file that is not there is not created
    assert not (tmp_path / "gone").exists()


def test_a_first_stop_signal_writes_stop_and_a_second_is_passed_on_once(tmp_path, monkeypatch, capsys):
    """The first Ctrl-C / SIGTERM / SIGHUP (and SIGUSR1) write output_dir/STOP: the ranks checkpoint with no
    deadline; a signal to torchrun would SIGKILL them 30 s later. A second goes on once, as SIGTERM."""
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    sent = []
    monkeypatch.setattr(launch_supervisor.os, "killpg", lambda pgid, sig: sent.append((pgid, sig)))
    passing = PassOn(1234, tmp_path / "run" / "STOP")
    passing.on_signal(signal.SIGUSR1)
    assert (tmp_path / "run" / "STOP").is_file() and sent == [] and passing.signalled is None
    (tmp_path / "run" / "STOP").unlink()
    passing.on_signal(signal.SIGINT)
    assert (tmp_path / "run" / "STOP").is_file() and sent == []
    assert passing.signalled == signal.SIGINT and "save a checkpoint" in capsys.readouterr().err
    passing.on_signal(signal.SIGINT)
    passing.on_signal(signal.SIGTERM)
    passing.on_signal(signal.SIGINT)
    assert sent == [(1234, signal.SIGTERM)]  # once, and as SIGTERM: the ranks stop on it, not on SIGINT
    # A STOP file that cannot be written (a file where the folder should be): the signal goes on at once.
    (tmp_path / "blocked").write_text("")
    passing = PassOn(1234, tmp_path / "blocked" / "STOP")
    passing.on_signal(signal.SIGTERM)
    assert sent[-1] == (1234, signal.SIGTERM) and len(sent) == 2
    # Under Slurm, scancel signals every process of the step itself: nothing more is passed on.
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    sent.clear()
    passing = PassOn(1234, tmp_path / "slurm" / "STOP")
    passing.on_signal(signal.SIGTERM)
    assert sent == [] and (tmp_path / "slurm" / "STOP").is_file()


def test_dotted_values_of_launcher_options_are_not_taken_for_dashed_overrides():
    from alexdist.commands.launch import command_line_problem, split_arguments

    for argv in (["--config_file", "recipes/accelerate/zero2.yaml", "bn"],
                 ["--multi_gpu", "--main_process_ip", "10.0.0.1", "--num_processes", "2", "quickstart"]):
        assert command_line_problem(*split_arguments(argv)) is None, argv
    assert "unknown option --train.epochs=5" in command_line_problem(*split_arguments(["--train.epochs=5", "bn"]))
