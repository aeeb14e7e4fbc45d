"""`alexdist predict`: the top classes of image files, from a weights file, a checkpoint or a run directory.

    alexdist predict cat.png truck.jpg --weights runs/bn --top-k 3
"""

from __future__ import annotations

import argparse
import json

from alexdist.artifacts.prediction import predict
from alexdist.errors import run_command


def main(argv: list[str] | None = None, prog: str = "alexdist predict") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    ap.add_argument("--weights", required=True,
                    help="a weights file (a run's model.safetensors or an export), a checkpoint or a run directory")
    ap.add_argument("--top-k", type=int, default=3, help="how many classes to show per image (default 3)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per image")
    args = ap.parse_args(argv)

    def body() -> int:
        for r in predict(args.images, args.weights, args.top_k):
            if args.json:
                print(json.dumps(r))
            else:
                print(f"{r['image']}: " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"]))
        return 0

    return run_command(body)
