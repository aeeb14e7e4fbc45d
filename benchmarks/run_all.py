"""Run the benchmarks and write benchmarks/results/SUMMARY.md with the headline ratios.

    .venv/bin/python benchmarks/run_all.py           # data pipeline, step overhead (noise scale too), scaling,
                                                     # 2 vs 1 process
    .venv/bin/python benchmarks/run_all.py --all     # + ZeRO memory and stop latency (about 5 more minutes)
    .venv/bin/python benchmarks/run_all.py --summary # only rewrite SUMMARY.md from the JSON results

Each benchmark writes benchmarks/results/NAME.json (figures, machine, commit, command) and NAME.md. Nothing
here is part of the test suite: this machine's timings are noisy, so results are ratios measured side by side.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import RESULTS, ROOT, env

PERFORMANCE = ["data_pipeline", "step_overhead", "noise_scale_overhead", "scaling", "distributed_overhead"]
OTHERS = ["zero_memory", "stop_latency"]


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _machines() -> list[str]:
    """Each result's own machine (results are rerun one at a time, so they may come from different machines)."""
    seen: dict[str, list[str]] = {}
    for path in sorted(RESULTS.glob("*.json")):
        m = json.loads(path.read_text()).get("_machine")
        if m:
            seen.setdefault(f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}", []).append(path.stem)
    return [f"- {where}: {', '.join(names)}" for where, names in seen.items()]


def summary() -> str:
    lines = ["# Benchmark summary", "", "Regenerate: `python benchmarks/run_all.py`. Details and each result's own "
             "commit in the NAME.md files beside this one. Ratios are measured within one run on one machine; the "
             "machines the results come from:", "", *_machines(), "",
             "| benchmark | figure | goal | met |", "|---|---|---|---|"]
    if d := _load("data_pipeline"):
        for size in ("32px", "227px"):
            r = d[size]
            goal = ">= 20x" if size == "32px" else "-"
            met = ("yes" if r["ratio"] >= 20 else "no") if size == "32px" else "-"
            lines.append(f"| data pipeline vs torchvision+PIL (2 workers), {size} | {r['ratio']:.1f}x "
                         f"({r['alexdist_images_per_s']:,.0f} vs {r['torchvision_images_per_s']:,.0f} img/s) "
                         f"| {goal} | {met} |")
    if d := _load("step_overhead"):
        for name, r in d.items():
            if not name.startswith("_"):
                lines.append(f"| step time, alexdist loop / bare loop, {name} | {r['step_time_ratio']:.3f} | <= 1.05 | "
                             f"{'yes' if r['step_time_ratio'] <= 1.05 else 'no'} |")
    if d := _load("noise_scale_overhead"):
        for name, r in d.items():
            if not name.startswith("_"):
                ratio = r["step_time_ratio"]
                lines.append(f"| step time with / without the gradient noise scale, {name} | {ratio:.3f} | <= 1.02 "
                             f"| {'yes' if ratio <= 1.02 else 'no'} |")
    if d := _load("distributed_overhead"):
        for name, r in d.items():
            if not name.startswith("_"):
                lines.append(f"| 2 processes / 1 process images/s, {name}, 2 CPU cores | {r['ratio']:.2f} "
                             "| report | - |")
    if d := _load("scaling"):
        for name, r in d.items():
            if name.startswith("_") or name == "ceilings":
                continue
            best = max(r["batch_scaling"], key=lambda x: x["gflop_per_s"])
            acc = r["accumulation"]
            fraction = f" ({best['of_matmul']:.2f} of matmul)" if "of_matmul" in best else ""
            lines.append(f"| {name} @ {r['input_size']} px: best achieved GFLOP/s (batch {best['batch']}); "
                         f"img/s at accumulation 4 / 1 | {best['gflop_per_s']:.1f}{fraction}; "
                         f"{acc[-1]['images_per_s'] / acc[0]['images_per_s']:.2f} | report | - |")
    if d := _load("stop_latency"):
        lines.append("| stop request -> checkpointed exit | see stop_latency.md | <= 1 step + 1 save | see file |")
    if _load("zero_memory"):
        lines.append("| ZeRO memory per rank | see zero_memory.md | ZeRO-3 < ZeRO-2 < DDP | see file |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "SUMMARY.md").write_text(text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--all", action="store_true", help="also the ZeRO memory and stop latency benchmarks")
    ap.add_argument("--summary", action="store_true", help="only rewrite SUMMARY.md")
    args = ap.parse_args()
    if not args.summary:
        for name in PERFORMANCE + (OTHERS if args.all else []):
            t0 = time.time()
            cmd = (["bash", "benchmarks/zero_memory.sh"] if name == "zero_memory"
                   else [sys.executable, f"benchmarks/{name}.py"])
            print(f"== {name}: {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, cwd=ROOT, env=env(), check=True)
            print(f"== {name}: {time.time() - t0:.0f} s", flush=True)
    print(summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
