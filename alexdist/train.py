"""`accelerate launch -m alexdist.train RECIPE [key=value ...]`: the training entry point users launch.

The command is alexdist/commands/train.py; the loop is alexdist/training/loop.py.
"""

from alexdist.distributed.processes import die_with_launcher

die_with_launcher()  # before the heavy imports: a launcher killed meanwhile must not leave this worker behind

from alexdist.commands.train import main  # noqa: E402

if __name__ == "__main__":
    from alexdist.distributed.collectives import exit_now

    exit_now(main())
