"""What a run leaves for others: the weights file (weights.py), a Hub folder (hub.py), ONNX (onnx.py), and
evaluating or predicting from weights, checkpoints or run directories (export.py, evaluation.py,
prediction.py)."""
