"""Talking to launchers: what TorchElastic says of this attempt, and the commands that start alexdist the way a
user would (tests, benchmarks and the GPU check all launch through `launch_command`). The rank and world size
the launcher announced are alexdist/ranks.py's.

Nothing here imports torch: the command builder runs in lightweight driver scripts.
"""

from __future__ import annotations

import os
import socket
import sys

from alexdist.ranks import launch_rank


def free_port() -> int:
    """A TCP port that is free on loopback right now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(
    args: list[str],
    nproc: int = 1,
    launcher: str = "accelerate",
    config_file: str | None = None,
    python: str | None = None,
) -> list[str]:
    """The command that runs `alexdist.train ARGS` the way a user starts it.

    - `config_file`: `accelerate launch --config_file FILE --num_processes N` (e.g. a DeepSpeed config);
    - `launcher="accelerate"`, N > 1: `accelerate launch --multi_gpu --num_processes N` (on a CPU machine,
      `--multi_gpu` is what starts N gloo ranks; `--cpu` would start one);
    - `launcher="accelerate1"`: `accelerate launch --num_processes 1` (Accelerate's non-distributed mode);
    - `launcher="torchrun"`: `torchrun --nproc_per_node N`;
    - otherwise (or `launcher="python"`): plain `python -m alexdist.train`.
    Each distributed launch gets its own free rendezvous port, so several can run side by side.
    """
    py = python or sys.executable
    if config_file:
        cmd = [py, "-m", "accelerate.commands.launch", "--config_file", config_file, "--num_processes", str(nproc),
               "--main_process_port", str(free_port())]
    elif launcher == "accelerate" and nproc > 1:
        cmd = [py, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port())]
    elif launcher == "accelerate1":
        cmd = [py, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    elif launcher == "torchrun":
        cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    else:
        cmd = [py]
    return [*cmd, "-m", "alexdist.train", *args]


def accelerate_launch(options: list[str], args: list[str], python: str | None = None) -> list[str]:
    """`accelerate launch OPTIONS -m alexdist.train ARGS` as `alexdist launch` runs it: with this Python, and
    `--quiet` (the one-process launcher would otherwise repeat the rank's stderr in a CalledProcessError)."""
    quiet = [] if {"-q", "--quiet"} & set(options) else ["--quiet"]
    py = python or sys.executable
    return [py, "-m", "accelerate.commands.launch", *options, *quiet, "-m", "alexdist.train", *args]


# The file `alexdist launch` reads its ranks' exit codes from. torchrun reports any failed worker as exit 1; its
# report gives the worker's code, but as text that differs per launcher and torch version, and not at all on
# success: a line per rank in a file of our own is what survives every launcher.
EXIT_CODES_ENV = "ALEXDIST_EXIT_CODES"


def record_exit_code(code: int) -> None:
    """Append `RANK CODE ATTEMPT` to the file `alexdist launch` named, if any (ATTEMPT: TorchElastic's restart
    count, so that a restarted group's codes replace the failed round's). One short O_APPEND write per rank: the
    lines do not interleave, and their order is the order the ranks ended in."""
    path = os.environ.get(EXIT_CODES_ENV)
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # never created here: a stale name must not leave files
    except OSError:
        return
    try:
        os.write(fd, f"{launch_rank()} {code} {elastic_facts()['restart_count']}\n".encode())
    finally:
        os.close(fd)


def train_command(world: int) -> str:
    """This training run's command as a user would type it (recorded in summary.json and the model card): the
    recipe and overrides this process got, under `accelerate launch` with the run's number of processes."""
    import shlex

    args = sys.argv[1:]
    if args[:1] == ["train"]:  # `alexdist train ...`
        args = args[1:]
    launch = "accelerate launch" + (f" --multi_gpu --num_processes {world}" if world > 1 else "")
    return f"{launch} -m alexdist.train {shlex.join(args)}"


def elastic_facts() -> dict[str, int]:
    """What TorchElastic (torchrun's agent) says of this attempt: how many times the group was restarted, the
    limit, and how many agents (nodes) formed it; zeros outside torchrun."""
    env = os.environ
    return {"restart_count": int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
            "max_restarts": int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")),
            "nodes": int(env.get("GROUP_WORLD_SIZE", "1"))}


def shared_store_warning() -> str | None:
    """torch's c10d rendezvous shares its store with the workers (TORCHELASTIC_USE_AGENT_STORE) and keeps it
    across rounds. Two agents can restart a different number of times (a membership change restarts without
    counting), so their workers read different rounds' keys and the new group hangs forming (seen with torch
    2.14: gloo `connectFullMesh` to a dead worker's address). With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 each
    round's rank 0 hosts a fresh store instead."""
    env = os.environ
    restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restarts > 0 and int(env.get("GROUP_WORLD_SIZE", "1")) > 1:
        return ("torchrun restarts this job on several agents with the rendezvous store shared: a restart can hang "
                "forming the new group; start every agent with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/clusters.md)")
    return None
