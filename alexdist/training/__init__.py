"""Training: `setup` builds a Run (setup.py, run.py), the loop runs it (loop.py), with its optimizer and
schedule (optim.py), precision, EMA, divergence guard, stop requests and evaluation during training."""
