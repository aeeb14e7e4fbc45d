"""`accelerate launch -m alexdist.train RECIPE [key=value ...]`: the training entry point users launch.

The command is alexdist/commands/train.py; the loop is alexdist/training/loop.py.
"""

import os

# The launcher's pid, read before anything else: if the launcher dies from here on, the parent changes.
_PARENT_AT_START = os.getppid()

from alexdist.distributed.processes import die_with_launcher  # noqa: E402

die_with_launcher(_PARENT_AT_START)  # before the heavy imports: a launcher killed meanwhile must not leave us behind

from alexdist.commands.train import main  # noqa: E402

if __name__ == "__main__":
    from alexdist.distributed.launcher import record_exit_code
    from alexdist.distributed.processes import exit_now

    code = main()
    record_exit_code(code)  # for `alexdist launch`: torchrun reports any failure as 1
    exit_now(code)
