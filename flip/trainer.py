"""The partitioned train state and train step of a task.

`Trainer` builds, for one task under one partitioner: the optax chain (the task's own with
OWN_OPTIMIZER, else `flip.optim.make_optimizer`) inside t5x's `OptaxWrapper`, the abstract
`t5x.train_state.FlaxOptimTrainState` and its mesh axes (`partitioner.get_mesh_axes`), the
partitioned initialisation, and the partitioned train step (`p_train_step`, state donated).
Per-step randomness comes from (config.seed_jax, step), so a resumed run is identical.

Numeric faults: a step whose loss, gradient or updated state is not finite leaves the parameters
and optimizer state unchanged (the update is discarded on device; only the step counter advances,
so the state's step, which names checkpoints, stays the loop's step) and reports `nonfinite`. The
learning-rate schedule is indexed by the train state's step: every optax schedule counter
(`ScaleByScheduleState`) is set to it before each update, so the lr applied on device is the
logged one after skipped steps, while a skipped step still leaves the whole optimizer state
bitwise unchanged (Adam's own count, which drives its bias correction, counts only the updates
its moments have seen).
"""

import dataclasses
from typing import Any, Dict, Mapping

import flax
from flax import traverse_util
from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from t5x import optimizers as t5x_optimizers
from t5x import train_state as t5x_train_state

from flip import checkpoints
from flip import optim
from flip.tasks import registry


@dataclasses.dataclass
class Progress:
  """Where a run is: optimizer step and samples consumed (for the schedule in virtual epochs)."""
  step: int = 0
  samples_seen: float = 0.0


def _is_schedule_state(node: Any) -> bool:
  return isinstance(node, optax.ScaleByScheduleState)


def index_schedules_by_step(state):
  """`state` with every optax schedule counter set to the train state's step."""

  def index(node):
    if _is_schedule_state(node):
      return optax.ScaleByScheduleState(count=jnp.asarray(state.step, node.count.dtype))
    return node

  return jax.tree.map(index, state, is_leaf=_is_schedule_state)


def _all_finite(tree) -> jax.Array:
  """True if no floating leaf of `tree` holds an inf or a NaN.

  x * 0 is 0 for every finite x and NaN for inf and NaN, so each leaf's sum of x * 0 is 0 or NaN
  (it cannot overflow, unlike a sum of x): one fused multiply-reduce per leaf, where
  `all(isfinite(x))` makes XLA's CPU backend write a boolean array and reduce it in two passes.
  """
  probes = [jnp.sum(leaf * 0, dtype=jnp.float32) for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.floating)]
  return jnp.isfinite(jnp.sum(jnp.stack(probes))) if probes else jnp.asarray(True)


def _batch_mesh_axes(task, partitioner) -> Dict[str, Any]:
  return {k: nn_partitioning.logical_to_mesh_axes(v, partitioner.logical_axis_rules)
          for k, v in task.batch_logical_axes().items()}


class Trainer:
  """The partitioned train state and train step of a task (the loop is flip.train)."""

  def __init__(self, config: ml_collections.ConfigDict, task, partitioner,
               progress: Progress):
    self.config = config
    self.task = task
    self.partitioner = partitioner
    self.accum_steps = config.grad_accum_steps
    start_step, start_epoch = progress.step, progress.samples_seen / config.samples_per_epoch
    if progress.samples_seen == progress.step * config.batch_size:
      # Same batch size all along: the schedule anchored at step 0 is the same function, and
      # using it keeps a resumed run bitwise equal to an uninterrupted one (an anchor at the
      # resume step rounds the float32 epoch position differently by one ulp).
      start_step, start_epoch = 0, 0.0
    # A task may build its own chain (frozen parameters, per-parameter lr multipliers).
    make_optimizer = (task.make_optimizer if task.has(registry.Capability.OWN_OPTIMIZER)
                      else optim.make_optimizer)
    self.tx = make_optimizer(config, start_step=start_step, start_epoch=start_epoch)
    # One optimizer definition: it is static metadata of the train-state pytree, so every state
    # (initialised, restored, partitioned) must share this very object.
    self.optimizer_def = t5x_optimizers.OptaxWrapper(self.tx)
    self._init_rng = jax.random.PRNGKey(config.seed_jax)
    self.state_shape = jax.eval_shape(self._init_state, self._init_rng)
    self.state_axes = partitioner.get_mesh_axes(self.state_shape)
    self.batch_axes = _batch_mesh_axes(task, partitioner)
    data_layout = partitioner.get_data_layout(config.batch_size)
    self.data_layout = data_layout
    self._p_init = partitioner.partition(self._init_state, in_axis_resources=None,
                                         out_axis_resources=self.state_axes)
    self.p_train_step = partitioner.partition(
        self._train_step, in_axis_resources=(self.state_axes, self.batch_axes),
        out_axis_resources=(self.state_axes, None), donate_argnums=(0,))

  def _init_state(self, rng):
    variables = flax.core.freeze(self.task.init_variables(rng))
    state = t5x_train_state.FlaxOptimTrainState.create(self.optimizer_def, variables)
    # A strongly typed step, as a restored one is: fresh and resumed runs then share one compiled
    # train step (a weakly typed step is another program, compiled again by every restart).
    return state.replace_step(jnp.asarray(state.step, jnp.int32))

  def init_state(self):
    return self._p_init(self._init_rng)

  def _train_step(self, state, batch):
    base = jax.random.PRNGKey(self.config.seed_jax)
    rng = jax.random.fold_in(jax.random.fold_in(base, 1), state.step)
    if self.task.has(registry.Capability.MUTABLE_COLLECTIONS):
      # Tasks with non-parameter collections (BatchNorm statistics) update them every step.
      loss, metrics, grads, mutables = self.task.compute_grads(
          state.params, batch, rng, self.accum_steps, flax_mutables=state.flax_mutables)
    else:
      loss, metrics, grads = self.task.compute_grads(state.params, batch, rng, self.accum_steps)
      mutables = state.flax_mutables
    grad_norm = optax.global_norm(grads)
    state = index_schedules_by_step(state)
    new_state = state.apply_gradient(grads, learning_rate=None, flax_mutables=mutables)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(new_state)
    # A conditional, not a select per leaf: XLA fuses the scalar `finite` (a chain over every
    # leaf's probe) into each consumer, so a select per leaf copies the whole chain into every
    # leaf's fusion: quadratic in the number of leaves (compile time and memory: docs/BENCHMARKS.md,
    # "Host allocator and the non-finite guard"). A conditional evaluates `finite` once.
    new_state = jax.lax.cond(finite, lambda: new_state, lambda: state)
    new_state = new_state.replace_step(state.step + 1)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                   nonfinite=jnp.logical_not(finite).astype(jnp.int32))
    return new_state, metrics

  def global_batch(self, local_batch: Mapping[str, np.ndarray]) -> Dict[str, jax.Array]:
    """Per-process numpy batch -> global arrays sharded over the data axis."""
    mesh = self.partitioner.mesh
    out = {}
    for key, axes in self.batch_axes.items():
      sharding = jax.sharding.NamedSharding(mesh, axes)
      out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(local_batch[key]))
    return out

  def train_step(self, state, batch):
    return self.p_train_step(state, self.global_batch(batch))

  def replace_params(self, state, params):
    """Puts `params` into `state` with the state's sharding (fresh optimizer state kept)."""
    params = flax.core.freeze(params)
    p_replace = self.partitioner.partition(
        lambda s, p: s.replace_params(p),
        in_axis_resources=(self.state_axes, self.state_axes.params),
        out_axis_resources=self.state_axes, donate_argnums=(0,))
    return p_replace(state, params)

  def merge_params(self, state, partial_params):
    """Like `replace_params` for a subset of the parameters (e.g. a pretrained encoder under a
    fresh head): the keys of `partial_params` are replaced, every other parameter is kept."""
    flat_new = traverse_util.flatten_dict(flax.core.unfreeze(partial_params), sep="/")
    flat_axes = traverse_util.flatten_dict(flax.core.unfreeze(self.state_axes.params), sep="/")
    unknown = sorted(set(flat_new) - set(flat_axes))
    if unknown:
      raise checkpoints.CheckpointError(f"pretrained parameters the model does not have: "
                                        f"{', '.join(unknown[:3])}")

    def merge(s, new):
      flat = traverse_util.flatten_dict(flax.core.unfreeze(s.params), sep="/")
      flat.update(new)
      return s.replace_params(flax.core.freeze(traverse_util.unflatten_dict(flat, sep="/")))

    p_merge = self.partitioner.partition(
        merge, in_axis_resources=(self.state_axes, {k: flat_axes[k] for k in flat_new}),
        out_axis_resources=self.state_axes, donate_argnums=(0,))
    return p_merge(state, flat_new)
