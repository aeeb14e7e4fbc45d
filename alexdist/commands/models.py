"""`alexdist models`: the registered models with their parameters and FLOPs per image."""

from __future__ import annotations

import argparse

from alexdist.models import describe_models


def main(argv: list[str] | None = None, prog: str = "alexdist models") -> int:
    ap = argparse.ArgumentParser(prog=prog, description="List the registered models.")
    ap.add_argument("--input-size", type=int, default=None, help="input size for all models (default: each model's)")
    args = ap.parse_args(argv)
    print(f"{'model':<13} {'input':>5} {'params':>12} {'GFLOPs/img':>10}  description")
    for r in describe_models(args.input_size):
        print(f"{r['name']:<13} {r['input_size']:>5} {r['params']:>12,} {r['gflops']:>10.3f}  {r['summary']}")
    return 0
