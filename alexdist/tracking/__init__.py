"""What a run records and shows: the run log (runlog.py), trackers and W&B's mode (trackers.py), progress,
profiling, figures, and comparing runs (compare.py)."""
