"""FLIP's additions around t5x's `PjitPartitioner` (which does all the partitioning work).

What lives here, and only this:
- `FLIP_AXIS_RULES`: the logical axis names our towers use beyond t5x's standard rules (patch
  kernel spatial axes and leading singleton axes `_null*`, the projection output `proj`), all
  replicated. They are appended to `t5x.partitioning.standard_logical_axis_rules`.
- The mesh choice. t5x's CPU mesh puts every local device on the `model` axis (process x local
  devices), which is not what a data-parallel CPU run or a simulated data=4 x model=2 test wants.
  With `mesh_shape=(data, model)`, or on CPU, the mesh is built explicitly as (data, model) from
  the global device list in process order, so `model` stays inside a process and `data` spans
  processes. On TPU/GPU without `mesh_shape`, t5x's own `default_mesh` is used unchanged.
- `partition_states` with FLIP's meaning: the optimizer state (Adam moments) of every parameter
  with two or more axes (the 2-D kernels, and also the 3-/4-D attention and patch kernels, the
  token and position tables and the fused q/k/v bias) is additionally sharded over `data`
  (ZeRO-1 style), on its largest axis that is not already sharded and divides evenly; parameters
  keep the rules' sharding. (t5x's
  `parameter_partitioning_dims=2` is the further, FSDP-style option that shards parameters too.)

As in FLIP, the keys of `config.partitioning` are this class's constructor arguments.
"""

import inspect
from typing import Any, Optional, Sequence, Tuple

import gin
import jax
from jax.sharding import Mesh, PartitionSpec
import numpy as np
from flax import traverse_util
from t5x import partitioning as t5x_partitioning

FLIP_AXIS_RULES: Tuple[Tuple[str, Optional[str]], ...] = (
    ("_null0", None),
    ("_null1", None),
    ("_null2", None),
    ("proj", None),
)
# gin macros resolve only registered constants (by dotted suffix; import aliases do not apply), so
# gin files pass the rules as %flip.partitioning.FLIP_AXIS_RULES (or %partitioning.FLIP_AXIS_RULES).
gin.constant("flip.partitioning.FLIP_AXIS_RULES", FLIP_AXIS_RULES)
_OPTIMIZER_STATE_PREFIX = "state/param_states/"


def flip_logical_axis_rules(activation_partitioning_dims: int = 1,
                            parameter_partitioning_dims: int = 1):
  """t5x's standard rules with FLIP's additions appended."""
  return t5x_partitioning.standard_logical_axis_rules(
      activation_partitioning_dims=activation_partitioning_dims,
      parameter_partitioning_dims=parameter_partitioning_dims,
      additional_rules=FLIP_AXIS_RULES)


def explicit_mesh(data: int, model: int, backend: Optional[str] = None) -> Mesh:
  """A (data, model) mesh over all devices in (process, id) order."""
  devices = sorted(jax.devices(backend), key=lambda d: (d.process_index, d.id))
  if data * model != len(devices):
    raise ValueError(f"config.partitioning mesh (data={data}, model={model}) needs "
                     f"{data * model} devices, but {len(devices)} are available")
  return Mesh(np.asarray(devices, dtype=object).reshape(data, model), ("data", "model"))


@gin.configurable
class FlipPjitPartitioner(t5x_partitioning.PjitPartitioner):
  """t5x's PjitPartitioner with FLIP's rules, an explicit mesh option and partition_states."""

  def __init__(self,
               num_partitions: Optional[int] = 1,
               partition_states: bool = False,
               parameter_partitioning_dims: int = 1,
               activation_partitioning_dims: int = 1,
               mesh_shape: Sequence[int] = (),
               logical_axis_rules: Optional[Sequence[Tuple[str, Any]]] = None,
               model_parallel_submesh: Optional[Tuple[int, int, int, int]] = None,
               params_on_devices: bool = True,
               backend: Optional[str] = None,
               ici_mesh_shape: Optional[Sequence[int]] = None,
               dcn_mesh_shape: Optional[Sequence[int]] = None):
    if logical_axis_rules is None:
      logical_axis_rules = flip_logical_axis_rules(activation_partitioning_dims,
                                                   parameter_partitioning_dims)
    mesh_shape = tuple(mesh_shape or ())
    if mesh_shape and len(mesh_shape) != 2:
      raise ValueError(f"config.partitioning.mesh_shape must be (data, model), got {mesh_shape}")
    if mesh_shape and num_partitions and mesh_shape[1] != num_partitions:
      raise ValueError(f"config.partitioning.mesh_shape {mesh_shape} disagrees with "
                       f"config.partitioning.num_partitions={num_partitions}")
    num_devices = len(jax.devices(backend))
    model = mesh_shape[1] if mesh_shape else (num_partitions or 1)
    if not model_parallel_submesh and num_devices % model:
      raise ValueError(f"config.partitioning.num_partitions={model} does not divide the "
                       f"{num_devices} available devices")
    super().__init__(
        num_partitions=None if model_parallel_submesh else model,
        model_parallel_submesh=model_parallel_submesh,
        params_on_devices=params_on_devices,
        backend=backend,
        ici_mesh_shape=ici_mesh_shape,
        dcn_mesh_shape=dcn_mesh_shape,
        logical_axis_rules=logical_axis_rules)
    self._partition_states = partition_states
    self._mesh_shape = mesh_shape
    # The mesh arguments as given, kept here rather than read back from t5x's private attributes.
    self._flip_backend = backend
    self._flip_num_partitions = model
    self._flip_uses_t5x_mesh = bool(model_parallel_submesh) or (
        ici_mesh_shape is not None and dcn_mesh_shape is not None)

  @property
  def partition_states(self) -> bool:
    return self._partition_states

  @t5x_partitioning.cached_property
  def mesh(self) -> Mesh:
    backend = self._flip_backend
    if self._mesh_shape:
      return explicit_mesh(*self._mesh_shape, backend=backend)
    if not self._flip_uses_t5x_mesh and jax.devices(backend)[0].platform == "cpu":
      num_devices = len(jax.devices(backend))
      return explicit_mesh(num_devices // self._flip_num_partitions, self._flip_num_partitions,
                           backend=backend)
    return super().mesh

  def get_mesh_axes(self, train_state):
    mesh_axes = super().get_mesh_axes(train_state)
    if not self._partition_states:
      return mesh_axes
    data_size = self.mesh.shape["data"]
    flat_axes = traverse_util.flatten_dict(mesh_axes.state_dict(), keep_empty_nodes=True, sep="/")
    flat_shapes = traverse_util.flatten_dict(train_state.state_dict(), keep_empty_nodes=True,
                                             sep="/")
    for key, spec in flat_axes.items():
      if not key.startswith(_OPTIMIZER_STATE_PREFIX) or not isinstance(spec, PartitionSpec):
        continue
      shape = getattr(flat_shapes.get(key), "shape", ())
      flat_axes[key] = shard_over_data(spec, tuple(shape), data_size)
    return mesh_axes.restore_state(traverse_util.unflatten_dict(flat_axes, sep="/"))


def shard_over_data(spec: PartitionSpec, shape: Tuple[int, ...], data_size: int) -> PartitionSpec:
  """Adds 'data' to the largest unsharded axis of a >=2-D array when it divides evenly."""
  if len(shape) < 2 or data_size <= 1:
    return spec
  entries = list(spec) + [None] * (len(shape) - len(spec))
  if any(_uses_data(e) for e in entries):
    return spec
  candidates = [i for i, e in enumerate(entries) if e is None and shape[i] % data_size == 0]
  if not candidates:
    return spec
  axis = max(candidates, key=lambda i: shape[i])
  entries[axis] = "data"
  return PartitionSpec(*entries)


def _uses_data(entry: Any) -> bool:
  if entry is None:
    return False
  if isinstance(entry, str):
    return entry == "data"
  return "data" in entry


def make_partitioner(partitioning_config: Any,
                     partitioner_cls: Any = FlipPjitPartitioner) -> t5x_partitioning.BasePartitioner:
  """Builds the partitioner from `config.partitioning` (its keys are constructor arguments).

  `partitioner_cls` is gin-bindable through `flip.train` (any t5x partitioner class works; only
  the keys it accepts are passed; a key it does not accept must be left at FlipPjitPartitioner's
  default, e.g. partition_states=False for t5x's own PjitPartitioner, and is refused by name
  otherwise).
  """
  kwargs = dict(partitioning_config)
  if "mesh_shape" in kwargs:
    kwargs["mesh_shape"] = tuple(kwargs["mesh_shape"])
  accepted = inspect.signature(partitioner_cls.__init__).parameters
  flip_defaults = {name: parameter.default for name, parameter
                   in inspect.signature(FlipPjitPartitioner.__init__).parameters.items()}
  unknown = [k for k in kwargs if k not in accepted]
  refused = [k for k in unknown if k not in flip_defaults or kwargs[k] != flip_defaults[k]]
  if refused:
    raise ValueError(f"config.partitioning.{refused[0]}={kwargs[refused[0]]!r} is not an "
                     f"argument of {partitioner_cls.__name__}")
  return partitioner_cls(**{k: v for k, v in kwargs.items() if k in accepted})
