"""Named evaluators (big_vision's idea): the `Evaluator` base class, its context, the registry of
evaluator types, and `build_evaluators`, which turns `config.evals` into evaluators.

`config.evals` is a ConfigDict of named entries; the key is the evaluator's name (so
`--config.evals.zeroshot.batch_size=512` works on the command line). Every entry has `type` (a
registered type name), `dataset` (the data it reads; "" turns the entry off), `batch_size` (global
examples per step) and `every_epochs` (virtual epochs between runs; 0 = only at the end of
training), plus its type's own keys (`Evaluator.defaults`). docs/EVALUATORS.md lists the built-in
types and their keys.

An evaluator is constructed as `(name, settings, context)`: `settings` are the entry's values with
the type's defaults filled in, `context` is the `EvalContext` the trainer (or eval_only) builds
from what it already holds. Constructing resolves and checks the data, so a missing data set
stops a run before any compute. `run(params, flax_mutables, step)` evaluates, prints one
`eval at step N: ...` line on process 0 and returns the scalars; the caller writes them. Each
evaluator carries `every_steps`, its period in steps (0 = only at the end).

Problems are one line naming the key: an unknown type or key, a type that needs a capability
the task lacks (`config.evals.<name>.type` and the task are named) are `EvalConfigError`s; data
problems are `EvalError`s. Built-in types live in their own modules, imported on first use
(`EVALUATOR_MODULES`); a new type is one class decorated with `register_evaluator`.
"""

import abc
import dataclasses
import importlib
from typing import Any, Callable, ClassVar, Dict, FrozenSet, List, Mapping, Type, TypeVar

import jax
import ml_collections

from flip.evals import core
from flip.tasks import registry as tasks_registry

Capability = tasks_registry.Capability
Metrics = Dict[str, float]

EVALS_KEY = "config.evals"
COMMON_KEYS = ("type", "dataset", "batch_size", "every_epochs")
DEFAULT_BATCH_SIZE = 1024
# Where each built-in type is defined; the module registers it when imported.
EVALUATOR_MODULES: Dict[str, str] = {
    "zeroshot": "flip.evals.zeroshot",
    "retrieval": "flip.evals.retrieval",
    "classification": "flip.evals.classification",
    "reconstruction": "flip.evals.reconstruction",
    "caption_reconstruction": "flip.evals.caption_reconstruction",
}


@dataclasses.dataclass
class EvalContext:
  """What every evaluator receives: the trainer's own objects, never rebuilt by an evaluator."""
  config: ml_collections.ConfigDict
  task: tasks_registry.Task
  partitioner: Any
  params_axes: Any  # PartitionSpec tree of the parameters (the train state's sharding)
  mutables_axes: Mapping[str, Any]  # PartitionSpec trees of the other collections, by name
  workdir: str
  writer: Any = None  # a clu metric writer (images, e.g. the reconstruction grid); may be None


def interval_steps(every_epochs: float, config: ml_collections.ConfigDict) -> int:
  """Steps between runs for a period in virtual epochs; 0 = only at the end."""
  if every_epochs <= 0:
    return 0
  return max(1, int(round(every_epochs * config.samples_per_epoch / config.batch_size)))


class Evaluator(abc.ABC):
  """Base of every evaluator type. Subclasses set `type_name` (by `register_evaluator`),
  `requires` and `defaults`, and implement `evaluate`."""

  type_name: ClassVar[str] = ""
  requires: ClassVar[FrozenSet[Capability]] = frozenset()
  defaults: ClassVar[Mapping[str, Any]] = {}  # the type's own keys and their defaults

  def __init__(self, name: str, settings: Mapping[str, Any], context: EvalContext):
    self.name = name
    self.settings = dict(settings)
    self.context = context
    self.key = f"{EVALS_KEY}.{name}"  # prefix of this entry's keys in messages
    self.every_steps = interval_steps(float(settings["every_epochs"]), context.config)

  @abc.abstractmethod
  def evaluate(self, params: Any, flax_mutables: Any, step: int) -> Metrics:
    """The metrics of the given variables (placed with the context's axes); no printing."""

  def summary(self, metrics: Mapping[str, float]) -> str:
    """The printed form of this evaluator's metrics."""
    return core.format_metrics(metrics)

  def run(self, params: Any, flax_mutables: Any, step: int) -> Metrics:
    """Evaluates, prints `eval at step N: ...` on process 0, returns the scalars."""
    metrics = self.evaluate(params, flax_mutables, step)
    if jax.process_index() == 0:
      print(f"eval at step {step}: {self.summary(metrics)}", flush=True)
    return metrics


_REGISTRY: Dict[str, Type[Evaluator]] = {}
EvaluatorClass = TypeVar("EvaluatorClass", bound=Type[Evaluator])


def register_evaluator(type_name: str) -> Callable[[EvaluatorClass], EvaluatorClass]:
  """Class decorator: registers an Evaluator subclass as `type_name` (sets its `type_name`)."""

  def register(cls: EvaluatorClass) -> EvaluatorClass:
    if not (isinstance(cls, type) and issubclass(cls, Evaluator)):
      raise TypeError(f"evaluator {type_name!r}: {cls!r} is not a subclass of Evaluator")
    if cls.__abstractmethods__:
      raise TypeError(f"evaluator {type_name!r} ({cls.__qualname__}) does not implement "
                      f"{sorted(cls.__abstractmethods__)[0]}")
    clash = sorted(set(cls.defaults) & set(COMMON_KEYS))
    if clash:
      raise TypeError(f"evaluator {type_name!r}: defaults redefine the common key {clash[0]!r}")
    if type_name in _REGISTRY and _REGISTRY[type_name] is not cls:
      raise TypeError(f"evaluator type {type_name!r} is registered twice "
                      f"({_REGISTRY[type_name].__module__} and {cls.__module__})")
    cls.type_name = type_name
    _REGISTRY[type_name] = cls
    return cls

  return register


def unregister_evaluator(type_name: str) -> None:
  """Removes a registration (tests that register throw-away types)."""
  _REGISTRY.pop(type_name, None)


def evaluator_types() -> List[str]:
  return sorted(set(EVALUATOR_MODULES) | set(_REGISTRY))


def evaluator_class(type_name: str, key: str = EVALS_KEY) -> Type[Evaluator]:
  """The class registered as `type_name` (importing its module first); `key` names the entry's
  type key in the one-line error for an unknown type."""
  if type_name not in _REGISTRY and type_name in EVALUATOR_MODULES:
    importlib.import_module(EVALUATOR_MODULES[type_name])
  if type_name not in _REGISTRY:
    raise core.EvalConfigError(f"unknown evaluator type {key}={type_name!r}; known: "
                               f"{', '.join(evaluator_types())}")
  return _REGISTRY[type_name]


_MAPPINGS = (ml_collections.ConfigDict, dict)


def entries(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """`config.evals` by name (empty when the config has none); each entry a ConfigDict or dict."""
  evals = config.get("evals")
  if evals is None:
    return {}
  if not isinstance(evals, _MAPPINGS):
    raise core.EvalConfigError(f"{EVALS_KEY} must be a ConfigDict of named entries, got "
                               f"{type(evals).__name__}")
  for name, entry in evals.items():
    if not isinstance(entry, _MAPPINGS):
      raise core.EvalConfigError(f"{EVALS_KEY}.{name} must be a ConfigDict entry, got "
                                 f"{type(entry).__name__}")
  return dict(evals.items())


def enabled_names(config: ml_collections.ConfigDict) -> List[str]:
  """Names of the entries that have a dataset (the others are off)."""
  return [name for name, entry in entries(config).items() if entry.get("dataset", "")]


def resolve_settings(name: str, entry: Any, cls: Type[Evaluator],
                     config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The entry's values with defaults filled in; unknown keys and bad common values refused."""
  key = f"{EVALS_KEY}.{name}"
  values = dict(entry.items())
  known = set(COMMON_KEYS) | set(cls.defaults)
  unknown = sorted(set(values) - known)
  if unknown:
    raise core.EvalConfigError(f"unknown key {key}.{unknown[0]} for type {cls.type_name!r} "
                               f"(known: {', '.join(sorted(known))})")
  settings = {"batch_size": DEFAULT_BATCH_SIZE,
              "every_epochs": float(config.get("eval_every_epochs", 0.0))}
  settings.update(cls.defaults)
  settings.update(values)
  if int(settings["batch_size"]) <= 0:
    raise core.EvalConfigError(f"{key}.batch_size must be > 0, got {settings['batch_size']}")
  if float(settings["every_epochs"]) < 0:
    raise core.EvalConfigError(f"{key}.every_epochs must be >= 0, got {settings['every_epochs']}")
  if int(settings.get("max_images", 0)) < 0:  # every type that reads a prefix of its data
    raise core.EvalConfigError(f"{key}.max_images must be >= 0, got {settings['max_images']}")
  return settings


def build_evaluators(config: ml_collections.ConfigDict, context: EvalContext) -> List[Evaluator]:
  """One evaluator per entry of `config.evals` that has a dataset, in the entries' order.

  Everything is checked here, before any compute: types, keys, the task's capabilities, and the
  data (each evaluator resolves its sources when constructed).
  """
  task = context.task
  evaluators = []
  for name, entry in entries(config).items():
    if not entry.get("dataset", ""):
      continue
    type_key = f"{EVALS_KEY}.{name}.type"
    type_name = entry.get("type", "")
    if not type_name:
      raise core.EvalConfigError(f"{type_key} is empty; known types: "
                                 f"{', '.join(evaluator_types())}")
    cls = evaluator_class(type_name, type_key)
    missing = sorted(c.name for c in cls.requires if not task.has(c))
    if missing:
      raise core.EvalConfigError(
          f"{type_key}={type_name!r} needs {', '.join(missing)}, which task {task.name!r} does "
          f"not have: set --{EVALS_KEY}.{name}.dataset= to turn it off")
    evaluators.append(cls(name, resolve_settings(name, entry, cls, config), context))
  return evaluators
