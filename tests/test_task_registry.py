"""flip.tasks.registry: the task contract is checked at registration, in one line.

Every built-in task registers and declares what it implements; a class that declares a capability
without its method, has a capability method without declaring it, takes `flax_mutables` without
MUTABLE_COLLECTIONS (or the reverse), leaves an abstract method unimplemented, or reuses a name is
refused when it is registered. The loop and the builders ask `task.has(...)`: a test replaces a
declaration and sees the loop's behaviour follow it.
"""

import inspect

import pytest

from flip import builders
from flip import config as config_lib
from flip.tasks import registry

Capability = registry.Capability
BUILT_IN = {"flip": {Capability.EMBEDS_IMAGE_TEXT},
            "mae": {Capability.RECONSTRUCTS, Capability.LOADS_PRETRAINED_SUBSET},
            "linprobe": {Capability.CLASSIFIES, Capability.OWN_OPTIMIZER,
                         Capability.MUTABLE_COLLECTIONS, Capability.LOADS_PRETRAINED_SUBSET},
            "finetune": {Capability.CLASSIFIES, Capability.OWN_OPTIMIZER,
                         Capability.MUTABLE_COLLECTIONS, Capability.LOADS_PRETRAINED_SUBSET}}


class _Minimal(registry.Task):
  """Implements exactly the required part of the contract."""

  name = "minimal"

  def batch_logical_axes(self):
    return {"image": ("batch", None, None, None)}

  def train_dataset(self, config, shard_index, num_shards, seed):
    return iter(())

  def init_variables(self, rng):
    return {}

  def compute_grads(self, params, batch, rng, accum_steps=1):
    return 0.0, {}, params


def _register(name, cls):
  try:
    registry.register_task(name)(cls)
  finally:
    registry.unregister_task(name)


def _one_line_refusal(name, cls) -> str:
  with pytest.raises(registry.TaskContractError) as info:
    _register(name, cls)
  message = str(info.value)
  assert "\n" not in message
  assert repr(name) in message
  return message


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_built_in_tasks_register_with_their_capabilities(name):
  cls = registry.task_class(name)
  assert cls.name == name
  assert set(cls.capabilities) == BUILT_IN[name]
  registry.check_task_class(name, cls)  # what registration checked, again: no error


def test_capability_methods_are_the_contract():
  for capability, methods in registry.CAPABILITY_METHODS.items():
    for name, declared in BUILT_IN.items():
      cls = registry.task_class(name)
      for method in methods:
        assert callable(inspect.getattr_static(cls, method, None)) == (capability in declared)


def test_a_minimal_task_registers():
  _register("minimal", _Minimal)


def test_declared_capability_without_its_method_is_refused():
  cls = type("NoLogits", (_Minimal,), {"name": "no_logits",
                                       "capabilities": frozenset({Capability.CLASSIFIES})})
  message = _one_line_refusal("no_logits", cls)
  assert "declares CLASSIFIES but has no logits()" in message


def test_capability_method_without_declaration_is_refused():
  cls = type("Undeclared", (_Minimal,), {"name": "undeclared",
                                         "encode_image": lambda self, params, images: images,
                                         "encode_text": lambda self, params, tokens: tokens})
  message = _one_line_refusal("undeclared", cls)
  assert "has encode_image() but does not declare EMBEDS_IMAGE_TEXT" in message


def test_mutables_argument_and_declaration_must_agree():
  def compute_grads(self, params, batch, rng, accum_steps=1, flax_mutables=None):
    return 0.0, {}, params, flax_mutables

  undeclared = type("Mutables", (_Minimal,), {"name": "mutables", "compute_grads": compute_grads})
  assert "takes flax_mutables but MUTABLE_COLLECTIONS is not declared" in _one_line_refusal(
      "mutables", undeclared)
  # The misspelling this contract exists for: declared, but compute_grads never receives them.
  declared = type("NoMutables", (_Minimal,), {
      "name": "no_mutables", "capabilities": frozenset({Capability.MUTABLE_COLLECTIONS})})
  assert "does not take flax_mutables but MUTABLE_COLLECTIONS is declared" in _one_line_refusal(
      "no_mutables", declared)


def test_unimplemented_abstract_method_and_wrong_names_are_refused():
  incomplete = type("Incomplete", (registry.Task,), {"name": "incomplete"})
  assert "does not implement" in _one_line_refusal("incomplete", incomplete)
  with pytest.raises(registry.TaskContractError, match="registered as 'other'"):
    registry.register_task("other")(_Minimal)
  not_a_task = type("NotATask", (), {"name": "not_a_task"})
  assert "not a subclass" in _one_line_refusal("not_a_task", not_a_task)
  with pytest.raises(registry.TaskContractError, match="registered twice"):
    registry.register_task("flip")(type("Flip2", (_Minimal,), {"name": "flip"}))


def test_unknown_task_is_a_config_error_naming_the_known_ones():
  config = config_lib.load_config("configs/cfg_flip_base.py:smoke", ["task=flipp"])
  with pytest.raises(config_lib.ConfigError, match=r"unknown task 'flipp' \(config.task\)"):
    builders.build_task(config)


def test_the_trainer_follows_the_declaration_not_the_attributes(monkeypatch):
  """A probe task that really has BatchNorm statistics: with MUTABLE_COLLECTIONS the loop hands
  them to compute_grads; the decision comes from the declaration alone."""
  from flip import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config("configs/cfg_linprobe_demo.py", [
      "image_size=14", "model.model_img.patches.size=(7, 7)", "model.model_img.hidden_size=16",
      "model.model_img.transformer.mlp_dim=32", "model.model_img.transformer.num_heads=2",
      "model.model_img.transformer.num_layers=1", "batch_size=8"])
  task = builders.build_task(config)
  assert task.has(Capability.MUTABLE_COLLECTIONS)
  seen = {}
  original = type(task).compute_grads

  def recording(self, params, batch, rng, accum_steps=1, flax_mutables=None):
    seen["mutables"] = flax_mutables
    return original(self, params, batch, rng, accum_steps, flax_mutables=flax_mutables)

  monkeypatch.setattr(type(task), "compute_grads", recording)
  partitioner = builders.build_partitioner(config.partitioning)
  trainer = trainer_lib.Trainer(config, task, partitioner, trainer_lib.Progress())
  import jax  # pylint: disable=g-import-not-at-top
  jax.eval_shape(trainer._train_step, trainer.state_shape,  # pylint: disable=protected-access
                 {"image": jax.ShapeDtypeStruct((8, 14, 14, 3), "uint8"),
                  "label": jax.ShapeDtypeStruct((8,), "int32")})
  assert set(seen["mutables"]) == {"batch_stats"}


USER_TASK_MODULE = '''
"""A task outside flip: predict an image's luminance from its mean colour (one linear layer)."""
import flax.linen as nn
from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from flip.tasks import registry

LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)


class Linear(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = nn_partitioning.param_with_axes("w", nn.initializers.zeros, (3,), jnp.float32,
                                        axes=("embed",))
    return x @ w


@registry.register_task("luma")
class LumaTask(registry.Task):
  name = "luma"

  def __init__(self, config):
    super().__init__(config)
    self.model = Linear()

  def batch_logical_axes(self):
    return {"image": ("batch", None, None, None), "target": ("batch",)}

  def train_dataset(self, config, shard_index, num_shards, seed):
    rng = np.random.RandomState(seed)
    images = rng.randint(0, 256, (64, self.image_size, self.image_size, 3)).astype(np.uint8)
    targets = (images.mean((1, 2)) @ LUMA / 255.0).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "target": targets})
    return ds.repeat().batch(config.batch_size // num_shards, drop_remainder=True)

  def init_variables(self, rng):
    return self.model.init(rng, jnp.zeros((1, 3)))

  def compute_grads(self, params, batch, rng, accum_steps=1):
    colour = batch["image"].astype(jnp.float32).mean((1, 2)) / 255.0

    def loss_fn(p):
      return jnp.mean((self.model.apply({"params": p}, colour) - batch["target"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return loss, {}, grads
'''


def test_a_new_task_is_one_module_and_its_registration(tmp_path, monkeypatch):
  """A task written outside flip (config.task="<module>:<name>") trains through the one loop:
  checkpoints, the loss falls, the learned weights approach the luminance coefficients."""
  from flip import checkpoints  # pylint: disable=g-import-not-at-top
  from flip import train  # pylint: disable=g-import-not-at-top
  (tmp_path / "luma_task.py").write_text(USER_TASK_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  config = config_lib.load_config("configs/cfg_flip_base.py:smoke", [
      "task=luma_task:luma", "num_train_steps=60", "learning_rate=2.0", "warmup_epochs=0",
      "opt.weight_decay=0.0", "checkpoint_every_steps=30", "log_every_steps=30"])
  try:
    out = train.train_and_evaluate(config, str(tmp_path / "wd"))
  finally:
    registry.unregister_task("luma")
  assert out["step"] == 60
  assert checkpoints.complete_steps(str(tmp_path / "wd")) == [30, 60]
  weights = checkpoints.load_params_tree(str(tmp_path / "wd"))["w"]
  assert out["metrics"]["loss"] < 0.01  # from about 0.25 at w = 0
  assert abs(float(weights.sum()) - 1.0) < 0.1  # the coefficients sum to 1
