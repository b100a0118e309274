"""Builders shared by the training loop, the evaluators and the command-line tools.

Owns: the task of a config (`build_task`, gin-bindable name), the partitioner (`build_partitioner`,
gin-bindable class; `checked_partitioner` turns mesh problems into one-line ConfigErrors and checks
a batch size against the data-parallel size), the shapes and mesh axes of a task's variables
(parameters and the other collections, e.g. BatchNorm statistics), placing host arrays onto the
mesh with those axes, and loading parameters from checkpoints: `config.pretrain_dir` for training
(the task's subset or every parameter) and a checkpoint's parameters and collections for
evaluation (`config.pretrain_dir`, else the newest checkpoint of the workdir).

Nothing here runs a training step; the loop (flip.train) and the evaluators (flip.evals) import
this module, never each other.
"""

from typing import Any, Dict, Mapping, Optional, Tuple

import flax
from flax.linen import partitioning as nn_partitioning
import gin
import jax
import numpy as np

from flip import checkpoints
from flip import config as config_lib
from flip import partitioning
from flip.tasks import registry

PARAMS = "params"
AXES_SUFFIX = "_axes"


@gin.configurable(denylist=["config"])
def build_task(config: Any, task_name: Optional[str] = None) -> registry.Task:
  """The task named by the gin binding `builders.build_task.task_name` or else by `config.task`
  (default "flip"); a binding that disagrees with `config.task` is refused."""
  configured = config.get("task")
  if task_name is not None and configured is not None and task_name != configured:
    raise config_lib.ConfigError(
        f"gin binds builders.build_task.task_name={task_name!r} but config.task={configured!r}")
  return registry.get_task(config, task_name or configured or registry.DEFAULT_TASK)


@gin.configurable(denylist=["partitioning_config"])
def build_partitioner(partitioning_config: Any,
                      partitioner_cls: Any = partitioning.FlipPjitPartitioner):
  """`config.partitioning` -> partitioner; `partitioner_cls` can be rebound in gin."""
  return partitioning.make_partitioner(partitioning_config, partitioner_cls)


def checked_partitioner(config: Any, batch_size: Optional[int] = None,
                        batch_key: str = "config.batch_size"):
  """The partitioner with its mesh built, `batch_size` checked against the data-parallel size;
  any problem is a one-line ConfigError naming the key."""
  try:
    partitioner = build_partitioner(config.partitioning)
    mesh = partitioner.mesh
  except ValueError as err:
    # gin appends "In call to configurable ..." lines to exceptions raised under it.
    raise config_lib.ConfigError(str(err).splitlines()[0]) from None
  if batch_size is not None:
    check_batch_size(partitioner, batch_size, batch_key)
  del mesh
  return partitioner


def check_batch_size(partitioner: Any, batch_size: int, key: str) -> None:
  data_size = partitioner.data_mesh_size
  if batch_size <= 0 or batch_size % data_size:
    raise config_lib.ConfigError(
        f"{key} {batch_size} is not divisible by the data-parallel size {data_size} "
        f"(mesh {dict(partitioner.mesh.shape)} on {len(jax.devices())} devices)")


# --- variables and their axes -------------------------------------------------------------------

def variable_shapes(task: registry.Task) -> Dict[str, Any]:
  """Every collection of the task's variables as ShapeDtypeStructs (no compute)."""
  return flax.core.unfreeze(jax.eval_shape(task.init_variables, jax.random.PRNGKey(0)))


def params_shapes(task: registry.Task) -> Dict[str, Any]:
  return variable_shapes(task)[PARAMS]


def mutable_shapes(task: registry.Task) -> Dict[str, Any]:
  """The collections besides params and their axes (empty without MUTABLE_COLLECTIONS)."""
  return {name: tree for name, tree in variable_shapes(task).items()
          if name != PARAMS and not name.endswith(AXES_SUFFIX)}


def _is_spec(x: Any) -> bool:
  return isinstance(x, jax.sharding.PartitionSpec)


def _mesh_axes(logical_axes: Any, partitioner: Any) -> Any:
  logical = nn_partitioning.get_axis_names(logical_axes)
  return jax.tree.map(
      lambda axes: nn_partitioning.logical_to_mesh_axes(axes, partitioner.logical_axis_rules),
      flax.core.unfreeze(logical), is_leaf=_is_spec)


def params_mesh_axes(task: registry.Task, partitioner: Any) -> Dict[str, Any]:
  """PartitionSpecs of the task's parameters under the partitioner's rules (as training uses)."""
  return _mesh_axes(variable_shapes(task)[PARAMS + AXES_SUFFIX], partitioner)


def mutables_mesh_axes(task: registry.Task, partitioner: Any) -> Dict[str, Any]:
  """PartitionSpecs of the task's other collections (e.g. batch_stats), by collection."""
  variables = variable_shapes(task)
  return {name: _mesh_axes(variables[name + AXES_SUFFIX], partitioner)
          for name in mutable_shapes(task)}


def place_host_tree(tree: Mapping[str, Any], specs: Mapping[str, Any], mesh: Any) -> Any:
  """Host arrays every process holds in full -> global arrays with the given PartitionSpecs."""
  return jax.tree.map(
      lambda x, spec: jax.make_array_from_callback(
          np.shape(x), jax.sharding.NamedSharding(mesh, spec), lambda index: np.asarray(x)[index]),
      flax.core.unfreeze(tree), specs, is_leaf=_is_spec)


# --- parameters from checkpoints ----------------------------------------------------------------

def load_pretrained_params(config: Any, task: registry.Task,
                           params_shapes_tree: Mapping[str, Any]) -> Dict[str, Any]:
  """`config.pretrain_dir`'s parameters fitted to the model (host arrays, no compute): the task's
  subset with LOADS_PRETRAINED_SUBSET, else every parameter. One-line ConfigError on a misfit."""
  try:
    if task.has(registry.Capability.LOADS_PRETRAINED_SUBSET):
      return task.load_pretrained_params(config.pretrain_dir, params_shapes_tree)
    return checkpoints.load_pretrained_params(config.pretrain_dir, params_shapes_tree,
                                              posemb_grid=task.posemb_grid)
  except checkpoints.CheckpointError as err:
    raise config_lib.ConfigError(f"config.pretrain_dir: {err}") from None


def eval_checkpoint_dir(config: Any, workdir: str) -> str:
  """`config.pretrain_dir` if set, else the newest complete checkpoint in `workdir`.

  Raises `checkpoints.CheckpointError` (one line naming the path) when there is none.
  """
  if config.get("pretrain_dir"):
    return checkpoints.find_checkpoint_dir(config.pretrain_dir)
  step = checkpoints.latest_complete_step(workdir)
  if step is None:
    raise checkpoints.CheckpointError(
        f"no checkpoint to evaluate: config.pretrain_dir is empty and {workdir} holds no complete "
        "checkpoint_<step> directory")
  return checkpoints.checkpoint_dir(workdir, step)


def load_eval_variables(ckpt_dir: str, task: registry.Task,
                        partitioner: Any) -> Tuple[Any, Any]:
  """A checkpoint's parameters and other collections (BatchNorm statistics), fitted to the task's
  model and placed on the partitioner's mesh with the training sharding."""
  contents = checkpoints.load_state_tree(ckpt_dir)
  params = checkpoints.match_params(contents.get("target", {}), params_shapes(task),
                                    posemb_grid=task.posemb_grid, source=ckpt_dir)
  mutables = mutable_shapes(task)
  if mutables:
    mutables = checkpoints.match_params(contents.get("flax_mutables", {}), mutables,
                                        source=ckpt_dir)
  mesh = partitioner.mesh
  return (place_host_tree(params, params_mesh_axes(task, partitioner), mesh),
          place_host_tree(mutables, mutables_mesh_axes(task, partitioner), mesh))
