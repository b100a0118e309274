"""Transformer building blocks shared by every tower (ViT, text, MAE decoder).

Every tower is built around one `Encoder` stack: it inherits the stack's hyperparameters from
`EncoderFields` and builds its stack with `encoder_of`; `ENCODER_CONFIG_KEYS`, `config_fields` and
`checked_fields` map the config keys of the same names onto those fields.

Every parameter is declared with `flax.linen.partitioning.param_with_axes`, so its logical axis
names land in the `params_axes` collection that t5x's `FlaxOptimTrainState` and
`PjitPartitioner.get_mesh_axes` read; the main activations are constrained with logical names
(`batch`, `length`, `embed`, `mlp`, `heads`, `kv`) that the partitioner's rules map onto the mesh.

Logical names used for parameters: `embed` (model width), `mlp` (MLP hidden), `heads`/`kv`
(attention heads and per-head width), `stack` (the q/k/v index of the fused projection; t5x's
standard rules replicate it), `vocab`, `length` (positions), and `_null*` for axes that are never
sharded (patch-kernel spatial axes, leading singleton axes); names without a rule are replicated.

Decisions where FLIP/ViT are silent or differ between codebases:
- `qkv_layout` (the attention of flip.models.attention): "separate" (FLIP's q/k/v projections)
  or "fused" (ours: one [embed, 3, heads, kv] kernel); the same function of the same numbers;
- LayerNorm has a hand-written VJP: the same values, and a backward pass of two row reductions
  instead of what autodiff derives from the forward graph (12 % less CPU time for a
  forward + backward of two blocks in bench/block_variants.py; docs/BENCHMARKS.md). Measured in
  the same runs and not kept, for lack of a gain on CPU: head-major q/k/v, the XLA
  `jax.nn.dot_product_attention` path, and a hand-written VJP for the exact GELU; later the q/k/v
  index after the length axis and three separate projections (within 1 %: XLA's layout
  assignment makes them the same program);
- attention logits and softmax are computed in float32 whatever the compute dtype; every matmul
  goes through flip.models.precision (bfloat16 compute: float32 accumulation, float32 kernel
  gradients);
- padding is masked with the most negative finite float (not -inf) so a row can never be all -inf;
- variants that host other projects' weights exactly: `gelu="quick"` (OpenAI CLIP's QuickGELU),
  `causal` attention (open_clip's text tower), `layer_scale_init` (LayerScale on both residual
  branches, timm's `init_values`, open_clip's `ls_init_value`);
- `remat_policy`, with FLIP's names and meanings: "none" keeps every activation; "minimal" saves
  the outputs of the weight matmuls (dots without batch dimensions) and recomputes the rest of a
  block in the backward pass; any other name ("full", "actcp", ...) is full per-block
  rematerialisation (only block inputs are saved; jax.checkpoint's policy None), as in FLIP, whose
  README recommends `actcp` to avoid running out of memory.
"""

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp

from flip.models.attention import HeadsOutput  # pylint: disable=unused-import (public name)
from flip.models.attention import HeadsProjection  # pylint: disable=unused-import (public name)
from flip.models.attention import MultiHeadSelfAttention
from flip.models.attention import QKV_LAYOUTS
from flip.models import precision

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

param_with_axes = nn_partitioning.param_with_axes
with_sharding_constraint = nn_partitioning.with_sharding_constraint

# The names documented above; FLIP accepts any other name as full remat, and so do we.
REMAT_POLICIES = ("none", "minimal", "full", "actcp")
GELU_KINDS = ("exact", "tanh", "quick")

default_kernel_init = nn.initializers.xavier_uniform()


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: Array, scale: Array, bias: Array, epsilon: float) -> Array:
  """(x - mean) / sqrt(var + epsilon) * scale + bias over the last axis (float32 in and out)."""
  return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  centered = x - mean
  inv_std = jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + epsilon)
  normed = centered * inv_std
  return normed * scale + bias, (normed, inv_std, scale)


def _layer_norm_bwd(epsilon, residuals, g):
  del epsilon
  normed, inv_std, scale = residuals
  g_normed = g * scale
  dx = inv_std * (g_normed - jnp.mean(g_normed, axis=-1, keepdims=True)
                  - normed * jnp.mean(g_normed * normed, axis=-1, keepdims=True))
  batch_axes = tuple(range(g.ndim - 1))
  return dx, jnp.sum(g * normed, axis=batch_axes), jnp.sum(g, axis=batch_axes)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def remat_policy_fn(policy: str) -> Optional[Callable[..., bool]]:
  """The jax checkpoint policy behind a `remat_policy` name other than "none" (FLIP's mapping):
  "minimal" saves dots without batch dimensions; every other name means full remat (None)."""
  if not isinstance(policy, str) or not policy or policy == "none":
    raise ValueError(f"remat_policy {policy!r} names no rematerialisation policy")
  if policy == "minimal":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return None


class LayerNorm(nn.Module):
  """Layer normalisation over the last axis with a logically-named scale and bias."""

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    scale = param_with_axes("scale", nn.initializers.ones, (features,), jnp.float32, axes=("embed",))
    bias = param_with_axes("bias", nn.initializers.zeros, (features,), jnp.float32, axes=("embed",))
    return layer_norm(x.astype(jnp.float32), scale, bias, self.epsilon).astype(self.dtype)


class Dense(nn.Module):
  """y = x @ kernel + bias on the last axis, kernel axes given as logical names.

  The result is in the compute dtype, or with `round_output=False` in float32 (under bfloat16
  compute: the float32 accumulator plus the float32 bias, for an activation that follows).
  """

  features: int
  kernel_axes: Tuple[str, str]
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros
  round_output: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = param_with_axes("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32,
                             axes=self.kernel_axes)
    bias = None
    if self.use_bias:
      bias = param_with_axes("bias", self.bias_init, (self.features,), jnp.float32,
                             axes=(self.kernel_axes[-1],))
    if self.round_output:
      return precision.dense(x, kernel, self.dtype, bias).astype(self.dtype)
    y = precision.dense(x, kernel, self.dtype)
    if bias is not None:
      y = precision.add_param(y, bias, precision.ACCUMULATION_DTYPE)
    return y.astype(precision.ACCUMULATION_DTYPE)


def gelu(x: Array, kind: str, *, erf_form: bool = False) -> Array:
  """GELU of the named kind: "exact", "tanh" (the tanh approximation, FLIP's) or "quick"
  (x * sigmoid(1.702 x), the QuickGELU of OpenAI's CLIP weights).

  "exact" is `flax.linen.gelu` (x/2 erfc(-x / sqrt 2): within 4e-7 of float64), or with
  `erf_form` x/2 (1 + erf(x / sqrt 2)) (torch's formula; within 1.1e-6 of float64, as torch's
  own). The erf form is what bfloat16 compute uses (`MlpBlock`): XLA expands erfc into both of
  its branches and three divisions per element, which made this one activation a large share of
  the bfloat16 image tower's time (docs/BENCHMARKS.md), and an error of 1e-6 is far below
  bfloat16's rounding. float32 compute keeps the more accurate erfc.
  """
  if kind == "quick":
    return x * jax.nn.sigmoid(jnp.asarray(1.702, x.dtype) * x)
  if kind == "tanh" or not erf_form:
    return nn.gelu(x, approximate=(kind == "tanh"))
  half = jnp.asarray(0.5, x.dtype)
  return half * x * (1 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


class LayerScale(nn.Module):
  """Per-channel scale of a residual branch (Touvron et al., CaiT), initialised to `init_value`."""

  init_value: float

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = param_with_axes("scale", nn.initializers.constant(self.init_value), (x.shape[-1],),
                            jnp.float32, axes=("embed",))
    return x * scale.astype(x.dtype)


class MlpBlock(nn.Module):
  """Two dense layers with a GELU between them."""

  mlp_dim: int
  dropout_rate: float = 0.0
  gelu: str = "exact"
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    width = x.shape[-1]
    # The activation reads the float32 accumulator and is rounded once (bfloat16 compute).
    h = Dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, kernel_init=self.kernel_init,
              round_output=False, name="Dense_0")(x)
    h = gelu(h, self.gelu, erf_form=precision.is_mixed(self.dtype)).astype(self.dtype)
    h = with_sharding_constraint(h, ("batch", "length", "mlp"))
    h = nn.Dropout(rate=self.dropout_rate)(h, deterministic=deterministic)
    y = Dense(width, ("mlp", "embed"), dtype=self.dtype, kernel_init=self.kernel_init,
              name="Dense_1")(h)
    return nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example, rescaling the survivors."""

  rate: float

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    keep_prob = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = jax.random.bernoulli(self.make_rng("droppath"), keep_prob, shape)
    return jnp.where(keep, x / keep_prob, jnp.zeros_like(x))


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)), each with drop path."""

  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  droppath_rate: float = 0.0
  layernorm_epsilon: float = 1e-6
  gelu: str = "exact"
  dtype: Dtype = jnp.float32
  qkv_layout: str = "fused"
  causal: bool = False
  layer_scale_init: Optional[float] = None

  def _scaled(self, y: Array, name: str) -> Array:
    if self.layer_scale_init is None:
      return y
    return LayerScale(self.layer_scale_init, name=name)(y)

  @nn.compact
  def __call__(self, x: Array, key_mask: Optional[Array], deterministic: bool) -> Array:
    x = with_sharding_constraint(x, ("batch", "length", "embed"))
    y = LayerNorm(self.layernorm_epsilon, self.dtype, name="LayerNorm_0")(x)
    attention = MultiHeadSelfAttention(self.num_heads, self.attention_dropout_rate, self.dtype,
                                       qkv_layout=self.qkv_layout, causal=self.causal,
                                       name="MultiHeadSelfAttention_0")
    y = attention(y, key_mask, deterministic=deterministic)
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
    y = self._scaled(y, "layerscale_msa")
    x = x + DropPath(self.droppath_rate, name="droppath_msa")(y, deterministic=deterministic)
    y = LayerNorm(self.layernorm_epsilon, self.dtype, name="LayerNorm_1")(x)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.gelu, self.dtype, name="MlpBlock_0")(
        y, deterministic=deterministic)
    y = self._scaled(y, "layerscale_mlp")
    x = x + DropPath(self.droppath_rate, name="droppath_mlp")(y, deterministic=deterministic)
    return with_sharding_constraint(x, ("batch", "length", "embed"))


class EncoderFields(nn.Module):
  """The hyperparameters of one `Encoder` stack: the fields of the stack and of every tower.

  The towers (ViT, text, MAE decoder) redeclare the first three with their own defaults and build
  their stack with `encoder_of`, so a new field of the stack reaches all of them from here.
  """

  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  droppath_rate: float = 0.0
  remat_policy: str = "none"
  layernorm_epsilon: float = 1e-6
  gelu: str = "exact"
  dtype: Dtype = jnp.float32
  qkv_layout: str = "fused"
  causal: bool = False
  layer_scale_init: Optional[float] = None


# The config keys (`transformer` of FLIP's towers, `model.decoder` of MAE) of the same name as the
# stack's fields; `layernorm_epsilon` and `dtype` are set per tower and per experiment.
ENCODER_CONFIG_KEYS = ("num_layers", "num_heads", "mlp_dim", "dropout_rate",
                       "attention_dropout_rate", "droppath_rate", "remat_policy", "gelu")
# Keys of the same configs that may be absent (the field's default then applies).
ENCODER_OPTIONAL_CONFIG_KEYS = ("qkv_layout", "causal", "layer_scale_init")


class Encoder(EncoderFields):
  """A stack of `EncoderBlock`s (drop path rising linearly with depth) and a final LayerNorm."""

  final_norm: bool = True

  @nn.compact
  def __call__(self, x: Array, key_mask: Optional[Array] = None, *, train: bool) -> Array:
    if not isinstance(self.remat_policy, str) or not self.remat_policy:
      raise ValueError(f"remat_policy must be a name ({REMAT_POLICIES} or any other for full "
                       f"remat), got {self.remat_policy!r}")
    check_choice("qkv_layout", self.qkv_layout, QKV_LAYOUTS)
    if self.gelu not in GELU_KINDS:
      raise ValueError(f"gelu must be one of {GELU_KINDS}, got {self.gelu!r}")
    block_cls = EncoderBlock
    if self.remat_policy != "none":
      # Argument 3 (`deterministic`) is a python bool: static for the rematerialised function.
      block_cls = nn.remat(EncoderBlock, policy=remat_policy_fn(self.remat_policy),
                           static_argnums=(3,))
    for layer in range(self.num_layers):
      droppath = self.droppath_rate * layer / max(self.num_layers - 1, 1)
      x = block_cls(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                    dropout_rate=self.dropout_rate,
                    attention_dropout_rate=self.attention_dropout_rate,
                    droppath_rate=droppath, layernorm_epsilon=self.layernorm_epsilon,
                    gelu=self.gelu, dtype=self.dtype, qkv_layout=self.qkv_layout,
                    causal=self.causal, layer_scale_init=self.layer_scale_init,
                    name=f"encoderblock_{layer:02d}")(x, key_mask, not train)
    if self.final_norm:
      x = LayerNorm(self.layernorm_epsilon, self.dtype, name="encoder_norm")(x)
    return x


def encoder_of(tower: EncoderFields, name: str = "Transformer", final_norm: bool = True) -> Encoder:
  """The `Encoder` that a tower's fields describe, as its submodule `name` (call it from the
  tower's compact method); `final_norm=False` leaves out its closing LayerNorm."""
  fields = {f.name: getattr(tower, f.name) for f in dataclasses.fields(EncoderFields)
            if f.name not in ("parent", "name")}
  return Encoder(**fields, final_norm=final_norm, name=name)


def sincos_1d(positions: Array, width: int, temperature: float) -> Array:
  """Transformer sin-cos embedding of 1-D positions: [n] -> [n, width] (sin half, then cos half)."""
  if width % 2:
    raise ValueError(f"sin-cos embedding width must be even, got {width}")
  omega = jnp.arange(width // 2, dtype=jnp.float32) / (width / 2.0)
  omega = 1.0 / (temperature ** omega)
  angles = positions.astype(jnp.float32)[:, None] * omega[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)


def sincos_2d(grid_h: int, grid_w: int, width: int, temperature: float = 10000.0) -> Array:
  """Fixed 2-D sin-cos position embedding [grid_h * grid_w, width] (row-major patch order).

  The first half of the channels encodes the column (x), the second half the row (y), each as
  [sin, cos]: the layout of MAE's and FLIP's tables, so their checkpoints see the positions they
  were trained with.
  """
  if width % 4:
    raise ValueError(f"2-D sin-cos embedding width must be divisible by 4, got {width}")
  rows, cols = jnp.meshgrid(jnp.arange(grid_h), jnp.arange(grid_w), indexing="ij")
  emb_h = sincos_1d(rows.reshape(-1), width // 2, temperature)
  emb_w = sincos_1d(cols.reshape(-1), width // 2, temperature)
  return jnp.concatenate([emb_w, emb_h], axis=1)


def as_dtype(name_or_dtype: Any) -> Dtype:
  """'float32' / 'bfloat16' (config strings) or a dtype -> a jnp dtype."""
  return jnp.dtype(name_or_dtype)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def config_fields(config: Any, keys: Sequence[str]) -> Dict[str, Any]:
  """{key: config.key} for config keys spelled like the model fields they set."""
  return {key: getattr(config, key) for key in keys}


def present_config_fields(config: Any, keys: Sequence[str]) -> Dict[str, Any]:
  """{key: config.key} for those of `keys` the config has (absent: the field's default)."""
  return {key: config[key] for key in keys if key in config}


def checked_fields(module_cls: type, kwargs: Dict[str, Any]) -> Dict[str, Any]:
  """`kwargs`, asserted to name fields of `module_cls` only (a config mapping's own check)."""
  field_names = {f.name for f in dataclasses.fields(module_cls)}
  assert set(kwargs) <= field_names, set(kwargs) - field_names
  return kwargs
