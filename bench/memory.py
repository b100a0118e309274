"""Peak memory per device of the train step for remat none/minimal/actcp x partition_states off/on.

On `--devices` simulated CPU devices (8 by default, data parallel), compiles the real partitioned
train step (`flip.trainer.Trainer`, state donated) of a model preset for every combination and reads
XLA's memory analysis of the per-device program: arguments (train state + batch shard), temporaries
(activations, gradients, workspace) and peak = arguments + outputs - donated aliases +
temporaries. Ratios are to remat none without partition_states. With `--steps > 0` it also times
the steps (alternating, median) for the step-time cost of each setting (on simulated devices
sharing the host's cores: ratios only). Goal (docs/BENCHMARKS.md): actcp + partition_states cut the peak by
>= 40 % at <= 30 % step-time cost.

Usage: python bench/memory.py [--model sbs|demo|tiny] [--devices 8] [--batch_size 0]
                              [--steps 1] [--rounds 2]
"""

import argparse
import os
import sys


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="sbs", choices=("sbs", "demo", "tiny"))
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=0, help="0 = the preset's")
  parser.add_argument("--steps", type=int, default=1, help="timed steps per setting and round")
  parser.add_argument("--rounds", type=int, default=2)
  return parser.parse_args(argv)


def set_device_count(devices: int) -> None:
  """Simulated CPU devices; must run before jax is imported (else the count must already fit)."""
  if "jax" in sys.modules:
    return
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={devices}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


# FLIP's remat names: minimal saves the weight-matmul outputs; actcp (= full, like any other name)
# is full per-block rematerialisation.
REMATS = ("none", "minimal", "actcp")
GOAL_PEAK_CUT = 0.40
GOAL_MAX_TIME_COST = 0.30
MIB = 2 ** 20


def configure(model: str, remat: str, partition_states: bool, batch_size: int):
  import bench_utils  # pylint: disable=g-import-not-at-top
  config = bench_utils.preset_config(model)
  for tower in (config.model.model_img, config.model.model_txt):
    tower.transformer.remat_policy = remat
  config.partitioning.partition_states = partition_states
  if batch_size:
    config.batch_size = batch_size
  return config


def compiled_memory(runner) -> dict:
  """XLA's per-device memory analysis of the runner's partitioned train step, in bytes."""
  import jax  # pylint: disable=g-import-not-at-top
  trainer = runner.trainer
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
           for k, v in runner.task.batch_spec(runner.config.batch_size).items()}
  compiled = trainer.p_train_step.lower(trainer.state_shape, batch).compile()
  analysis = compiled.memory_analysis()
  out = dict(arguments=analysis.argument_size_in_bytes, outputs=analysis.output_size_in_bytes,
             aliased=analysis.alias_size_in_bytes, temporaries=analysis.temp_size_in_bytes)
  out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
  return out


def run(args) -> dict:
  set_device_count(args.devices)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  import bench_utils  # pylint: disable=g-import-not-at-top
  bench_utils.print_header(f"train-step memory per device, model {args.model}")
  settings = [(remat, ps) for ps in (False, True) for remat in REMATS]
  runners, memory = {}, {}
  for remat, ps in settings:
    runner = bench_utils.StepRunner(configure(args.model, remat, ps, args.batch_size))
    runners[(remat, ps)] = runner
    memory[(remat, ps)] = compiled_memory(runner)
  times = {}
  if args.steps > 0:
    holders = {}
    for key, runner in runners.items():
      holders[key] = runner.init_state()

    def step_fn(key):
      def fn():
        holders[key] = runners[key].step(holders[key])
      return fn

    times = bench_utils.time_alternating({k: step_fn(k) for k in runners}, rounds=args.rounds,
                                         steps_per_round=args.steps)
  first = runners[settings[0]]
  print(f"{args.devices} devices (data parallel), global batch {first.config.batch_size}, "
        f"mask ratio {first.config.model.model_img.mask_ratio}; MiB per device")
  print(f"{'remat':<6} {'part_states':<11} {'arguments':>9} {'temps':>8} {'peak':>8} "
        f"{'peak ratio':>10} {'step':>22} {'time ratio':>10}")
  base = memory[settings[0]]["peak"]
  base_time = bench_utils.median(times[settings[0]]) if times else None
  results = {}
  for key in settings:
    m = memory[key]
    step = f"{bench_utils.spread(times[key])}" if times else "-"
    time_ratio = bench_utils.median(times[key]) / base_time if times else float("nan")
    results[key] = dict(m, peak_ratio=m["peak"] / base, time_ratio=time_ratio)
    print(f"{key[0]:<6} {str(key[1]):<11} {m['arguments'] / MIB:>9.1f} "
          f"{m['temporaries'] / MIB:>8.1f} {m['peak'] / MIB:>8.1f} {m['peak'] / base:>10.2f} "
          f"{step:>22} {time_ratio:>10.2f}")
  goal = results[("actcp", True)]
  cut = 1.0 - goal["peak_ratio"]
  print(f"actcp + partition_states: peak cut {100 * cut:.0f} % (goal >= "
        f"{100 * GOAL_PEAK_CUT:.0f} %), step-time cost "
        f"{100 * (goal['time_ratio'] - 1):.0f} % (goal <= {100 * GOAL_MAX_TIME_COST:.0f} %)")
  return results


def main(argv=None):
  return run(parse_args(argv))


if __name__ == "__main__":
  main()
