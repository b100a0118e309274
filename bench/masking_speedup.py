"""Train-step speedup from dropping image patches, against the analytic FLOP ratio.

Times the real partitioned train step (`flip.trainer.Trainer`, AdamW, contrastive loss, state
donated) of one model at several mask ratios, alternating between the ratios in rounds on one
shared train state, and prints per ratio: kept image tokens, step FLOPs (`flip.flops`, fwd+bwd =
3x forward matmul FLOPs), median step time, images/s, measured speedup over ratio 0, the FLOP
ratio, and measured / FLOP ratio (goal >= 0.95 at every ratio); the same speedup from process
CPU time is printed beside it (robust to other jobs on a shared machine).

Usage: python bench/masking_speedup.py [--model sbs|demo|tiny] [--ratios 0 0.5 0.75 0.9]
                                       [--rounds 3] [--steps 2] [--dtype float32|bfloat16]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# pylint: disable=g-import-not-at-top,wrong-import-position
import bench_utils
from flip import flops

GOAL_FRACTION_OF_FLOP_RATIO = 0.95  # the goal in docs/BENCHMARKS.md


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="sbs", choices=bench_utils.MODEL_PRESETS)
  parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5, 0.75, 0.9])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=2, help="timed steps per ratio per round")
  parser.add_argument("--batch_size", type=int, default=0, help="0 = the preset's")
  parser.add_argument("--dtype", default="", help="config.dtype (empty: the preset's)")
  return parser.parse_args(argv)


def run(args) -> dict:
  if args.ratios[0] != 0.0:
    raise ValueError("--ratios must start with 0 (the reference)")
  bench_utils.print_header(f"masking speedup, model {args.model}, dtype "
                           f"{args.dtype or 'of the preset'}")
  runners = {}
  for ratio in args.ratios:
    config = bench_utils.preset_config(args.model, ratio)
    if args.batch_size:
      config.batch_size = args.batch_size
    if args.dtype:
      config.dtype = args.dtype
    runners[ratio] = bench_utils.StepRunner(config)
  first = runners[args.ratios[0]]
  dims = flops.dims_from_config(first.config)
  batch = first.config.batch_size
  print(f"batch {batch}, {args.rounds} rounds x {args.steps} steps per ratio, alternating; "
        f"FLOPs: matmuls only, fwd+bwd = {flops.TRAIN_STEP_FORWARD_MULTIPLE} x forward")
  holder = {"state": first.init_state()}

  def step_fn(runner):
    def fn():
      holder["state"] = runner.step(holder["state"])
    return fn

  cpu = {}
  times = bench_utils.time_alternating({r: step_fn(runners[r]) for r in args.ratios},
                                       rounds=args.rounds, steps_per_round=args.steps,
                                       cpu_times=cpu)
  base_time = bench_utils.median(times[0.0])
  base_cpu = bench_utils.median(cpu[0.0])
  print(f"{'mask':>5} {'tokens':>6} {'GFLOP/step':>10} {'step (median, min-max)':>26} "
        f"{'img/s':>7} {'speedup':>7} {'FLOP ratio':>10} {'measured/FLOP':>13} goal "
        f"{'cpu-time speedup':>16} {'cpu/FLOP':>8}")
  results = {}
  for ratio in args.ratios:
    step_time = bench_utils.median(times[ratio])
    speedup = base_time / step_time
    flop_ratio = flops.flop_ratio(dims, batch, ratio)
    fraction = speedup / flop_ratio
    met = "yes" if fraction >= GOAL_FRACTION_OF_FLOP_RATIO or ratio == 0.0 else "no"
    cpu_speedup = base_cpu / bench_utils.median(cpu[ratio])
    results[ratio] = dict(step_time=step_time, speedup=speedup, flop_ratio=flop_ratio,
                          fraction=fraction, cpu_speedup=cpu_speedup)
    print(f"{ratio:>5.2f} {dims.image_tokens(ratio):>6d} "
          f"{flops.train_step_flops(dims, batch, ratio) / 1e9:>10.1f} "
          f"{bench_utils.spread(times[ratio]):>26} {batch / step_time:>7.1f} {speedup:>7.2f} "
          f"{flop_ratio:>10.2f} {fraction:>13.2f} {met:>4} {cpu_speedup:>16.2f} "
          f"{cpu_speedup / flop_ratio:>8.2f}")
  return results


def main(argv=None):
  return run(parse_args(argv))


if __name__ == "__main__":
  main()
