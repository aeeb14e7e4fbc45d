"""`alexdist launch [ACCELERATE-LAUNCH OPTIONS] RECIPE [key=value ...]`: `accelerate launch -m alexdist.train`
that keeps alexdist's promise of one line per error and its exit codes.

    alexdist launch --multi_gpu --num_processes 2 quickstart                # 2 CPU processes (gloo)
    alexdist launch --multi_gpu --num_processes 8 bn precision=bf16        # 8 GPUs
    alexdist launch --config_file recipes/accelerate/zero2.yaml bn         # DeepSpeed ZeRO-2

The recipe and overrides are checked here, before any process starts. Then `accelerate launch` runs with the
same options; what the processes print passes through, without Accelerate's list of the defaults it used and
torchrun's report of a failed process (the process has said why in one line). The exit code is the training's:
0 done, 2 recipe, 3 data, 4 setup, 5 checkpoint, 6 diverged, 75 stopped on request (the same command resumes),
1 anything else (docs/errors.md). Ctrl-C, SIGTERM, SIGHUP and SIGUSR1 write output_dir/STOP: the processes
checkpoint at the end of their step and stop (75); a second Ctrl-C or SIGTERM stops them at once.
`accelerate launch --help` lists the options.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

from alexdist.config import load_recipe, sweep_output_dir
from alexdist.errors import run_command

USAGE = "usage: alexdist launch [ACCELERATE-LAUNCH OPTIONS] RECIPE [key=value ...]"
# `accelerate launch`'s options that take no value; every other option takes one (tests/unit checks this
# against Accelerate's own parser), so the first word after the options is the recipe.
FLAGS = {
    "-q", "--quiet", "--cpu", "--multi_gpu", "--tpu", "--enable_cpu_affinity", "--dynamo_use_fullgraph",
    "--dynamo_use_dynamic", "--dynamo_use_regional_compilation", "--use_deepspeed", "--use_fsdp",
    "--use_parallelism_config", "--use_megatron_lm", "--same_network", "-m", "--module", "--no_python",
    "--tpu_cluster", "--no_tpu_cluster", "--tpu_use_sudo", "--downcast_bf16", "--fp8_use_autocast_during_eval",
    "--debug", "-h", "--help",
}
OURS = {"-m", "--module", "--no_python", "--no-python"}  # alexdist launch adds `-m alexdist.train` itself


def is_flag(option: str) -> bool:
    """Whether an `accelerate launch` option takes no value (Accelerate spells each with - or _)."""
    return option in FLAGS or option.replace("-", "_").replace("__", "--", 1) in FLAGS


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(accelerate launch's options, [RECIPE, key=value ...]): the options are the words before the first one
    that is neither an option nor an option's value."""
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        i += 1 if "=" in argv[i] or is_flag(argv[i]) else 2
    return argv[:i], argv[i:]


def command_line_problem(options: list[str], args: list[str]) -> str | None:
    """What is wrong with the command line, in one line with its fix; None if nothing."""
    # Only the words that are options: their values may hold dots (--config_file a.yaml, --main_process_ip 10.0.0.1).
    dashed = ([o for o in options if o.startswith("-") and "." in o.partition("=")[0]]
              + [w for w in args[1:] if w.startswith("-")])
    if ours := [o for o in options if o.partition("=")[0] in OURS]:
        return f"alexdist launch runs `-m alexdist.train` itself: leave out {ours[0]}"
    if dashed:  # habits from jsonargparse / Lightning: --train.epochs=5
        bad = dashed[0]
        fix = bad.lstrip("-") if "=" in bad else f"{bad.lstrip('-')}=VALUE"
        return f"unknown option {bad}: overrides are key=value without dashes; write {fix}"
    if not args:
        return ("alexdist launch needs a recipe after the launcher's options: a shipped recipe's name (`alexdist "
                "recipes` lists them) or a recipe YAML file, e.g. alexdist launch --multi_gpu --num_processes 2 "
                "quickstart")
    return None


def main(argv: list[str] | None = None, prog: str = "alexdist launch") -> int:
    options, args = split_arguments(list(sys.argv[1:] if argv is None else argv))
    if {"-h", "--help"} & set(options):
        print(f"{USAGE}\n\n{__doc__.strip()}")
        return 0
    if problem := command_line_problem(options, args):
        print(f"alexdist: error: {problem}", file=sys.stderr)
        return 2

    def body() -> int:
        # The ranks print the recipe's deprecation notices; printed here as well, they would show twice.
        with contextlib.redirect_stderr(io.StringIO()):
            recipe = load_recipe(args[0], args[1:])
        sweep_output_dir(recipe)  # where the ranks look for STOP under `wandb agent`
        from alexdist.distributed.launch_supervisor import supervise
        from alexdist.distributed.launcher import accelerate_launch

        return supervise(accelerate_launch(options, args), Path(recipe.output_dir) / "STOP")

    return run_command(body)

