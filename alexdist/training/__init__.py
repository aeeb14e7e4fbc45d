"""Training: `build_run` builds a Run (build_run.py, run.py, run_data.py), the loop runs it (loop.py, epoch_end.py),
with its optimizer and schedule (optim.py), precision, EMA, divergence guard, stop requests, the gradient noise
scale and evaluation during training."""
