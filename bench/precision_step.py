"""The real train step in float32 and in bfloat16 (flip.models.precision), alternating in one run.

For a model preset and each mask ratio, builds the partitioned train step (`flip.trainer.Trainer`)
with `config.dtype` float32 and bfloat16, times them in alternating rounds (median step), and
prints images/s of each and bfloat16 / float32 (the speedup the precision gives on this machine).
Used for the default precision of the demo and the CPU configs (docs/BENCHMARKS.md).
`--config FILE` times any experiment's train step instead of a preset (e.g.
configs/cfg_mae_demo.py, cfg_linprobe_demo.py, cfg_finetune_demo.py: their own batch and model;
random data, mask ratios then the config's own).

Usage: python bench/precision_step.py [--model demo|sbs|tiny | --config FILE] [--ratios 0 0.5]
                                      [--rounds 3] [--steps 2]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# pylint: disable=g-import-not-at-top,wrong-import-position
import bench_utils

DTYPES = ("float32", "bfloat16")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="demo", choices=bench_utils.MODEL_PRESETS)
  parser.add_argument("--config", default="", help="a config file instead of a preset")
  parser.add_argument("--ratios", type=float, nargs="+", default=None,
                      help="mask ratios (default: the preset's own)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
  return parser.parse_args(argv)


def run(args) -> dict:
  bench_utils.print_header(
      f"train step float32 vs bfloat16, {args.config or 'model ' + args.model}")
  if args.config and args.ratios:
    raise ValueError("--ratios applies to the FLIP presets (--model), not to --config")
  ratios = args.ratios or [None]
  runners, states = {}, {}
  for ratio in ratios:
    for dtype in DTYPES:
      if args.config:
        config = bench_utils.config_from_file(args.config)
      else:
        config = bench_utils.preset_config(args.model, ratio)
      config.dtype = dtype
      runners[(ratio, dtype)] = bench_utils.StepRunner(config)
  for dtype in DTYPES:
    states[dtype] = runners[(ratios[0], dtype)].init_state()

  def step_fn(ratio, dtype):
    def fn():
      states[dtype] = runners[(ratio, dtype)].step(states[dtype])
    return fn

  cpu = {}
  times = bench_utils.time_alternating(
      {key: step_fn(*key) for key in runners}, rounds=args.rounds, steps_per_round=args.steps,
      warmup=2, cpu_times=cpu)
  batch = next(iter(runners.values())).config.batch_size
  print(f"batch {batch}; {args.rounds} rounds x {args.steps} steps per variant, alternating")
  print(f"{'mask':>6} {'fp32 img/s':>10} {'bf16 img/s':>10} {'bf16/fp32':>9} {'cpu-time ratio':>14}")
  results = {}
  for ratio in ratios:
    t32 = bench_utils.median(times[(ratio, "float32")])
    t16 = bench_utils.median(times[(ratio, "bfloat16")])
    c32 = bench_utils.median(cpu[(ratio, "float32")])
    c16 = bench_utils.median(cpu[(ratio, "bfloat16")])
    label = "preset" if ratio is None else f"{ratio:.2f}"
    results[label] = dict(fp32=batch / t32, bf16=batch / t16, ratio=t32 / t16)
    print(f"{label:>6} {batch / t32:>10.1f} {batch / t16:>10.1f} {t32 / t16:>9.2f} "
          f"{c32 / c16:>14.2f}")
  return results


def main(argv=None):
  return run(parse_args(argv))


if __name__ == "__main__":
  main()
