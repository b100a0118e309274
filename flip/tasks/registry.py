"""The task contract of the one training loop, and the registry of tasks by name.

A task owns its model, the layout of a batch, variable initialisation and the gradient of one
optimizer step; the loop (flip.train) owns everything else. Every task subclasses `Task` and
declares, in `capabilities`, which optional parts of the contract it implements. Each capability
names the methods it brings (`CAPABILITY_METHODS`); the loop, the evaluators and the builders ask
`task.has(capability)` and never probe a task for attributes.

Registration (`register_task`) checks the declaration against the class, so a mismatch fails
when the task module is imported, in one line naming the task and the method: a capability
declared without its method, a capability method present without its declaration (a misspelled
or forgotten declaration would otherwise make the loop silently skip it), an abstract method left
unimplemented, a name registered twice.

Tasks are found by name (`config.task`, or gin's `builders.build_task.task_name`). Built-in task
modules are imported on first use (`TASK_MODULES`), so naming a task never imports the others'
models; a task of another package is named "<module>:<name>" and its module is imported first.
A new task is one module: a `Task` subclass decorated with `@register_task("<name>")`
(docs/ARCHITECTURE.md has an example).
"""

import abc
import enum
import importlib
import inspect
from typing import Any, Callable, Dict, FrozenSet, Mapping, Tuple, Type, TypeVar

import flax
import jax

from flip import config as config_lib

Array = jax.Array
Params = Mapping[str, Any]
Metrics = Dict[str, Array]


class Capability(enum.Enum):
  """Optional parts of the task contract; each brings the methods in CAPABILITY_METHODS."""
  # encode_image(params, uint8 images [B, S, S, 3]) -> [B, D] and encode_text(params, int32
  # tokens [B, L]) -> [B, D]: unmasked, L2-normalised embeddings (zero-shot, retrieval).
  EMBEDS_IMAGE_TEXT = "embeds_image_text"
  # logits(params, flax_mutables, uint8 images) -> [B, num_classes] in inference mode.
  CLASSIFIES = "classifies"
  # mask_noise(rng, batch_size) -> [B, num_patches] and reconstruct(params, images, mask_noise)
  # -> ({"pred", "target", "mask"}, loss); attributes patch_size, num_patches, norm_pix_loss.
  RECONSTRUCTS = "reconstructs"
  # text_noise(rng, batch_size, length) -> [B, L] and reconstruct_text(params, images, text,
  # paired, image_noise, text_noise) -> {"predicted": int32 [B, L] (the text with its masked
  # tokens replaced by the model's argmax), "text_mask": [B, L] (1 = masked)} (M3AE captions).
  RECONSTRUCTS_TEXT = "reconstructs_text"
  # make_optimizer(config, start_step, start_epoch) -> optax chain (frozen parts, lr decay).
  OWN_OPTIMIZER = "own_optimizer"
  # compute_grads(..., flax_mutables) -> (loss, metrics, grads, new_mutables): collections
  # besides params (BatchNorm statistics) that travel in the train state's flax_mutables.
  MUTABLE_COLLECTIONS = "mutable_collections"
  # load_pretrained_params(path, params_shapes) -> the subset of parameters to load from
  # config.pretrain_dir (e.g. an encoder under a fresh head); without it all are loaded.
  LOADS_PRETRAINED_SUBSET = "loads_pretrained_subset"


CAPABILITY_METHODS: Mapping[Capability, Tuple[str, ...]] = {
    Capability.EMBEDS_IMAGE_TEXT: ("encode_image", "encode_text"),
    Capability.CLASSIFIES: ("logits",),
    Capability.RECONSTRUCTS: ("mask_noise", "reconstruct"),
    Capability.RECONSTRUCTS_TEXT: ("text_noise", "reconstruct_text"),
    Capability.OWN_OPTIMIZER: ("make_optimizer",),
    Capability.LOADS_PRETRAINED_SUBSET: ("load_pretrained_params",),
}
# MUTABLE_COLLECTIONS is a parameter of compute_grads rather than a method of its own.
MUTABLES_ARGUMENT = "flax_mutables"


class TaskContractError(TypeError):
  """A task class that does not match its declared capabilities (one line)."""


class Task(abc.ABC):
  """Base of every task. Subclasses set `name` and `capabilities` and implement the methods."""

  name: str = ""
  capabilities: FrozenSet[Capability] = frozenset()

  def __init__(self, config: Any):
    self.config = config
    patch = tuple(config.model.model_img.patches.size)
    self.image_size = int(config.image_size)
    # The image tower's patch grid (position-embedding resizing when loading weights).
    self.posemb_grid = (self.image_size // patch[0], self.image_size // patch[1])

  def has(self, capability: Capability) -> bool:
    return capability in self.capabilities

  @abc.abstractmethod
  def batch_logical_axes(self) -> Dict[str, Tuple[Any, ...]]:
    """Logical axis names of every batch entry ("batch" first)."""

  @abc.abstractmethod
  def train_dataset(self, config: Any, shard_index: int, num_shards: int, seed: int):
    """This process's iterable of numpy batches (a checkpointable tf.data dataset)."""

  @abc.abstractmethod
  def init_variables(self, rng: Array) -> flax.core.FrozenDict:
    """All variable collections, with the `params_axes` t5x's train state reads."""

  @abc.abstractmethod
  def compute_grads(self, params: Params, batch: Mapping[str, Array], rng: Array,
                    accum_steps: int = 1):
    """(loss, metrics, grads) of the full batch; with MUTABLE_COLLECTIONS it also takes
    `flax_mutables` and returns the updated collections fourth."""


def _defines(cls: type, method: str) -> bool:
  return callable(inspect.getattr_static(cls, method, None))


def check_task_class(name: str, cls: Type[Task]) -> None:
  """Raises TaskContractError (one line) unless `cls` implements exactly what it declares."""
  where = f"task {name!r} ({cls.__module__}.{cls.__qualname__})"
  if not (isinstance(cls, type) and issubclass(cls, Task)):
    raise TaskContractError(f"{where} is not a subclass of flip.tasks.registry.Task")
  unknown = [c for c in cls.capabilities if not isinstance(c, Capability)]
  if unknown:
    raise TaskContractError(f"{where} declares {unknown[0]!r}, which is not a Capability")
  if cls.__abstractmethods__:
    raise TaskContractError(f"{where} does not implement {sorted(cls.__abstractmethods__)[0]}")
  for capability, methods in CAPABILITY_METHODS.items():
    declared = capability in cls.capabilities
    for method in methods:
      if declared and not _defines(cls, method):
        raise TaskContractError(f"{where} declares {capability.name} but has no {method}()")
      if not declared and _defines(cls, method):
        raise TaskContractError(f"{where} has {method}() but does not declare "
                                f"{capability.name} in its capabilities")
  takes_mutables = MUTABLES_ARGUMENT in inspect.signature(cls.compute_grads).parameters
  if (Capability.MUTABLE_COLLECTIONS in cls.capabilities) != takes_mutables:
    raise TaskContractError(
        f"{where}: compute_grads {'takes' if takes_mutables else 'does not take'} "
        f"{MUTABLES_ARGUMENT} but MUTABLE_COLLECTIONS is "
        f"{'not ' if takes_mutables else ''}declared")


DEFAULT_TASK = "flip"
# Where each built-in task is defined; the module registers it when imported.
TASK_MODULES: Dict[str, str] = {
    "flip": "flip.tasks.contrastive",
    "mae": "flip.tasks.mae",
    "linprobe": "flip.tasks.classifier",
    "finetune": "flip.tasks.classifier",
    "m3ae": "flip.tasks.m3ae",
}
_REGISTRY: Dict[str, Type[Task]] = {}
TaskClass = TypeVar("TaskClass", bound=Type[Task])


def register_task(name: str) -> Callable[[TaskClass], TaskClass]:
  """Class decorator: checks the task class (check_task_class) and registers it as `name`."""

  def register(cls: TaskClass) -> TaskClass:
    if cls.name != name:
      raise TaskContractError(f"task class {cls.__qualname__} has name {cls.name!r} but is "
                              f"registered as {name!r}")
    check_task_class(name, cls)
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise TaskContractError(f"task {name!r} is registered twice ({_REGISTRY[name].__module__} "
                              f"and {cls.__module__})")
    _REGISTRY[name] = cls
    return cls

  return register


def unregister_task(name: str) -> None:
  """Removes a registration (tests that register throw-away tasks)."""
  _REGISTRY.pop(name, None)


def task_names():
  return sorted(set(TASK_MODULES) | set(_REGISTRY))


def task_class(name: str) -> Type[Task]:
  """The class registered as `name` (importing its module first), or a one-line ConfigError.

  A task outside this package is named "<module>:<name>": the module is imported (it registers
  the task) and the task registered as <name> is used.
  """
  if ":" in name:
    module_name, name = name.split(":", 1)
    try:
      importlib.import_module(module_name)
    except ImportError as err:
      raise config_lib.ConfigError(f"config.task: cannot import task module {module_name!r}: "
                                   f"{err}") from None
  if name not in _REGISTRY and name in TASK_MODULES:
    importlib.import_module(TASK_MODULES[name])
  if name not in _REGISTRY:
    raise config_lib.ConfigError(f"unknown task {name!r} (config.task); known: {task_names()}")
  return _REGISTRY[name]


def get_task(config: Any, name: str = DEFAULT_TASK) -> Task:
  return task_class(name)(config)
