"""The matmul primitives of every layer, and the mixed-precision policy they implement.

Policy (FLIP's `config.dtype` is the compute dtype; `POLICY` below in words):
- parameters and optimizer state are float32 (the layers declare them so; nothing here casts them
  back), and so are their gradients;
- with a float32 compute dtype every primitive is the plain float32 `jnp.einsum` the layers always
  ran: the same program, bit for bit;
- with a lower-precision compute dtype (bfloat16) every matmul -- forward, data gradient and
  weight gradient -- takes operands in that dtype and accumulates in float32
  (`preferred_element_type=float32`); a layer's bias is added to the float32 accumulator and the
  sum rounded once (`contract(..., bias=...)`), and so are position embeddings (`add_param`);
  an activation that follows a matmul reads the float32 sum (the MLP's GELU); a kernel's gradient
  leaves the float32 accumulator as float32 (never rounded to bfloat16), and so does a bias's;
  layer norm, softmax, logits of the loss and the loss stay float32 (flip.models.layers,
  flip.models.attention, flip.losses).

Why custom VJPs: autodiff of a float32-accumulating dot gives float32 cotangents, so the two
transposed dots of its backward pass would multiply float32 by bfloat16, which promotes to a
float32 dot (the slow one on CPUs with bfloat16 matrix units). Here the backward rounds the
incoming cotangent to the compute dtype once (a matmul with its bias receives it in the compute
dtype and never widens it) and runs both transposed dots with bfloat16 operands and float32
accumulation, laid out so that XLA:CPU keeps them in bfloat16: a dot is handed to
its fast bfloat16 kernel (a YNNPACK fusion in jaxlib 0.10) only when the contracting axis of the
left operand is its last (row-major) axis, otherwise it is upcast to float32 first. The data
gradient `g @ kernel.T` is written as `dot_general` contracting both last axes; the weight
gradient `x.T @ g` contracts every leading axis of both operands at once (more than one
contracting axis makes XLA materialise `x.T`, a cheap copy of the small operand, and run the
canonical dot). Measured layouts and speeds: docs/BENCHMARKS.md ("Mixed precision").

The primitives are plain XLA dots, so on GPU and TPU they run as XLA's own bfloat16 dots with
float32 accumulation; nothing dispatches on the backend.
"""

import functools
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

ACCUMULATION_DTYPE = jnp.float32
# The policy as the config states it (`config.dtype` picks the compute dtype; the rest is fixed).
POLICY = dict(params="float32", optimizer_state="float32", gradients="float32",
              matmul_accumulation="float32", layer_norm="float32", softmax="float32",
              loss="float32")


def is_mixed(dtype: Dtype) -> bool:
  """True for a compute dtype narrower than float32 (bfloat16; float16 too, which config.py
  accepts, but float16 has no loss scaling here): its matmuls accumulate in float32."""
  dtype = jnp.dtype(dtype)
  return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4


def _dims(lhs_contract: Tuple[int, ...], rhs_contract: Tuple[int, ...]):
  return ((tuple(lhs_contract), tuple(rhs_contract)), ((), ()))


def _dot(lhs: Array, rhs: Array, lhs_contract, rhs_contract) -> Array:
  return jax.lax.dot_general(lhs, rhs, _dims(lhs_contract, rhs_contract),
                             preferred_element_type=ACCUMULATION_DTYPE)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_mixed(x: Array, kernel: Array, dtype: Dtype) -> Array:
  """x [..., K] (compute dtype) @ kernel [K, N] (any float dtype) -> [..., N] float32."""
  return _matmul_mixed_fwd(x, kernel, dtype)[0]


def _matmul_mixed_fwd(x, kernel, dtype):
  kernel_c = kernel.astype(dtype)
  y = _dot(x, kernel_c, (x.ndim - 1,), (0,))
  # The zero-size array only carries the kernel's dtype into the backward pass.
  return y, (x, kernel_c, jnp.zeros((0,), kernel.dtype))


def _matmul_mixed_bwd(dtype, residuals, g):
  x, kernel_c, kernel_dtype = residuals
  g = g.astype(dtype)
  dx = _dot(g, kernel_c, (g.ndim - 1,), (1,)).astype(x.dtype)
  leading = tuple(range(x.ndim - 1))
  if len(leading) == 1:
    # One contracting axis in front would be a column-major operand (upcast to float32 on
    # XLA:CPU); split it in two so XLA materialises x.T and runs the row-major dot.
    rows = x.shape[0]
    split = _largest_divisor(rows, 64)
    if split > 1:
      x = x.reshape(rows // split, split, x.shape[-1])
      g = g.reshape(rows // split, split, g.shape[-1])
      leading = (0, 1)
  dkernel = _dot(x, g, leading, leading)
  return dx, dkernel.astype(kernel_dtype.dtype)


_matmul_mixed.defvjp(_matmul_mixed_fwd, _matmul_mixed_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _affine_mixed(x: Array, kernel: Array, bias: Array, dtype: Dtype) -> Array:
  """x [..., K] @ kernel [K, N] + bias [N] -> [..., N] in the compute dtype: the bias is added
  to the float32 accumulator and the sum rounded once."""
  return _affine_mixed_fwd(x, kernel, bias, dtype)[0]


def _affine_mixed_fwd(x, kernel, bias, dtype):
  y, residuals = _matmul_mixed_fwd(x, kernel, dtype)
  y = (y + bias.astype(ACCUMULATION_DTYPE)).astype(dtype)
  return y, (residuals, jnp.zeros((0,), bias.dtype))


def _affine_mixed_bwd(dtype, residuals, g):
  # The cotangent arrives in the compute dtype (the output's) and stays there for both matmuls;
  # only the bias gradient is summed in float32. Without this rule the cotangent would be
  # widened to float32 for the bias and narrowed again for the matmuls, one full pass each.
  matmul_residuals, bias_dtype = residuals
  dx, dkernel = _matmul_mixed_bwd(dtype, matmul_residuals, g)
  dbias = jnp.sum(g.astype(ACCUMULATION_DTYPE), axis=tuple(range(g.ndim - 1)))
  return dx, dkernel, dbias.astype(bias_dtype.dtype)


_affine_mixed.defvjp(_affine_mixed_fwd, _affine_mixed_bwd)


def _largest_divisor(n: int, at_most: int) -> int:
  for d in range(min(n, at_most), 1, -1):
    if n % d == 0:
      return d
  return 1


def _parse_contraction(spec: str, kernel: Array) -> Tuple[str, str, int]:
  """(x's kept axes + the kernel's kept axes, the output's axes, number of contracted axes)."""
  inputs, out = spec.replace(" ", "").split("->")
  x_axes, k_axes = inputs.split(",")
  n_shared = len([a for a in x_axes if a in k_axes])
  natural = x_axes[:len(x_axes) - n_shared] + k_axes[n_shared:]
  if (x_axes[len(x_axes) - n_shared:] != k_axes[:n_shared] or not n_shared
      or sorted(out) != sorted(natural) or len(k_axes) != kernel.ndim):
    raise ValueError(f"contract spec {spec!r} must contract x's trailing axes with the "
                     "kernel's leading axes")
  return natural, out, n_shared


def contract(spec: str, x: Array, kernel: Array, dtype: Dtype,
             bias: Optional[Array] = None) -> Array:
  """`jnp.einsum(spec, x, kernel)` for a weight matmul: x's trailing axes against the kernel's
  leading axes, in the same order ("bld,dm->blm", "bld,dshk->blshk", "blhk,hkd->bld").

  float32 compute: exactly the float32 einsum (plus `bias`). Mixed: operands in `dtype`, float32
  accumulation, float32 kernel gradient; without `bias` a float32 result (add parameters to it,
  then round: `add_param`); with `bias` (the shape of the kernel's kept axes, which the output
  must keep last, in order) the result plus the bias, rounded once to `dtype` (`_affine_mixed`).
  """
  natural, out, n_shared = _parse_contraction(spec, kernel)
  k_keep = kernel.shape[n_shared:]
  if bias is not None and (natural != out or tuple(bias.shape) != tuple(k_keep)):
    raise ValueError(f"contract spec {spec!r} with a bias of shape {tuple(bias.shape)}: the "
                     f"output must keep the kernel's axes last, in order, of shape {k_keep}")
  if not is_mixed(dtype):
    y = jnp.einsum(spec, x.astype(dtype), kernel.astype(dtype))
    return y if bias is None else add_param(y, bias, dtype)
  k_size = 1
  for size in kernel.shape[:n_shared]:
    k_size *= size
  x_keep = x.shape[:x.ndim - n_shared]
  x_2d = x.astype(dtype).reshape(x_keep + (k_size,))
  kernel_2d = kernel.reshape(k_size, -1)
  if bias is not None:
    y = _affine_mixed(x_2d, kernel_2d, bias.reshape(-1), jnp.dtype(dtype))
    return y.reshape(x_keep + k_keep)
  y = _matmul_mixed(x_2d, kernel_2d, jnp.dtype(dtype)).reshape(x_keep + k_keep)
  if natural != out:
    y = jnp.transpose(y, [natural.index(a) for a in out])
  return y


def dense(x: Array, kernel: Array, dtype: Dtype, bias: Optional[Array] = None) -> Array:
  """x [..., K] @ kernel [K, N] (+ bias [N]): see `contract` (float32 compute: `jnp.dot`, the same
  program)."""
  if not is_mixed(dtype):
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    return y if bias is None else add_param(y, bias, dtype)
  return contract("...k,kn->...n".replace("...", _letters(x.ndim - 1)), x, kernel, dtype, bias)


def _letters(n: int) -> str:
  return "abcdefgh"[:n]


def add_param(y: Array, param: Array, dtype: Dtype) -> Array:
  """y + a float32 parameter (bias, position embedding), rounded to the compute dtype.

  float32 compute: `y + param.astype(dtype)`, as the layers always did. Mixed: the addition in
  float32 (so the parameter's gradient is reduced over the batch in float32), then rounded.
  """
  if not is_mixed(dtype):
    return y + param.astype(dtype)
  return (y.astype(ACCUMULATION_DTYPE) + param.astype(ACCUMULATION_DTYPE)).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _logits_mixed(query: Array, key: Array, dtype: Dtype) -> Array:
  return _dot_einsum("bqhk,bthk->bhqt", query, key)


def _logits_mixed_fwd(query, key, dtype):
  return _logits_mixed(query, key, dtype), (query, key)


def _logits_mixed_bwd(dtype, residuals, g):
  query, key = residuals
  g = _fixed_layout(g.astype(dtype))
  return (_dot_einsum("bhqt,bthk->bqhk", g, key).astype(query.dtype),
          _dot_einsum("bhqt,bqhk->bthk", g, query).astype(key.dtype))


_logits_mixed.defvjp(_logits_mixed_fwd, _logits_mixed_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _values_mixed(weights: Array, value: Array, dtype: Dtype) -> Array:
  return _dot_einsum("bhqt,bthk->bqhk", weights, value)


def _values_mixed_fwd(weights, value, dtype):
  return _values_mixed(weights, value, dtype), (weights, value)


def _values_mixed_bwd(dtype, residuals, g):
  weights, value = residuals
  g = _fixed_layout(g.astype(dtype))
  return (_dot_einsum("bqhk,bthk->bhqt", g, value).astype(weights.dtype),
          _dot_einsum("bhqt,bqhk->bthk", weights, g).astype(value.dtype))


_values_mixed.defvjp(_values_mixed_fwd, _values_mixed_bwd)


def _dot_einsum(spec: str, a: Array, b: Array) -> Array:
  return jnp.einsum(spec, a, b, preferred_element_type=ACCUMULATION_DTYPE)


def _fixed_layout(g: Array) -> Array:
  """The incoming cotangent of an attention matmul, materialised as it is.

  Without the barrier XLA may fold a transpose of the cotangent's producer into the backward
  dots; for some producers (a loss read straight from the attention output) that left a
  bfloat16 x bfloat16 -> float32 dot with a column-major left operand outside the YNNPACK
  fusion, which XLA:CPU's fallback kernel does not implement (an error at run time).
  """
  return jax.lax.optimization_barrier(g)


def attention_logits(query: Array, key: Array, dtype: Dtype) -> Array:
  """[B, Q, H, K] x [B, T, H, K] -> float32 logits [B, H, Q, T] (float32 accumulation always)."""
  if not is_mixed(dtype):
    return jnp.einsum("bqhk,bthk->bhqt", query, key, preferred_element_type=jnp.float32)
  return _logits_mixed(query.astype(dtype), key.astype(dtype), jnp.dtype(dtype))


def attention_values(weights: Array, value: Array, dtype: Dtype) -> Array:
  """[B, H, Q, T] x [B, T, H, K] -> [B, Q, H, K] in the compute dtype (mixed: accumulated in
  float32, then rounded)."""
  if not is_mixed(dtype):
    return jnp.einsum("bhqt,bthk->bqhk", weights, value)
  return _values_mixed(weights.astype(dtype), value.astype(dtype),
                       jnp.dtype(dtype)).astype(dtype)
