"""Forward + backward time of transformer blocks, one design choice at a time (the ablation behind
the layouts and VJPs of flip/models/layers.py).

A stack of `--layers` pre-norm blocks at the side-by-side model's image shape (batch 64, 50
tokens, width 384, 6 heads, MLP 1536; float32), loss = sum of squares of the output, gradients
with respect to every weight and the input. Variants (the first is the reference of the ratios):
  before       - the previous layers.py, re-stated here: q/k/v length-major [batch, length, heads,
                 kv] with transposes into the attention products, autodiff LayerNorm and GELU;
  head_major   - `before` with head-major q/k/v [batch, heads, length, kv];
  dot_product  - `before` with `jax.nn.dot_product_attention` (XLA implementation on CPU);
  ln_vjp       - `before` with `layers.layer_norm` (hand-written VJP);
  gelu_vjp     - `before` with `gelu_with_vjp` below (hand-written VJP reusing the forward's CDF);
  layers_now   - the real `layers.Encoder` as it is now (the choices that stayed: length-major
                 attention, `layers.layer_norm`, autodiff exact GELU);
  tanh_gelu    - `layers_now` with the tanh GELU (an extra row: not open_clip's exact GELU);
  stack_inner  - `ln_vjp` with the fused projection's output as [batch, length, 3, heads, kv]
                 (the row-major matmul result; `before` has the q/k/v index first);
  split_qkv    - `ln_vjp` with three projections from slices of the fused kernel;
  split_head_major - `split_qkv` with head-major [batch, heads, length, kv] outputs.
All variants compute the same function (the tanh row excepted); the script checks the losses
agree. Rounds alternate between variants; wall and process-CPU medians are printed.

Usage: python bench/block_variants.py [--layers 2] [--rounds 5] [--batch 64] [--variants ...]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# pylint: disable=g-import-not-at-top,wrong-import-position
import math

import bench_utils
import jax
import jax.numpy as jnp
import numpy as np

from flip.models import layers

VARIANTS = ("before", "head_major", "dot_product", "ln_vjp", "gelu_vjp", "layers_now", "tanh_gelu",
            "stack_inner", "split_qkv", "split_head_major")
SBS = bench_utils.SBS_MODEL


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--batch", type=int, default=SBS["batch_size"])
  parser.add_argument("--tokens", type=int, default=(SBS["image_size"] // SBS["patch"]) ** 2 + 1)
  parser.add_argument("--width", type=int, default=SBS["img_width"])
  parser.add_argument("--heads", type=int, default=SBS["img_heads"])
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
  return parser.parse_args(argv)


_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@jax.custom_vjp
def gelu_with_vjp(x):
  """Exact GELU, x * Phi(x), with the formula of jax.nn.gelu(approximate=False)."""
  return 0.5 * x * jax.lax.erfc(-x * _SQRT_HALF)


def _gelu_fwd(x):
  cdf = 0.5 * jax.lax.erfc(-x * _SQRT_HALF)
  return x * cdf, (x, cdf)


def _gelu_bwd(residuals, g):
  x, cdf = residuals
  return (g * (cdf + x * _INV_SQRT_2PI * jnp.exp(-0.5 * x * x)),)


gelu_with_vjp.defvjp(_gelu_fwd, _gelu_bwd)


def autodiff_layer_norm(x, scale, bias, epsilon):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias


def attention_length_major(p, y, head_dim):
  qkv = jnp.einsum("bld,dshk->sblhk", y, p["qkv_kernel"]) + p["qkv_bias"][:, None, None]
  query = qkv[0] * head_dim ** -0.5
  weights = jax.nn.softmax(jnp.einsum("bqhk,bthk->bhqt", query, qkv[1]), axis=-1)
  out = jnp.einsum("bhqt,bthk->bqhk", weights, qkv[2])
  return jnp.einsum("blhk,hkd->bld", out, p["out_kernel"]) + p["out_bias"]


def attention_head_major(p, y, head_dim):
  qkv = jnp.einsum("bld,dshk->sbhlk", y, p["qkv_kernel"]) + p["qkv_bias"][:, None, :, None]
  query = qkv[0] * head_dim ** -0.5
  weights = jax.nn.softmax(jnp.einsum("bhqk,bhtk->bhqt", query, qkv[1]), axis=-1)
  out = jnp.einsum("bhqt,bhtk->bhqk", weights, qkv[2])
  return jnp.einsum("bhlk,hkd->bld", out, p["out_kernel"]) + p["out_bias"]


def attention_dot_product(p, y, head_dim):
  del head_dim
  qkv = jnp.einsum("bld,dshk->sblhk", y, p["qkv_kernel"]) + p["qkv_bias"][:, None, None]
  out = jax.nn.dot_product_attention(qkv[0], qkv[1], qkv[2])
  return jnp.einsum("blhk,hkd->bld", out, p["out_kernel"]) + p["out_bias"]


def attention_stack_inner(p, y, head_dim):
  # q/k/v index after the length axis: the fused projection's output [b, l, 3, h, k] is the
  # row-major [b*l, 3*h*k] matmul result itself, and so is its gradient.
  qkv = jnp.einsum("bld,dshk->blshk", y, p["qkv_kernel"]) + p["qkv_bias"]
  query = qkv[:, :, 0] * head_dim ** -0.5
  weights = jax.nn.softmax(jnp.einsum("bqhk,bthk->bhqt", query, qkv[:, :, 1]), axis=-1)
  out = jnp.einsum("bhqt,bthk->bqhk", weights, qkv[:, :, 2])
  return jnp.einsum("blhk,hkd->bld", out, p["out_kernel"]) + p["out_bias"]


def attention_split_qkv(p, y, head_dim):
  # Three projections from slices of the fused kernel, each output in its natural layout.
  q, k, v = (jnp.einsum("bld,dhk->blhk", y, p["qkv_kernel"][:, i]) + p["qkv_bias"][i]
             for i in range(3))
  weights = jax.nn.softmax(jnp.einsum("bqhk,bthk->bhqt", q * head_dim ** -0.5, k), axis=-1)
  out = jnp.einsum("bhqt,bthk->bqhk", weights, v)
  return jnp.einsum("blhk,hkd->bld", out, p["out_kernel"]) + p["out_bias"]


def attention_split_head_major(p, y, head_dim):
  q, k, v = (jnp.einsum("bld,dhk->bhlk", y, p["qkv_kernel"][:, i])
             + p["qkv_bias"][i][None, :, None] for i in range(3))
  weights = jax.nn.softmax(jnp.einsum("bhqk,bhtk->bhqt", q * head_dim ** -0.5, k), axis=-1)
  out = jnp.einsum("bhqt,bhtk->bhqk", weights, v)
  return jnp.einsum("bhlk,hkd->bld", out, p["out_kernel"]) + p["out_bias"]


PURE_VARIANTS = {
    "before": (attention_length_major, autodiff_layer_norm, lambda h: jax.nn.gelu(h, False)),
    "head_major": (attention_head_major, autodiff_layer_norm, lambda h: jax.nn.gelu(h, False)),
    "dot_product": (attention_dot_product, autodiff_layer_norm, lambda h: jax.nn.gelu(h, False)),
    "ln_vjp": (attention_length_major, layers.layer_norm, lambda h: jax.nn.gelu(h, False)),
    "gelu_vjp": (attention_length_major, autodiff_layer_norm, gelu_with_vjp),
    "stack_inner": (attention_stack_inner, layers.layer_norm, lambda h: jax.nn.gelu(h, False)),
    "split_qkv": (attention_split_qkv, layers.layer_norm, lambda h: jax.nn.gelu(h, False)),
    "split_head_major": (attention_split_head_major, layers.layer_norm,
                         lambda h: jax.nn.gelu(h, False)),
}


def pure_block(p, x, attention, layer_norm, gelu, head_dim, epsilon):
  y = layer_norm(x, p["ln0_scale"], p["ln0_bias"], epsilon)
  x = x + attention(p, y, head_dim)
  y = layer_norm(x, p["ln1_scale"], p["ln1_bias"], epsilon)
  return x + gelu(y @ p["mlp0_kernel"] + p["mlp0_bias"]) @ p["mlp1_kernel"] + p["mlp1_bias"]


def flax_to_pure(block_params):
  """One `layers.EncoderBlock`'s parameters under the flat names of the pure variants."""
  attn = block_params["MultiHeadSelfAttention_0"]
  mlp = block_params["MlpBlock_0"]
  return {"ln0_scale": block_params["LayerNorm_0"]["scale"],
          "ln0_bias": block_params["LayerNorm_0"]["bias"],
          "ln1_scale": block_params["LayerNorm_1"]["scale"],
          "ln1_bias": block_params["LayerNorm_1"]["bias"],
          "qkv_kernel": attn["qkv_kernel"], "qkv_bias": attn["qkv_bias"],
          "out_kernel": attn["out_kernel"], "out_bias": attn["out_bias"],
          "mlp0_kernel": mlp["Dense_0"]["kernel"], "mlp0_bias": mlp["Dense_0"]["bias"],
          "mlp1_kernel": mlp["Dense_1"]["kernel"], "mlp1_bias": mlp["Dense_1"]["bias"]}


def build(args):
  epsilon = SBS["layernorm_epsilon"]
  head_dim = args.width // args.heads
  encoders = {gelu: layers.Encoder(num_layers=args.layers, num_heads=args.heads,
                                   mlp_dim=4 * args.width, layernorm_epsilon=epsilon, gelu=gelu,
                                   final_norm=False) for gelu in layers.GELU_KINDS}
  x = jnp.asarray(np.random.RandomState(0).standard_normal(
      (args.batch, args.tokens, args.width)).astype(np.float32))
  params = encoders["exact"].init(jax.random.PRNGKey(0), x, train=False)["params"]
  # Non-zero biases and LayerNorm parameters, so every term of every gradient is exercised.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(treedef, [
      leaf + 0.05 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)])
  pure_params = [flax_to_pure(params[f"encoderblock_{i:02d}"]) for i in range(args.layers)]

  fns = {}
  for name in args.variants:
    if name in PURE_VARIANTS:
      attention, layer_norm, gelu = PURE_VARIANTS[name]

      def loss(p, inputs, attention=attention, layer_norm=layer_norm, gelu=gelu):
        for block_params in p:
          inputs = pure_block(block_params, inputs, attention, layer_norm, gelu, head_dim, epsilon)
        return jnp.sum(inputs * inputs)
      fns[name] = (jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), pure_params)
    else:
      encoder = encoders["tanh" if name == "tanh_gelu" else "exact"]

      def loss(p, inputs, encoder=encoder):
        out = encoder.apply({"params": p}, inputs, train=False)
        return jnp.sum(out * out)
      fns[name] = (jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params)
  return fns, x


def run(args) -> dict:
  bench_utils.print_header(f"transformer block variants, {args.layers} layers, fwd + bwd")
  fns, x = build(args)
  values = {}
  for name, (fn, p) in fns.items():
    values[name] = float(jax.block_until_ready(fn(p, x))[0])
  exact = [v for n, v in values.items() if n != "tanh_gelu"]
  spread_of_values = (max(exact) - min(exact)) / abs(exact[0])
  print(f"batch {args.batch}, {args.tokens} tokens, width {args.width}, {args.heads} heads; "
        f"loss agrees across the exact variants to {spread_of_values:.1e} (relative)")
  cpu = {}
  times = bench_utils.time_alternating(
      {name: (lambda fn=fn, p=p: jax.block_until_ready(fn(p, x))) for name, (fn, p) in
       fns.items()}, rounds=args.rounds, steps_per_round=1, warmup=0, cpu_times=cpu)
  reference = args.variants[0]
  base, base_cpu = bench_utils.median(times[reference]), bench_utils.median(cpu[reference])
  print(f"{'variant':<12} {'wall (median, min-max)':>26} {'ratio':>6} {'cpu median':>10} "
        f"{'cpu ratio':>9}")
  results = {}
  for name in fns:
    wall, cpu_time = bench_utils.median(times[name]), bench_utils.median(cpu[name])
    results[name] = dict(wall=wall, cpu=cpu_time, wall_ratio=wall / base,
                         cpu_ratio=cpu_time / base_cpu)
    print(f"{name:<12} {bench_utils.spread(times[name]):>26} {wall / base:>6.2f} "
          f"{cpu_time:>9.3f}s {cpu_time / base_cpu:>9.2f}")
  return results


def main(argv=None):
  return run(parse_args(argv))


if __name__ == "__main__":
  main()
