"""Every matmul of the side-by-side model's train step in bfloat16, as the layers ran it before
flip.models.precision and as they run it now, and the machine's bfloat16 matmul peak.

Per matmul shape of the sbs model (bench_utils.SBS_MODEL, unmasked: 3,200 image tokens, 2,048
text tokens) and per pass -- forward, data gradient, weight gradient -- three ways, each a jitted
function timed on its own (alternating rounds, median):
- `f32`: float32 operands (the float32 step);
- `before`: bfloat16 operands with a bfloat16 result (`jnp.dot(x, w)` in the compute dtype) and
  its gradients as autodiff derives them (the bfloat16 step before flip.models.precision);
- `after`: flip.models.precision (bfloat16 operands, float32 accumulation, the custom VJP's
  backward dots).
Attention's two batched matmuls ([64, 6, 50, 64] per head) likewise: logits q.k and weights.v,
forward and both gradients. Each row names which dot XLA runs (`ynn-bf16`: the bfloat16 YNNPACK
kernel; `ynn-f32` / `eigen-f32`: upcast to float32), read from the optimised HLO.

Peak: the best of XLA's bfloat16 dot (float32 accumulation) and torch's bfloat16 `torch.mm` on
[n, n] x [n, n] (default 2048) and on the model's largest shape; printed for the MFU figures.

Usage: python bench/precision_dots.py [--rounds 5] [--n 2048] [--threads 2]
"""

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# pylint: disable=g-import-not-at-top,wrong-import-position
import bench_utils
import jax
import jax.numpy as jnp
import numpy as np

from flip.models import precision

BF16, F32 = jnp.bfloat16, jnp.float32
VARIANTS = ("f32", "before", "after")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--n", type=int, default=2048, help="square matmul size for the peak")
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  parser.add_argument("--small", action="store_true", help="tiny shapes (tests)")
  return parser.parse_args(argv)


def dense_shapes(small: bool):
  """(name, rows, in, out) of every weight matmul of the sbs model's blocks (unmasked)."""
  s = bench_utils.SBS_MODEL
  img = s["batch_size"] * ((s["image_size"] // s["patch"]) ** 2 + 1)
  txt = s["batch_size"] * s["text_len"]
  d, t = s["img_width"], s["txt_width"]
  shapes = [("img qkv", img, d, 3 * d), ("img out", img, d, d), ("img mlp in", img, d, 4 * d),
            ("img mlp out", img, 4 * d, d), ("txt qkv", txt, t, 3 * t),
            ("txt mlp in", txt, t, 4 * t), ("txt mlp out", txt, 4 * t, t)]
  if small:
    shapes = [(name, 64, 16, 32) for name, *_ in shapes[:2]]
  return shapes


def dot_kinds(compiled_text: str) -> str:
  """Which dot XLA runs for each dot of an optimised HLO module (see the module docstring)."""
  ynn_comps = set()
  for line in compiled_text.splitlines():
    if "__ynn_fusion" in line:
      ynn_comps.update(re.findall(r"calls=%([\w.\-]+)", line))
  kinds = []
  comp = None
  params = {}
  for line in compiled_text.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{"):
      comp = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
      comp, params = comp.lstrip("%"), {}
      continue
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[", line)
    if m:
      params[m.group(1)] = m.group(2)
    m = re.search(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", line)
    if m:
      operand = params.get(m.group(1), "?")
      where = "ynn" if comp in ynn_comps else "eigen"
      kinds.append(f"{where}-{operand}")
  return ",".join(sorted(set(kinds))) or "none"


def _old_dense(x, w):
  return jnp.dot(x, w)


def dense_fns(rows: int, din: int, dout: int):
  """{(pass, variant): (fn, args)} for one weight matmul."""
  rng = np.random.RandomState(0)
  x32 = jnp.asarray(rng.standard_normal((rows, din)), F32)
  w32 = jnp.asarray(rng.standard_normal((din, dout)), F32)
  g32 = jnp.asarray(rng.standard_normal((rows, dout)), F32)
  x16, w16, g16 = x32.astype(BF16), w32.astype(BF16), g32.astype(BF16)
  new = lambda x, w: precision.dense(x, w, BF16)
  fns = {}
  for variant, fn, x, w, g in (("f32", _old_dense, x32, w32, g32),
                               ("before", _old_dense, x16, w16, g16),
                               ("after", new, x16, w32, g32)):
    fns[("forward", variant)] = (fn, (x, w))
    fns[("data grad", variant)] = (lambda x, w, g, fn=fn: jax.vjp(fn, x, w)[1](g)[0], (x, w, g))
    fns[("weight grad", variant)] = (lambda x, w, g, fn=fn: jax.vjp(fn, x, w)[1](g)[1], (x, w, g))
  return fns


def attention_fns(small: bool):
  s = bench_utils.SBS_MODEL
  b, heads = s["batch_size"], s["img_heads"]
  length, kv = (s["image_size"] // s["patch"]) ** 2 + 1, s["img_width"] // heads
  if small:
    b, heads, length, kv = 2, 2, 16, 8
  rng = np.random.RandomState(1)
  q32 = jnp.asarray(rng.standard_normal((b, length, heads, kv)), F32)
  k32 = jnp.asarray(rng.standard_normal((b, length, heads, kv)), F32)
  w32 = jax.nn.softmax(jnp.asarray(rng.standard_normal((b, heads, length, length)), F32))
  gl32 = jnp.asarray(rng.standard_normal((b, heads, length, length)), F32)
  gv32 = jnp.asarray(rng.standard_normal((b, length, heads, kv)), F32)
  old_logits = lambda q, k: jnp.einsum("bqhk,bthk->bhqt", q, k, preferred_element_type=F32)
  old_values = lambda w, v: jnp.einsum("bhqt,bthk->bqhk", w, v)
  flops = 2 * b * heads * length * length * kv
  fns = {}
  for variant, dtype in (("f32", F32), ("before", BF16), ("after", BF16)):
    q, k, w = q32.astype(dtype), k32.astype(dtype), w32.astype(dtype)
    logits = old_logits if variant != "after" else (
        lambda q, k: precision.attention_logits(q, k, BF16))
    values = old_values if variant != "after" else (
        lambda w, v: precision.attention_values(w, v, BF16))
    gl, gv = gl32, gv32.astype(dtype)
    fns[("logits fwd", variant)] = (logits, (q, k))
    fns[("logits grads", variant)] = (lambda q, k, g, f=logits: jax.vjp(f, q, k)[1](g), (q, k, gl))
    fns[("values fwd", variant)] = (values, (w, k))
    fns[("values grads", variant)] = (lambda w, v, g, f=values: jax.vjp(f, w, v)[1](g), (w, k, gv))
  return fns, flops


def _timer(fn, args):
  jitted = jax.jit(fn)
  kinds = dot_kinds(jitted.lower(*args).compile().as_text())
  return (lambda: jax.block_until_ready(jitted(*args))), kinds


def peak_fns(n: int, rows_in_out, threads: int):
  """Zero-argument bf16 matmuls: XLA (float32 accumulation) and torch, square and model-shaped."""
  rng = np.random.RandomState(2)
  fns = {}
  shapes = {f"{n}^3": (n, n, n), "{}x{}x{}".format(*rows_in_out): rows_in_out}
  try:
    import torch
    torch.set_num_threads(threads)
  except ImportError:
    torch = None
  for label, (m, k, nn_) in shapes.items():
    a = jnp.asarray(rng.standard_normal((m, k)), BF16)
    b = jnp.asarray(rng.standard_normal((k, nn_)), BF16)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=F32))
    fns[(f"xla bf16->f32 {label}", 2 * m * k * nn_)] = lambda d=dot, a=a, b=b: (
        jax.block_until_ready(d(a, b)))
    if torch is not None:
      ta = torch.randn(m, k).to(torch.bfloat16)
      tb = torch.randn(k, nn_).to(torch.bfloat16)
      fns[(f"torch bf16 {label}", 2 * m * k * nn_)] = lambda ta=ta, tb=tb: torch.mm(ta, tb)
  return fns


def run(args) -> dict:
  bench_utils.print_header("bfloat16 matmuls of the sbs step: before / after flip.models.precision")
  table = []
  for name, rows, din, dout in dense_shapes(args.small):
    fns = dense_fns(rows, din, dout)
    timers, kinds = {}, {}
    for key, (fn, fargs) in fns.items():
      timers[key], kinds[key] = _timer(fn, fargs)
    times = bench_utils.time_alternating(timers, rounds=args.rounds, steps_per_round=1)
    flops = 2 * rows * din * dout
    for pass_name in ("forward", "data grad", "weight grad"):
      rates = {v: flops / bench_utils.median(times[(pass_name, v)]) / 1e9 for v in VARIANTS}
      table.append((f"{name} [{rows}x{din}x{dout}]", pass_name, rates,
                    {v: kinds[(pass_name, v)] for v in VARIANTS}))
  fns, att_flops = attention_fns(args.small)
  timers, kinds = {}, {}
  for key, (fn, fargs) in fns.items():
    timers[key], kinds[key] = _timer(fn, fargs)
  times = bench_utils.time_alternating(timers, rounds=args.rounds, steps_per_round=1)
  for pass_name in ("logits fwd", "logits grads", "values fwd", "values grads"):
    mult = 2 if "grads" in pass_name else 1
    rates = {v: mult * att_flops / bench_utils.median(times[(pass_name, v)]) / 1e9
             for v in VARIANTS}
    table.append(("img attention [64x6x50x50x64]", pass_name, rates,
                  {v: kinds[(pass_name, v)] for v in VARIANTS}))
  print(f"GFLOP/s, median of {args.rounds} alternating rounds; after/before = speedup of the "
        "bfloat16 dot; XLA's kernel per variant (f32 / before / after)")
  print(f"{'matmul':<34} {'pass':<12} {'f32':>7} {'before':>7} {'after':>7} {'after/before':>12}"
        f" {'after/f32':>9}  kernels")
  for matmul, pass_name, rates, kinds_ in table:
    print(f"{matmul:<34} {pass_name:<12} {rates['f32']:>7.0f} {rates['before']:>7.0f} "
          f"{rates['after']:>7.0f} {rates['after'] / rates['before']:>12.2f} "
          f"{rates['after'] / rates['f32']:>9.2f}  {kinds_['f32']} / {kinds_['before']} / "
          f"{kinds_['after']}")
  shapes = dense_shapes(args.small)
  _, rows, din, dout = max(shapes, key=lambda s: s[1] * s[2] * s[3])
  n = 64 if args.small else args.n
  peaks = peak_fns(n, (rows, din, dout), args.threads)
  timers = {label: fn for (label, _), fn in peaks.items()}
  times = bench_utils.time_alternating(timers, rounds=args.rounds, steps_per_round=3)
  print("bfloat16 matmul peak (median of the rounds):")
  rates = {}
  for (label, flops), _ in peaks.items():
    rates[label] = flops / bench_utils.median(times[label]) / 1e9
    print(f"  {label:<32} {rates[label]:8.1f} GFLOP/s")
  best = max(rates, key=rates.get)
  print(f"peak: {rates[best]:.1f} GFLOP/s ({best})")
  return dict(table=table, peak=rates[best], peak_source=best, peaks=rates)


def main(argv=None):
  return run(parse_args(argv))


if __name__ == "__main__":
  main()
