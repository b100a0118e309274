"""Model FLOPs utilisation of the unmasked train step against the machine's fp32 matmul peak.

Peak: the median time of many float32 [n, n] x [n, n] matmuls (n = 2048 by default) in JAX
(jitted), NumPy and PyTorch (when installed, `--threads` intra-op threads); the best median of
the three is the peak (each counts 2 n^3 FLOPs). Step: the real partitioned train step of a model
preset at mask ratio 0 (`flip.flops`: matmul FLOPs, fwd+bwd = 3 x forward). Matmul rounds and
step rounds alternate, so load from other processes hits both. MFU = step FLOPs / median step
time / peak (goals for the unmasked step, docs/BENCHMARKS.md: >= 80 % in float32, >= 50 % of the
bfloat16 peak in bfloat16); the MFU against each side's own peak is printed too.

`--dtype bfloat16`: the step with `config.dtype = "bfloat16"` (flip.models.precision) against the
bfloat16 matmul peak: XLA's bfloat16 dot with float32 accumulation and torch's bfloat16 `torch.mm`
(NumPy has no bfloat16 matmul).

Usage: python bench/mfu.py [--model sbs|demo|tiny] [--n 2048] [--matmuls 10] [--rounds 3]
                           [--steps 1] [--threads 2] [--dtype float32|bfloat16]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# pylint: disable=g-import-not-at-top,wrong-import-position
import bench_utils
import jax
import jax.numpy as jnp
import numpy as np

from flip import flops

GOAL_MFU = {"float32": 0.80, "bfloat16": 0.50}  # docs/BENCHMARKS.md's goals, unmasked step


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="sbs", choices=bench_utils.MODEL_PRESETS)
  parser.add_argument("--n", type=int, default=2048, help="matmul size")
  parser.add_argument("--matmuls", type=int, default=10, help="timed matmuls per side per round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=1, help="timed train steps per round")
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  return parser.parse_args(argv)


def matmul_fns(n: int, threads: int, dtype: str = "float32"):
  """Zero-argument functions, each one blocking n x n x n matmul, per framework."""
  rng = np.random.RandomState(0)
  a_np = rng.standard_normal((n, n)).astype(np.float32)
  b_np = rng.standard_normal((n, n)).astype(np.float32)
  if dtype == "bfloat16":
    return bf16_matmul_fns(a_np, b_np, threads)
  a_j, b_j = jnp.asarray(a_np), jnp.asarray(b_np)
  matmul = jax.jit(jnp.matmul)
  fns = {"jax": lambda: matmul(a_j, b_j).block_until_ready(),
         "numpy": lambda: np.matmul(a_np, b_np)}
  try:
    import torch
    torch.set_num_threads(threads)
    a_t, b_t = torch.from_numpy(a_np), torch.from_numpy(b_np)
    fns["torch"] = lambda: torch.mm(a_t, b_t)
  except ImportError:
    pass
  return fns


def bf16_matmul_fns(a_np, b_np, threads: int):
  a_j, b_j = jnp.asarray(a_np, jnp.bfloat16), jnp.asarray(b_np, jnp.bfloat16)
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  fns = {"jax": lambda: matmul(a_j, b_j).block_until_ready()}
  try:
    import torch
    torch.set_num_threads(threads)
    a_t = torch.from_numpy(a_np).to(torch.bfloat16)
    b_t = torch.from_numpy(b_np).to(torch.bfloat16)
    fns["torch"] = lambda: torch.mm(a_t, b_t)
  except ImportError:
    pass
  return fns


def run(args) -> dict:
  bench_utils.print_header(f"MFU of the unmasked train step, model {args.model}, {args.dtype}")
  config = bench_utils.preset_config(args.model, 0.0)
  config.dtype = args.dtype
  runner = bench_utils.StepRunner(config)
  holder = {"state": runner.init_state()}

  def step():
    holder["state"] = runner.step(holder["state"])

  fns = matmul_fns(args.n, args.threads, args.dtype)
  times = {name: [] for name in list(fns) + ["step"]}
  for round_index in range(args.rounds):
    warmup = 1 if round_index == 0 else 0
    got = bench_utils.time_alternating(fns, rounds=1, steps_per_round=args.matmuls, warmup=warmup)
    got |= bench_utils.time_alternating({"step": step}, rounds=1, steps_per_round=args.steps,
                                        warmup=warmup)
    for name, values in got.items():
      times[name] += values
  matmul_flops = 2 * args.n ** 3
  print(f"{args.dtype} matmul peak, {args.n}^3, {args.rounds} rounds x {args.matmuls}:")
  rates = {}
  for name in fns:
    rates[name] = matmul_flops / bench_utils.median(times[name]) / 1e9
    print(f"  {name:<6} median {bench_utils.spread(times[name])}  {rates[name]:7.1f} GFLOP/s")
  best = max(rates, key=rates.get)
  peak = rates[best]
  dims = flops.dims_from_config(runner.config)
  step_flops = flops.train_step_flops(dims, runner.config.batch_size, 0.0)
  step_time = bench_utils.median(times["step"])
  achieved = step_flops / step_time / 1e9
  mfu = achieved / peak
  goal = GOAL_MFU[args.dtype]
  print(f"peak: {peak:.1f} GFLOP/s ({best})")
  print(f"unmasked step: {step_flops / 1e9:.1f} GFLOP, median {bench_utils.spread(times['step'])}"
        f", {achieved:.1f} GFLOP/s, MFU {100 * mfu:.1f} % (goal {100 * goal:.0f} %: "
        f"{'yes' if mfu >= goal else 'no'})")
  print("  against each peak: " + ", ".join(f"{name} {100 * achieved / rate:.1f} %"
                                            for name, rate in rates.items()))
  return dict(peak=peak, peak_source=best, achieved=achieved, mfu=mfu, rates=rates)


def main(argv=None):
  return run(parse_args(argv))


if __name__ == "__main__":
  main()
