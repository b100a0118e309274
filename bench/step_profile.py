"""Compile time, compile memory and steady-state cost of one train step, with host-side counters.

Builds the real train step of a model preset (`bench_utils.StepRunner`; the sbs model by default,
optionally with fewer layers), times the first call (compilation) and `--steps` further calls,
and prints per step: wall time, process user and kernel CPU seconds, and minor page faults (what
showed that XLA's per-step temporaries were faulted in afresh at every step: docs/BENCHMARKS.md,
"Host allocator and the non-finite guard"). `--trace DIR` writes a jax profiler trace of two more
steps (open with TensorBoard or Perfetto) and prints where their time went: per thunk kind, per
model part and pass, and the costliest instructions (bench/trace_summary.py). `--inference`
profiles the image tower's unmasked forward pass (what the side-by-side times as inference)
instead of the train step; `--dtype bfloat16` the mixed-precision step.

`--flip_root` imports `flip` (and the presets) from another checkout, so one command measures an
older commit against this one on the same machine, e.g.
  git archive <commit> | tar -x -C /tmp/old
  python bench/step_profile.py --flip_root /tmp/old; python bench/step_profile.py
The compilation cache is off unless `--cache` (a cached executable would hide the compile time).

Usage: python bench/step_profile.py [--model sbs] [--mask_ratio 0] [--img_layers 12]
                                    [--txt_layers 6] [--steps 6] [--trace DIR] [--flip_root DIR]
                                    [--dtype float32|bfloat16] [--inference] [--rows 20]
"""

import argparse
import os
import resource
import sys
import time


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="sbs", choices=("sbs", "demo", "tiny"))
  parser.add_argument("--mask_ratio", type=float, default=0.0)
  parser.add_argument("--img_layers", type=int, default=None, help="image tower depth (sbs)")
  parser.add_argument("--txt_layers", type=int, default=None, help="text tower depth (sbs)")
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--trace", default="", help="write a jax profiler trace here")
  parser.add_argument("--flip_root", default="", help="import flip from this checkout")
  parser.add_argument("--cache", action="store_true", help="use the bench compilation cache")
  parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                      help="compute dtype (default: the preset's)")
  parser.add_argument("--inference", action="store_true",
                      help="profile the image tower's forward pass instead of the train step")
  parser.add_argument("--rows", type=int, default=20, help="rows per table of the trace summary")
  return parser.parse_args(argv)


def _usage():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime, usage.ru_stime, usage.ru_minflt


def run(args) -> dict:
  if not args.cache:
    os.environ["FLIP_BENCH_CACHE_DIR"] = ""
  here = os.path.dirname(os.path.abspath(__file__))
  root = os.path.abspath(args.flip_root) if args.flip_root else os.path.dirname(here)
  sys.path.insert(0, os.path.join(root, "bench"))
  sys.path.insert(0, root)
  # pylint: disable=g-import-not-at-top
  import bench_utils
  import jax
  import jax.numpy as jnp
  import trace_summary

  what = "image inference" if args.inference else "train step"
  bench_utils.print_header(f"{what} profile, model {args.model}, mask {args.mask_ratio}, "
                           f"dtype {args.dtype or 'preset'}, flip from {root}")
  config = bench_utils.preset_config(args.model, args.mask_ratio)
  if args.dtype:
    config.dtype = args.dtype
  if args.img_layers is not None:
    config.model.model_img.transformer.num_layers = args.img_layers
  if args.txt_layers is not None:
    config.model.model_txt.transformer.num_layers = args.txt_layers
  runner = bench_utils.StepRunner(config)
  state = runner.init_state()
  if args.inference:
    encode = jax.jit(runner.task.encode_image)
    images = jnp.asarray(runner.batch["image"])

    def step(state):
      jax.block_until_ready(encode(state.params, images))
      return state

    def compiled_text(state):
      return encode.lower(state.params, images).compile().as_text()
  else:
    step = runner.step

    def compiled_text(state):
      return runner.trainer.p_train_step.lower(
          state, runner.trainer.global_batch(runner.batch)).compile().as_text()
  start = time.perf_counter()
  state = step(state)
  compile_s = time.perf_counter() - start
  compile_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
  print(f"first call: {compile_s:.1f} s; peak resident memory so far "
        f"{compile_rss_gb:.2f} GB", flush=True)
  state = step(state)  # one untimed step: the heap reaches its working size
  steps = []
  for _ in range(args.steps):
    user0, sys0, faults0 = _usage()
    start = time.perf_counter()
    state = step(state)
    wall = time.perf_counter() - start
    user1, sys1, faults1 = _usage()
    steps.append(dict(wall=wall, user=user1 - user0, kernel=sys1 - sys0, faults=faults1 - faults0))
  print(f"{'step':>4} {'wall s':>7} {'user s':>7} {'kernel s':>8} {'page faults':>11}")
  for i, s in enumerate(steps):
    print(f"{i:>4} {s['wall']:>7.3f} {s['user']:>7.2f} {s['kernel']:>8.2f} {s['faults']:>11,}")
  median = bench_utils.median([s["wall"] for s in steps])
  print(f"median step {median:.3f} s; page faults per step {steps[-1]['faults']:,} (last step)")
  if args.trace:
    traced_steps = 2
    jax.profiler.start_trace(args.trace, create_perfetto_trace=True)
    for _ in range(traced_steps):
      state = step(state)
    jax.profiler.stop_trace()
    print(f"trace of {traced_steps} steps written under {args.trace}")
    # The same program again, ahead of time, for its instruction names and metadata.
    trace_summary.print_tables(
        trace_summary.summarise(args.trace, compiled_text(state), traced_steps), args.rows)
  return dict(compile_s=compile_s, compile_rss_gb=compile_rss_gb, median_step=median,
              steps=steps)


def main(argv=None):
  return run(parse_args(argv))


if __name__ == "__main__":
  main()
