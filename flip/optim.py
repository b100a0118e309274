"""Optimizers, learning-rate schedules in virtual epochs, weight-decay masks, layer-wise lr decay.

This module owns every number that turns a gradient into a parameter update: the optax chain
(optional global-norm clipping, then AdamW, SGD with momentum or LARS), the learning-rate schedule,
which parameters are weight-decayed, and the per-parameter lr multipliers used for layer-wise lr
decay when fine-tuning. The training loop wraps the chain in `t5x.optimizers.OptaxWrapper`; every
state type the chain creates is one t5x knows how to partition (`OptaxStatePartitionRules`).

Learning rate, in FLIP's convention:
  peak lr = config.learning_rate * config.batch_size / 256   (base lr is "per 256 samples")
  linear warmup from config.warmup_abs_lr to the peak over config.warmup_epochs, then a half
  cosine from the peak down to config.min_abs_lr at config.num_epochs; after num_epochs the lr
  stays at min_abs_lr.
Both phases are measured in "virtual epochs" of config.samples_per_epoch samples (one ImageNet-1k
epoch, 1,281,167 images, for FLIP), never in steps. `epoch_schedule` is the definition;
`step_schedule` only converts an optimizer step into an epoch position:
  epochs(step) = start_epoch + (step - start_step) * batch_size / samples_per_epoch.

Resuming (the decision the design leaves to this module): the step the schedule receives is optax's
own update counter, which is restored with the optimizer state, so after a restore at global step S
the training loop passes start_step=S and start_epoch = samples seen so far / samples_per_epoch (it
keeps the samples seen in the checkpoint). The schedule then continues from the true position in
virtual epochs:
  * changed num_epochs: warmup is not restarted; from the current epoch position on, the cosine is
    the one for the new total, i.e. lr = min + (peak - min) * (1 + cos(pi * (e - warmup) /
    (new_num_epochs - warmup))) / 2. The lr at the resume point therefore moves to the value the new
    schedule has at that epoch (a longer run sits higher on its cosine); a new total already behind
    the current position gives min_abs_lr.
  * changed batch size: the peak scales with the new batch (lr is per 256 samples), each further
    step advances the position by the new batch / samples_per_epoch, and the epoch position at the
    resume point is unchanged. The only jump at the resume point is the batch-size ratio.
Counting steps instead (open_clip's behaviour) would place a resumed run at the wrong point of the
cosine whenever either number changes. With gradient accumulation, config.batch_size is the
effective batch of one optimizer update.

Weight decay: decoupled (AdamW), masked by parameter *path component names*. A parameter is not
decayed when any component of its path (module names and the leaf name, e.g.
("img_encoder", "encoderblock_03", "LayerNorm_0", "scale")) matches one of config.opt.no_decay_names
as a whole: a plain name must be equal to the component ("bias" matches "bias", never "qkv_bias" or
"biased_norm"; "norm" never matches "LayerNorm_0"), and a name holding shell wildcards is an
`fnmatch` pattern for the whole component ("*_bias" matches "qkv_bias" and "out_bias", the fused
attention biases of flip.models.layers). Norm layers are excluded through their leaf names "scale"
and "bias". config.exclude_wd=False decays every parameter. For SGD the decay is the classic
coupled L2 term added to the gradient before momentum; for LARS it is coupled too, and the same mask
also exempts those parameters from the trust ratio (as in MAE's linear probe).

`opt.flatten_params` (FLIP's AdamW option, set by its H/14 configs): Adam's first and second
moments of every 2-D parameter are kept as [rows * cols, 1] columns instead of the parameter's
shape. The updates are the same numbers (the moments are reshaped around the same arithmetic);
what changes is the optimizer state's layout, so `partition_states` can shard those moments over
`data` along the flattened axis, which divides evenly by far more device counts than a kernel's
rows do. Unlike FLIP's version, config.opt_mu_dtype is still honoured for the first moment. The
columns have no axis to shard over `model`, so flip.config refuses it with num_partitions > 1.

Layer-wise lr decay: `layer_decay_multipliers` gives every parameter decay ** (num_layers + 1 -
layer_id) and `scale_updates_per_param` (appended after the lr, so it scales the decoupled weight
decay too, like a per-group lr in PyTorch) applies them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import optax

PyTree = Any
PathNames = tuple[str, ...]

# FLIP's convention: config.learning_rate is the lr for a batch of this many samples.
LR_REFERENCE_BATCH_SIZE = 256

# Parameters FLIP does not weight-decay: biases (including our models' fused "qkv_bias" and
# "out_bias"), norm scales/biases, position embeddings, the cls token and the contrastive logit
# scale/bias (the design's list), plus MAE's mask token.
DEFAULT_NO_DECAY_NAMES = ("bias", "*_bias", "scale", "pos_embedding", "cls", "logit_scale",
                          "logit_bias", "mask_token")

# SGD/LARS defaults when config.opt does not set them: momentum 0.9 and trust coefficient 1e-3 as
# in You et al. 2017 (LARS) and MAE's linear-probe recipe.
DEFAULT_MOMENTUM = 0.9
DEFAULT_LARS_TRUST_COEFFICIENT = 1e-3

# Characters that make a no_decay_names entry an fnmatch pattern instead of a plain name.
_WILDCARD_CHARS = "*?["

OPT_ADAMW = "adamw"
OPT_SGD = "sgd"
OPT_LARS = "lars"
SUPPORTED_OPT_TYPES = (OPT_ADAMW, OPT_SGD, OPT_LARS)

# Adam's denominator epsilon (outside the square root), as in FLIP/MAE (PyTorch's default).
ADAMW_EPS = 1e-8


def _require(config: ml_collections.ConfigDict, dotted_key: str) -> Any:
  """Returns config.<dotted_key> or raises a one-line error naming the key."""
  node = config
  for part in dotted_key.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      raise KeyError(f"config.{dotted_key} is required by flip.optim but is missing")
    node = node[part]
  return node


def _optional(config: ml_collections.ConfigDict, dotted_key: str, default: Any) -> Any:
  try:
    return _require(config, dotted_key)
  except KeyError:
    return default


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
  """The schedule's numbers read (and checked) from a config."""
  peak_lr: float
  batch_size: int
  samples_per_epoch: int
  warmup_epochs: float
  num_epochs: float
  warmup_abs_lr: float
  min_abs_lr: float

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> ScheduleSpec:
    batch_size = int(_require(config, "batch_size"))
    samples_per_epoch = int(_require(config, "samples_per_epoch"))
    warmup_epochs = float(_require(config, "warmup_epochs"))
    num_epochs = float(_require(config, "num_epochs"))
    if batch_size <= 0:
      raise ValueError(f"config.batch_size must be positive, got {batch_size}")
    if samples_per_epoch <= 0:
      raise ValueError(f"config.samples_per_epoch must be positive, got {samples_per_epoch}")
    if warmup_epochs < 0:
      raise ValueError(f"config.warmup_epochs must be >= 0, got {warmup_epochs}")
    if num_epochs <= warmup_epochs:
      raise ValueError(f"config.num_epochs ({num_epochs}) must exceed config.warmup_epochs "
                       f"({warmup_epochs})")
    base_lr = float(_require(config, "learning_rate"))
    return cls(peak_lr=base_lr * batch_size / LR_REFERENCE_BATCH_SIZE,
               batch_size=batch_size,
               samples_per_epoch=samples_per_epoch,
               warmup_epochs=warmup_epochs,
               num_epochs=num_epochs,
               warmup_abs_lr=float(_require(config, "warmup_abs_lr")),
               min_abs_lr=float(_require(config, "min_abs_lr")))


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """config.learning_rate scaled from the reference batch of 256 to config.batch_size."""
  return ScheduleSpec.from_config(config).peak_lr


def epoch_schedule(config: ml_collections.ConfigDict) -> Callable[[Any], jax.Array]:
  """The learning rate as a function of the (fractional) virtual epoch; jit-traceable."""
  spec = ScheduleSpec.from_config(config)
  cosine_epochs = spec.num_epochs - spec.warmup_epochs

  def lr_at_epoch(epoch):
    epoch = jnp.asarray(epoch, jnp.float32)
    if spec.warmup_epochs > 0:
      warmup_lr = spec.warmup_abs_lr + (spec.peak_lr - spec.warmup_abs_lr) * (
          epoch / spec.warmup_epochs)
    else:
      warmup_lr = jnp.asarray(spec.peak_lr, jnp.float32)
    progress = jnp.clip((epoch - spec.warmup_epochs) / cosine_epochs, 0.0, 1.0)
    cosine_lr = spec.min_abs_lr + (spec.peak_lr - spec.min_abs_lr) * 0.5 * (
        1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(epoch < spec.warmup_epochs, warmup_lr, cosine_lr)

  return lr_at_epoch


def step_schedule(config: ml_collections.ConfigDict, start_step: int = 0,
                  start_epoch: float = 0.0) -> optax.Schedule:
  """Maps an optimizer step to the lr at epoch start_epoch + (step - start_step) * batch / spe."""
  spec = ScheduleSpec.from_config(config)
  lr_at_epoch = epoch_schedule(config)
  epochs_per_step = spec.batch_size / spec.samples_per_epoch

  def lr_at_step(step):
    # Float before multiplying: step * batch_size overflows int32 within a FLIP run.
    steps_done = jnp.asarray(step, jnp.float32) - float(start_step)
    return lr_at_epoch(float(start_epoch) + steps_done * epochs_per_step)

  return lr_at_step


def learning_rate_at(config: ml_collections.ConfigDict, step: int, start_step: int = 0,
                     start_epoch: float = 0.0) -> float:
  """The lr the optimizer applies at `step`, as a host float for logging."""
  return float(step_schedule(config, start_step, start_epoch)(step))


def param_path_names(path: Sequence[Any]) -> PathNames:
  """A jax key path as a tuple of plain strings, e.g. ("encoderblock_0", "Dense_0", "kernel")."""
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      names.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      names.append(str(key.key))
    else:
      names.append(str(key))
  return tuple(names)


def no_decay_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Path component names exempt from weight decay; empty when config.exclude_wd is False."""
  if not _require(config, "exclude_wd"):
    return ()
  names = _optional(config, "opt.no_decay_names", DEFAULT_NO_DECAY_NAMES)
  if isinstance(names, str):
    raise TypeError(f"config.opt.no_decay_names must be a sequence of names, got the string "
                    f"{names!r}")
  return tuple(names)


def _matches_component(name_or_pattern: str, component: str) -> bool:
  if any(char in name_or_pattern for char in _WILDCARD_CHARS):
    return fnmatch.fnmatchcase(component, name_or_pattern)
  return component == name_or_pattern


def weight_decay_mask(params: PyTree,
                      excluded_names: Sequence[str] = DEFAULT_NO_DECAY_NAMES) -> PyTree:
  """True for decayed parameters: no path component matches a name in excluded_names as a whole."""
  excluded = tuple(excluded_names)

  def decayed(path, _):
    return not any(_matches_component(name, component)
                   for name in excluded for component in param_path_names(path))

  return jax.tree_util.tree_map_with_path(decayed, params)


def layer_decay_multipliers(params: PyTree, num_layers: int, decay: float,
                            layer_of: Callable[[PathNames], int]) -> PyTree:
  """Per-parameter lr multipliers decay ** (num_layers + 1 - layer_of(path)).

  layer_of maps a parameter's path names to its layer id: 0 for the embeddings, i for the i-th
  transformer block (1-based), num_layers + 1 for everything above the last block (the head).
  """
  top_layer = num_layers + 1

  def multiplier(path, _):
    names = param_path_names(path)
    layer_id = layer_of(names)
    if not 0 <= layer_id <= top_layer:
      raise ValueError(f"layer_of({'/'.join(names)}) = {layer_id} is outside [0, {top_layer}]")
    return decay ** (top_layer - layer_id)

  return jax.tree_util.tree_map_with_path(multiplier, params)


def scale_updates_per_param(
    multipliers: Union[PyTree, Callable[[PyTree], PyTree]]) -> optax.GradientTransformation:
  """Multiplies each update by its own scalar (a pytree like the params, or a function of them).

  Stateless (optax.EmptyState), so t5x partitions it without extra rules.
  """

  def update_fn(updates, state, params=None):
    if callable(multipliers):
      if params is None:
        raise ValueError("scale_updates_per_param with a multiplier function needs params")
      scales = multipliers(params)
    else:
      scales = multipliers
    scaled = jax.tree_util.tree_map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales)
    return scaled, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _mu_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
  name = _require(config, "opt_mu_dtype")
  try:
    return jnp.dtype(name)
  except TypeError as error:
    raise ValueError(f"config.opt_mu_dtype={name!r} is not a dtype name") from error


def flatten_2d(tree: PyTree) -> PyTree:
  """Every 2-D leaf reshaped to a [rows * cols, 1] column; other leaves unchanged."""
  return jax.tree_util.tree_map(lambda x: x.reshape(-1, 1) if x.ndim == 2 else x, tree)


def with_flattened_2d_params(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` run on the flattened view (`flatten_2d`) of the params and updates; the updates it
  returns get their parameters' shapes back, its state keeps the flattened shapes."""

  def init_fn(params):
    return inner.init(flatten_2d(params))

  def update_fn(updates, state, params=None):
    flat_params = None if params is None else flatten_2d(params)
    new_updates, new_state = inner.update(flatten_2d(updates), state, flat_params)
    shaped = jax.tree_util.tree_map(lambda u, g: u.reshape(g.shape), new_updates, updates)
    return shaped, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(config: ml_collections.ConfigDict, start_step: int = 0, start_epoch: float = 0.0,
                   *, lr_multipliers: Union[PyTree, Callable[[PyTree], PyTree], None] = None
                   ) -> optax.GradientTransformation:
  """The optax chain for config.opt_type ("adamw", "sgd" or "lars").

  Args:
    config: the run config (keys listed in the module docstring).
    start_step, start_epoch: where a resumed run stands (see the module docstring).
    lr_multipliers: optional per-parameter lr multipliers (e.g. `layer_decay_multipliers`), a
      pytree like the params or a function of the params.
  """
  opt_type = _require(config, "opt_type")
  if opt_type not in SUPPORTED_OPT_TYPES:
    raise ValueError(f"config.opt_type={opt_type!r} is not one of {SUPPORTED_OPT_TYPES}")
  schedule = step_schedule(config, start_step, start_epoch)
  weight_decay = float(_require(config, "opt.weight_decay"))
  excluded = no_decay_names(config)

  def decay_mask(params):
    return weight_decay_mask(params, excluded)

  mu_dtype = _mu_dtype(config)
  flatten_params = bool(_optional(config, "opt.flatten_params", False))
  if flatten_params and opt_type != OPT_ADAMW:
    raise ValueError(f"config.opt.flatten_params=True is FLIP's AdamW option; opt_type is "
                     f"{opt_type!r}")
  if opt_type == OPT_ADAMW:
    # optax.adamw's three steps, so the moments can live in the flattened layout.
    scale_by_adam = optax.scale_by_adam(b1=float(_require(config, "opt.b1")),
                                        b2=float(_require(config, "opt.b2")),
                                        eps=ADAMW_EPS, mu_dtype=mu_dtype)
    if flatten_params:
      scale_by_adam = with_flattened_2d_params(scale_by_adam)
    optimizer = optax.chain(scale_by_adam,
                            optax.add_decayed_weights(weight_decay, decay_mask),
                            optax.scale_by_learning_rate(schedule))
  else:
    momentum = float(_optional(config, "opt.momentum", DEFAULT_MOMENTUM))
    coupled_decay = optax.add_decayed_weights(weight_decay, mask=decay_mask)
    if opt_type == OPT_SGD:
      optimizer = optax.chain(
          coupled_decay, optax.sgd(schedule, momentum=momentum, accumulator_dtype=mu_dtype))
    else:
      # optax.lars' steps, composed here so the momentum buffer honours config.opt_mu_dtype.
      trust_coefficient = float(
          _optional(config, "opt.trust_coefficient", DEFAULT_LARS_TRUST_COEFFICIENT))
      optimizer = optax.chain(
          coupled_decay,
          optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient),
                       decay_mask),
          optax.scale_by_learning_rate(schedule),
          optax.trace(decay=momentum, accumulator_dtype=mu_dtype))

  transforms = []
  clip_grad = float(_require(config, "opt.clip_grad"))
  if clip_grad < 0:
    raise ValueError(f"config.opt.clip_grad must be >= 0 (0 = off), got {clip_grad}")
  if clip_grad > 0:
    transforms.append(optax.clip_by_global_norm(clip_grad))
  transforms.append(optimizer)
  if lr_multipliers is not None:
    transforms.append(scale_updates_per_param(lr_multipliers))
  return optax.chain(*transforms)
