"""Scaling plan on paper: per-device memory and step FLOPs of FLIP B/16, L/16, H/14 at batch 65536.

An analytic model of one data-parallel (x model-parallel) train step per device:
- parameters: 4 bytes each (float32 master weights); the ones whose kernels t5x's rules shard over
  `model` (MLP, heads, vocab) are divided by the model-parallel size, approximated here as all
  parameters of rank >= 2;
- gradients: one float32 copy of the (model-sharded) parameters;
- AdamW moments: two float32 copies; with `partition_states` the rank >= 2 ones are also divided
  by the data-parallel size (FLIP's ZeRO-1 meaning, flip.partitioning);
- the non-finite guard of `flip.train` (the update is kept only if the whole new state is
  finite): the new state is materialised next to the donated old one before the conditional
  that keeps one of them, one more copy of parameters + moments;
- activations kept for the backward pass, per example and per block (T tokens, width D, MLP M,
  H heads; float32 unless `--dtype_bytes`), by remat policy:
    none:  ACT_NONE = 8 TD + 2 TM + 2 H T^2  (LayerNorm inputs/outputs, q, k, v, attention output,
           residual, MLP pre/post activation, attention logits and probabilities)
    minimal: 6 TD + TM per block (outputs of the weight matmuls and the block input) plus one
           block's `none` activations while it is recomputed
    actcp, full (FLIP: every name but none/minimal): TD per block (the block input) plus one
           block's `none` activations;
- the loss: LOSS_COPIES float32 [b, B] blocks of the logits matrix (logits, softmax, gradient).
XLA's buffer reuse and fusion make the real numbers differ; the script checks the model against
XLA's compiled memory analysis of the real step at small scale (bench/memory.py, goal: within
15 %) before printing the plan.

Usage: python bench/scaling_plan.py [--devices 256 512] [--model_parallel 1] [--check_model tiny]
                                    [--check_devices 8] [--no_check]
"""

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# pylint: disable=g-import-not-at-top,wrong-import-position
import memory as memory_bench

FLIP_BATCH = 65536  # FLIP's batch size (all three sizes)
FLIP_MASK_RATIO = 0.5  # FLIP's default masking
PLAN_CONFIGS = ("cfg_flip_base", "cfg_flip_large", "cfg_flip_huge14")
FLOAT32_BYTES = 4
LOSS_COPIES = 3
GOAL_PREDICTION_ERROR = 0.15  # docs/BENCHMARKS.md's goal
GIB = 2 ** 30
MIB = 2 ** 20


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, nargs="+", default=[256, 512])
  parser.add_argument("--model_parallel", type=int, default=1)
  parser.add_argument("--batch_size", type=int, default=FLIP_BATCH)
  parser.add_argument("--mask_ratio", type=float, default=FLIP_MASK_RATIO)
  parser.add_argument("--dtype_bytes", type=int, default=FLOAT32_BYTES,
                      help="activation bytes per element (2 for bfloat16 compute)")
  parser.add_argument("--check_model", default="tiny", choices=("sbs", "demo", "tiny"))
  parser.add_argument("--check_devices", type=int, default=8)
  parser.add_argument("--no_check", action="store_true")
  return parser.parse_args(argv)


@dataclasses.dataclass
class Tower:
  tokens: int
  width: int
  mlp: int
  heads: int
  depth: int


def block_activations(t: Tower, policy: str) -> int:
  """Elements a tower keeps for its backward pass, per example (see the module docstring)."""
  td, tm, att = t.tokens * t.width, t.tokens * t.mlp, t.heads * t.tokens ** 2
  full_block = 8 * td + 2 * tm + 2 * att
  if policy == "none":
    return t.depth * full_block
  if policy == "minimal":
    return t.depth * (6 * td + tm) + full_block
  return t.depth * td + full_block  # FLIP: any other name (actcp, full) is full remat


_PARAM_COUNTS = {}


def param_counts(config) -> tuple:
  """(parameters of rank >= 2, all parameters) of the config's FLIP model (shapes only)."""
  key = config.model.to_json()
  if key not in _PARAM_COUNTS:
    _PARAM_COUNTS[key] = _count_params(config)
  return _PARAM_COUNTS[key]


def _count_params(config) -> tuple:
  import jax  # pylint: disable=g-import-not-at-top
  from flip import builders  # pylint: disable=g-import-not-at-top
  params = jax.eval_shape(builders.build_task(config).init_variables, jax.random.PRNGKey(0))["params"]
  leaves = jax.tree.leaves(params)
  total = sum(int(x.size) for x in leaves)
  matrices = sum(int(x.size) for x in leaves if len(x.shape) >= 2)
  return matrices, total


def predict(config, devices: int, model_parallel: int, remat: str, partition_states: bool,
            dtype_bytes: int = FLOAT32_BYTES) -> dict:
  """Per-device bytes of one train step of `config` by component (plus "total")."""
  from flip import flops  # pylint: disable=g-import-not-at-top
  dims = flops.dims_from_config(config)
  data = devices // model_parallel
  local_batch = config.batch_size // data
  matrices, total = param_counts(config)
  vectors = total - matrices
  param_bytes = FLOAT32_BYTES * (matrices / model_parallel + vectors)
  moment_matrices = matrices / model_parallel / (data if partition_states else 1)
  moment_bytes = 2 * FLOAT32_BYTES * (moment_matrices + vectors)
  img_cfg, txt_cfg = config.model.model_img, config.model.model_txt
  img = Tower(dims.image_tokens(img_cfg.mask_ratio), dims.img.width, dims.img.mlp_dim,
              img_cfg.transformer.num_heads, dims.img.depth)
  txt = Tower(dims.text_len, dims.txt.width, dims.txt.mlp_dim, txt_cfg.transformer.num_heads,
              dims.txt.depth)
  act_elements = (block_activations(img, remat) / model_parallel +
                  block_activations(txt, remat) / model_parallel)
  parts = {
      "params": param_bytes,
      "grads": param_bytes,
      "adam": moment_bytes,
      "guard copy": param_bytes + moment_bytes,
      "activations": dtype_bytes * act_elements * local_batch,
      "loss": LOSS_COPIES * FLOAT32_BYTES * local_batch * config.batch_size,
  }
  parts["total"] = sum(parts.values())
  return parts


def check(args) -> list:
  """Predicted vs XLA-measured peak per device at small scale (bench/memory.py settings)."""
  import bench_utils  # pylint: disable=g-import-not-at-top
  rows = []
  for partition_states in (False, True):
    for remat in memory_bench.REMATS:
      config = memory_bench.configure(args.check_model, remat, partition_states, 0)
      runner = bench_utils.StepRunner(config)
      measured = memory_bench.compiled_memory(runner)["peak"]
      predicted = predict(config, args.check_devices, 1, remat, partition_states)["total"]
      rows.append((remat, partition_states, predicted, measured, predicted / measured - 1))
  print(f"check: model {args.check_model} on {args.check_devices} simulated devices, predicted vs "
        "XLA memory analysis (peak per device)")
  print(f"{'remat':<6} {'part_states':<11} {'predicted MiB':>13} {'measured MiB':>12} "
        f"{'error':>7}")
  for remat, ps, predicted, measured, error in rows:
    print(f"{remat:<6} {str(ps):<11} {predicted / MIB:>13.1f} {measured / MIB:>12.1f} "
          f"{100 * error:>6.1f}%{'' if abs(error) <= GOAL_PREDICTION_ERROR else '  > 15 %'}")
  return rows


def plan(args) -> list:
  import importlib  # pylint: disable=g-import-not-at-top
  from flip import flops  # pylint: disable=g-import-not-at-top
  rows = []
  print(f"plan: batch {args.batch_size}, mask ratio {args.mask_ratio}, model parallel "
        f"{args.model_parallel}, activations {args.dtype_bytes} bytes/element; GiB per device")
  print(f"{'config':<16} {'devices':>7} {'remat':<6} {'p_states':<8} {'params':>7} {'adam':>7} "
        f"{'acts':>8} {'total':>8} {'TFLOP/step':>10} {'TFLOP/dev':>9}")
  for name in PLAN_CONFIGS:
    config = importlib.import_module(f"configs.{name}").get_config()
    config.batch_size = args.batch_size
    config.model.model_img.mask_ratio = args.mask_ratio
    step = flops.train_step_flops(flops.dims_from_config(config), args.batch_size,
                                  args.mask_ratio)
    for devices in args.devices:
      for remat, ps in (("none", False), ("none", True), ("minimal", True), ("actcp", True)):
        p = predict(config, devices, args.model_parallel, remat, ps, args.dtype_bytes)
        rows.append((name, devices, remat, ps, p))
        print(f"{name:<16} {devices:>7} {remat:<6} {str(ps):<8} {p['params'] / GIB:>7.2f} "
              f"{p['adam'] / GIB:>7.2f} {p['activations'] / GIB:>8.1f} {p['total'] / GIB:>8.1f} "
              f"{step / 1e12:>10.1f} {step / devices / 1e12:>9.2f}")
  return rows


def run(args) -> dict:
  memory_bench.set_device_count(args.check_devices)
  import bench_utils  # pylint: disable=g-import-not-at-top
  bench_utils.print_header("scaling plan on paper")
  checked = [] if args.no_check else check(args)
  return dict(check=checked, plan=plan(args))


def main(argv=None):
  return run(parse_args(argv))


if __name__ == "__main__":
  main()
