"""Put on PYTHONPATH by tests/e2e/test_process_imports.py: every process of a launched run (launcher and ranks)
appends the name of each module in ALEXDIST_IMPORT_WATCH that it really imports (its code executed, not merely
looked up as Accelerate's `importlib.util.find_spec` checks do) to the file ALEXDIST_IMPORT_LOG, one write each,
so that nothing is lost when a process leaves through os._exit (which `-X importtime`'s buffered output is)."""

import os
import sys

WATCH = set(os.environ.get("ALEXDIST_IMPORT_WATCH", "").split(","))
LOG = os.environ.get("ALEXDIST_IMPORT_LOG")


class _Probe:
    def find_spec(self, name, path=None, target=None):
        if name not in WATCH or not LOG:
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            with open(LOG, "a") as f:
                f.write(f"{os.getpid()} {name}\n")
            return run(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Probe())
