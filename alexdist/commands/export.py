"""`alexdist export`: one weights file (safetensors, no pickle) from a checkpoint, a run or a weights file.

    alexdist export runs/bn/checkpoints/step-0039000 bn.safetensors
    alexdist export runs/bn bn.safetensors                        # a run directory: its final weights
    alexdist export runs/bn/model.safetensors --onnx bn.onnx --hub-dir hub/bn

DDP checkpoints hold (possibly sharded) safetensors weights; ZeRO-1/2/3 checkpoints hold DeepSpeed's
partitions, which DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint` merges into fp32 weights; FSDP
checkpoints hold DCP shards, which DCP reads into the whole model in one process (checkpoint/consolidate.py).
The file is the format of `alexdist.checkpoint.weights`, the same as the final weights a run writes.
"""

from __future__ import annotations

import argparse

from alexdist.artifacts.export import load_source
from alexdist.checkpoint.weights import save_weights
from alexdist.errors import run_command


def main(argv: list[str] | None = None, prog: str = "alexdist export") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="a checkpoints/step-* directory, a run's output_dir, or a weights file")
    ap.add_argument("out", nargs="?", help="output .safetensors file")
    ap.add_argument("--onnx", metavar="FILE", help="also write an ONNX model (checked with onnxruntime)")
    ap.add_argument("--hub-dir", metavar="DIR", help="also write a Hub model folder (weights, config.json, model card)")
    args = ap.parse_args(argv)
    if not (args.out or args.onnx or args.hub_dir):
        ap.error("give OUT.safetensors, --onnx FILE or --hub-dir DIR")

    def body() -> int:
        if args.onnx:  # before any work: a missing extra must not leave OUT written and the ONNX file not
            from alexdist.artifacts.onnx import require_onnx

            require_onnx()
        weights, meta, source = load_source(args.source)
        if args.onnx or args.hub_dir:
            from alexdist.checkpoint.weights import pipeline_of

            pipeline_of(meta)  # a file whose pipeline is unknown is refused before anything is written
        n = sum(v.numel() for v in weights.values())
        if args.out:
            out = save_weights(args.out, weights, meta)
            print(f"alexdist: exported {meta['model']} ({n:,} values, step {meta['step']}) to {out}")
        if args.onnx:
            from alexdist.artifacts.onnx import export_onnx

            diff = export_onnx(weights, meta, args.onnx)
            print(f"alexdist: wrote {args.onnx} (onnxruntime vs PyTorch logits: max difference {diff:.1e})")
        if args.hub_dir:
            from alexdist.artifacts.hub import write_hub_dir
            from alexdist.artifacts.weights_evaluation import evaluate_weights

            out = write_hub_dir(source, weights, meta, evaluate_weights(source), args.hub_dir)
            print(f"alexdist: wrote the Hub folder {out} (publish it with: hf upload USER/REPO {out} .)")
        return 0

    return run_command(body)
