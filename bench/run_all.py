"""Runs every benchmark (`make bench`), each script in its own process, and prints their tables.

Full run: the side-by-side model of docs/BENCHMARKS.md (masking speedup, open_clip comparison,
MFU, the step profile (compile time, page faults), memory on 8 simulated devices, scaling plan
with its small-scale check), the loss-memory and input-pipeline benchmarks, the bfloat16 matmul
table and the float32-vs-bfloat16 step. `--quick`: the same
scripts on the tiny/demo presets with one round each (minutes, for checking that everything runs;
its numbers mean little). A script that fails is reported and the others still run; the exit
status is non-zero if any failed.

Usage: python bench/run_all.py [--quick] [--only masking_speedup mfu ...]
"""

import argparse
import os
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)

FULL = {
    "masking_speedup": ["--model", "sbs"],
    "openclip_side_by_side": ["--model", "sbs"],
    "mfu": ["--model", "sbs"],
    "step_profile": ["--model", "sbs", "--cache"],
    "memory": ["--model", "sbs"],
    "scaling_plan": ["--check_model", "sbs"],
    "loss_memory": [],
    "input_pipeline": [],
    "precision_dots": [],
    "precision_step": ["--model", "demo", "--ratios", "0.5"],
}
QUICK = {
    "masking_speedup": ["--model", "demo", "--rounds", "1", "--steps", "1"],
    "openclip_side_by_side": ["--model", "tiny", "--rounds", "1", "--steps", "1",
                              "--inference_batches", "1"],
    "mfu": ["--model", "demo", "--matmuls", "3", "--rounds", "1"],
    "step_profile": ["--model", "tiny", "--steps", "2"],
    "memory": ["--model", "tiny", "--steps", "0"],
    "scaling_plan": ["--check_model", "tiny"],
    "loss_memory": ["--batch", "1024"],
    "input_pipeline": ["--image_sizes", "28", "--formats", "tfrecord", "--batches", "5",
                       "--steps", "2"],
    "precision_dots": ["--small", "--rounds", "1"],
    "precision_step": ["--model", "tiny", "--rounds", "1", "--steps", "1"],
}


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--only", nargs="+", choices=sorted(FULL), default=None)
  return parser.parse_args()


def main():
  args = parse_args()
  plan = QUICK if args.quick else FULL
  names = args.only or list(plan)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
  failed = []
  for name in names:
    command = [sys.executable, os.path.join(BENCH_DIR, f"{name}.py")] + plan[name]
    print(f"\n$ {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    status = subprocess.call(command, cwd=REPO_ROOT, env=env)
    print(f"({name}: exit {status}, {time.perf_counter() - start:.0f} s)", flush=True)
    if status:
      failed.append(name)
  if failed:
    print(f"failed: {', '.join(failed)}")
    sys.exit(1)


if __name__ == "__main__":
  main()
