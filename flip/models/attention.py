"""Multi-head self-attention in the two parameter layouts `qkv_layout` names.

- "separate" (FLIP's, from its t5x MultiHeadDotProductAttention): submodules `query`, `key` and
  `value`, each with a kernel [embed, heads, kv] and a bias [heads, kv], and `out` with a kernel
  [heads, kv, embed] and a bias [embed] (FLIP stores the same kernels flattened to
  [embed, heads * kv]; flip.convert.flip_t5x reshapes them);
- "fused" (ours): one kernel `qkv_kernel` [embed, 3, heads, kv] and bias `qkv_bias` [3, heads, kv]
  (one matmul instead of three), and `out_kernel` / `out_bias`.
Both compute the same function of the same numbers: logits and softmax in float32 whatever the
compute dtype, matmuls through flip.models.precision, padding (and, when `causal`, every later
position) masked with the most negative finite float. Kernels are initialised as
their [rows, rest] matrix views would be (fan-in and fan-out of a 2-D kernel).
"""

from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp

from flip.models import precision

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

param_with_axes = nn_partitioning.param_with_axes
with_sharding_constraint = nn_partitioning.with_sharding_constraint

QKV_LAYOUTS = ("separate", "fused")
default_kernel_init = nn.initializers.xavier_uniform()


def check_layout(qkv_layout: str) -> None:
  if qkv_layout not in QKV_LAYOUTS:
    raise ValueError(f"qkv_layout must be one of {QKV_LAYOUTS}, got {qkv_layout!r}")


def _as_matrix_init(init: Initializer, rows: int) -> Initializer:
  """`init` applied to the [rows, rest] matrix view of a kernel (fan-in/out of a 2-D kernel)."""

  def matrix_init(key, shape, dtype):
    cols = 1
    for size in shape:
      cols *= size
    return init(key, (rows, cols // rows), dtype).reshape(shape)

  return matrix_init


class HeadsProjection(nn.Module):
  """[B, L, embed] -> [B, L, heads, kv]: a kernel [embed, heads, kv] and a bias [heads, kv]."""

  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x: Array) -> Array:
    width = x.shape[-1]
    kernel = param_with_axes("kernel", _as_matrix_init(self.kernel_init, width),
                             (width, self.num_heads, self.head_dim), jnp.float32,
                             axes=("embed", "heads", "kv"))
    bias = param_with_axes("bias", nn.initializers.zeros, (self.num_heads, self.head_dim),
                           jnp.float32, axes=("heads", "kv"))
    return precision.contract("bld,dhk->blhk", x, kernel, self.dtype, bias)


class HeadsOutput(nn.Module):
  """[B, L, heads, kv] -> [B, L, embed]: a kernel [heads, kv, embed] and a bias [embed]."""

  features: int
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x: Array) -> Array:
    heads, head_dim = x.shape[-2:]
    kernel = param_with_axes("kernel", _as_matrix_init(self.kernel_init, heads * head_dim),
                             (heads, head_dim, self.features), jnp.float32,
                             axes=("heads", "kv", "embed"))
    bias = param_with_axes("bias", nn.initializers.zeros, (self.features,), jnp.float32,
                           axes=("embed",))
    return precision.contract("blhk,hkd->bld", x, kernel, self.dtype, bias)


class MultiHeadSelfAttention(nn.Module):
  """Self-attention with separate or fused q/k/v projections and an optional key padding mask."""

  num_heads: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init
  qkv_layout: str = "fused"
  causal: bool = False

  def _fused_qkv(self, x: Array, head_dim: int) -> Tuple[Array, Array, Array]:
    width = x.shape[-1]

    def qkv_init(key, shape, dtype):
      # Initialise as three independent [embed, embed] matrices, like separate projections.
      flat = self.kernel_init(key, (3, shape[0], shape[2] * shape[3]), dtype)
      return jnp.transpose(flat, (1, 0, 2)).reshape(shape)

    qkv_kernel = param_with_axes("qkv_kernel", qkv_init, (width, 3, self.num_heads, head_dim),
                                 jnp.float32, axes=("embed", "stack", "heads", "kv"))
    qkv_bias = param_with_axes("qkv_bias", nn.initializers.zeros, (3, self.num_heads, head_dim),
                               jnp.float32, axes=("stack", "heads", "kv"))
    if not precision.is_mixed(self.dtype):
      # float32: the [3, B, L, heads, kv] stack, indexed: the float32 program as it always ran,
      # bit for bit.
      qkv = precision.contract("bld,dshk->sblhk", x, qkv_kernel, self.dtype)
      qkv = precision.add_param(qkv, qkv_bias[:, None, None], self.dtype)
      return qkv[0], qkv[1], qkv[2]
    # Mixed precision: [B, L, 3, heads, kv], the matmul's own layout (bias added to its float32
    # accumulator, rounded once), split on the stack axis: the backward pass then concatenates
    # the three bfloat16 gradients (indexing a [3, ...] stack made it add three padded float32
    # copies).
    qkv = precision.contract("bld,dshk->blshk", x, qkv_kernel, self.dtype, qkv_bias)
    query, key, value = (part[:, :, 0] for part in jnp.split(qkv, 3, axis=2))
    return query, key, value

  def _separate_qkv(self, x: Array, head_dim: int) -> Tuple[Array, Array, Array]:
    return tuple(HeadsProjection(self.num_heads, head_dim, self.dtype, self.kernel_init,
                                 name=name)(x) for name in ("query", "key", "value"))

  def _fused_out(self, out: Array, width: int) -> Array:
    head_dim = out.shape[-1]
    out_kernel = param_with_axes("out_kernel", self.kernel_init, (self.num_heads, head_dim, width),
                                 jnp.float32, axes=("heads", "kv", "embed"))
    out_bias = param_with_axes("out_bias", nn.initializers.zeros, (width,), jnp.float32,
                               axes=("embed",))
    return precision.contract("blhk,hkd->bld", out, out_kernel, self.dtype, out_bias)

  @nn.compact
  def __call__(self, x: Array, key_mask: Optional[Array], *, deterministic: bool) -> Array:
    """x: [batch, length, embed]; key_mask: [batch, length] bool (True = attend) or None."""
    check_layout(self.qkv_layout)
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads

    if self.qkv_layout == "fused":
      query, key, value = self._fused_qkv(x, head_dim)
    else:
      query, key, value = self._separate_qkv(x, head_dim)
    query = with_sharding_constraint(query, ("batch", "length", "heads", "kv"))
    key = with_sharding_constraint(key, ("batch", "length", "heads", "kv"))
    value = with_sharding_constraint(value, ("batch", "length", "heads", "kv"))

    query = query * jnp.asarray(head_dim ** -0.5, self.dtype)
    logits = precision.attention_logits(query, key, self.dtype)
    allowed = None if key_mask is None else key_mask[:, None, None, :]
    if self.causal:
      length = logits.shape[-1]
      earlier = jnp.tril(jnp.ones((length, length), bool))[None, None]
      allowed = earlier if allowed is None else allowed & earlier
    if allowed is not None:
      big_negative = jnp.finfo(jnp.float32).min
      logits = jnp.where(allowed, logits, big_negative)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    if not deterministic and self.dropout_rate > 0.0:
      weights = nn.Dropout(rate=self.dropout_rate)(weights, deterministic=False)
    out = precision.attention_values(weights, value, self.dtype)
    out = with_sharding_constraint(out, ("batch", "length", "heads", "kv"))

    if self.qkv_layout == "fused":
      y = self._fused_out(out, width)
    else:
      y = HeadsOutput(width, self.dtype, self.kernel_init, name="out")(out)
    return with_sharding_constraint(y, ("batch", "length", "embed"))
