"""Per-device memory of the contrastive loss (value and gradients) under data parallelism.

Compiles, without running, the loss and its gradients for a global batch B split over simulated
CPU devices and prints XLA's per-device temporary memory and largest matrix buffer for:
  single     - `contrastive_loss` on one device (the [B, B] baseline);
  pjit       - `contrastive_loss` with the batch sharded over 'data' and the logical rules on;
  pjit_2mm   - the rejected alternative: text->image from a second, transposed product;
  local      - `contrastive_loss_local` inside `jax.shard_map`;
each with the metrics (top-1 accuracies, whose argmax keeps index buffers) and loss only.
Ratios are to `single` with metrics.
Usage: python bench/loss_memory.py [--devices 8] [--batch 1024 4096] [--dim 64]
"""

import argparse
import os
import re
import sys


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--batch", type=int, nargs="+", default=[1024, 4096])
  parser.add_argument("--dim", type=int, default=64)
  return parser.parse_args()


ARGS = parse_args()
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={ARGS.devices}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# pylint: disable=g-import-not-at-top,wrong-import-position
import functools

from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from flip import losses
from flip import process_setup


def two_products_loss(img, txt, scale_log):
  """The alternative `contrastive_loss` did not take: each direction from its own row-sharded
  product (same precision, dtype and metrics as the real one)."""
  scale = jnp.exp(scale_log)
  i2t = nn_partitioning.with_sharding_constraint(
      losses.similarity(losses.scaled(img, scale), txt), losses.LOGITS_AXES)
  t2i = nn_partitioning.with_sharding_constraint(
      losses.similarity(losses.scaled(txt, scale), img), losses.LOGITS_AXES)
  target = scale * losses.paired_similarity(img, txt)
  own_index = jnp.arange(img.shape[0])
  metrics = {"acc_i2t": losses.top1_accuracy(i2t, own_index, axis=1),
             "acc_t2i": losses.top1_accuracy(t2i, own_index, axis=1)}
  loss = 0.5 * (jnp.mean(jax.nn.logsumexp(i2t, 1) - target) +
                jnp.mean(jax.nn.logsumexp(t2i, 1) - target))
  return loss, metrics


def without_metrics(loss_fn):
  return lambda *args: (loss_fn(*args)[0], {})


def value_and_grads(loss_fn):
  return jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)


def largest_matrix(hlo_text):
  shapes = [(int(a), int(b)) for a, b in re.findall(r"\b\w+\[(\d+),(\d+)\]", hlo_text)]
  return max(shapes, key=lambda s: s[0] * s[1])


def measure(compiled):
  return compiled.memory_analysis().temp_size_in_bytes, largest_matrix(compiled.as_text())


def main():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  rows = NamedSharding(mesh, PartitionSpec("data", None))
  replicated = NamedSharding(mesh, PartitionSpec())
  print(f"{jax.device_count()} simulated {jax.devices()[0].platform} devices, D={ARGS.dim}, "
        "loss + gradients, per-device temporaries")
  for batch in ARGS.batch:
    img = jax.ShapeDtypeStruct((batch, ARGS.dim), jnp.float32)
    scale_log = jax.ShapeDtypeStruct((), jnp.float32)
    results = {}
    local = jax.shard_map(
        functools.partial(losses.contrastive_loss_local, axis_name="data"), mesh=mesh,
        in_specs=(PartitionSpec("data"), PartitionSpec("data"), PartitionSpec()),
        out_specs=PartitionSpec())
    for metrics in (True, False):
      keep = (lambda f: f) if metrics else without_metrics
      suffix = "" if metrics else " (loss only)"
      results["single" + suffix] = measure(jax.jit(value_and_grads(keep(
          losses.contrastive_loss))).lower(img, img, scale_log).compile())
      with jax.set_mesh(mesh), nn_partitioning.axis_rules([("batch", "data")]):
        for name, fn in (("pjit", losses.contrastive_loss), ("pjit_2mm", two_products_loss)):
          results[name + suffix] = measure(jax.jit(value_and_grads(keep(fn)), in_shardings=(
              rows, rows, replicated)).lower(img, img, scale_log).compile())
      results["local" + suffix] = measure(jax.jit(value_and_grads(keep(local))).lower(
          img, img, scale_log).compile())
    baseline = results["single"][0]
    for name, (temp_bytes, shape) in results.items():
      print(f"B={batch:6d} {name:21s} temp {temp_bytes / 2**20:8.2f} MiB  "
            f"ratio {temp_bytes / baseline:5.3f}  largest matrix {shape}")


if __name__ == "__main__":
  process_setup.configure_process()
  main()
