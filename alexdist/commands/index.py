"""`alexdist index SOURCE`: index a data set for streaming: check every image (without decoding it) and record
where each one's bytes are, once, in the cache every rank and node reads. Resumable: run it again after an
interruption or a fix, and only what changed is checked again."""

from __future__ import annotations

import argparse
import sys
import time

from alexdist.errors import run_command


def main(argv: list[str] | None = None, prog: str = "alexdist index") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split(": ", 1)[1])
    ap.add_argument("source", help="an ImageNet-layout folder (train/CLASS/*, val/CLASS/*), the Hub's parquet "
                                   "layout (train-*.parquet, validation-*.parquet) or WebDataset tar shards")
    ap.add_argument("--skip-corrupt", action="store_true",
                    help="leave out (and count) unreadable images instead of refusing the data (data.skip_corrupt)")
    ap.add_argument("--cache-dir", default=None,
                    help="where the index is kept (data.cache_dir; default $ALEXDIST_CACHE or ~/.cache/alexdist); "
                         "on a cluster, a folder every node sees")
    ap.add_argument("--workers", type=int, default=None, choices=range(0, 65), metavar="N",
                    help="processes checking images (default: the cores, at most 8; 0: this process)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    def body() -> int:
        from alexdist.config import DataConfig
        from alexdist.data.index import build_index

        cfg = DataConfig(source=args.source, skip_corrupt=args.skip_corrupt, cache_dir=args.cache_dir,
                         workers=args.workers)
        start = time.perf_counter()
        try:
            idx = build_index(cfg, progress=not args.quiet)
        except KeyboardInterrupt:
            print(f"alexdist: interrupted; the parts checked so far are kept: `alexdist index {args.source}` "
                  f"again goes on from there", file=sys.stderr)
            return 130
        skipped = f", {idx.skipped:,} unreadable skipped" if idx.skipped else ""
        print(f"indexed {args.source} ({idx.layout}): train {len(idx.train):,} and test {len(idx.test):,} images, "
              f"{len(idx.classes):,} classes{skipped}; index {idx.path.parent} "
              f"({time.perf_counter() - start:.1f} s)")
        return 0

    return run_command(body)
