"""gin wiring: t5x's partitioner classes bound in gin (dynamic registration) build through
`flip.builders.build_partitioner`, and every shipped gin file under gin/ parses and builds a
partitioner that maps every parameter of the FLIP train state."""

import pathlib

import flax
from flax import traverse_util
import gin
import jax
from jax.sharding import PartitionSpec
import jax.numpy as jnp
import pytest
from t5x import optimizers as t5x_optimizers
from t5x import partitioning as t5x_partitioning
from t5x import train_state as t5x_train_state

from flip import config as config_lib
from flip import optim
from flip import builders
from flip import partitioning
from flip.models import flip as flip_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
GIN_DIR = REPO_ROOT / "gin"
GIN_FILES = sorted(str(p.relative_to(REPO_ROOT)) for p in GIN_DIR.rglob("*.gin"))
# The default config's partitioning keys are at FlipPjitPartitioner's defaults, so t5x's own class
# accepts them; the FLIP large/huge configs set partition_states=True, which only ours implements.
SMOKE_CONFIG = "configs/default.py:smoke"

T5X_PJIT_GIN = """
from __gin__ import dynamic_registration
from t5x import partitioning

partitioning.PjitPartitioner.num_partitions = 1
partitioning.PjitPartitioner.logical_axis_rules = @partitioning.standard_logical_axis_rules()
"""


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture(scope="module")
def smoke():
  """The smoke config and the shapes of its FLIP train state (AdamW through t5x's OptaxWrapper)."""
  config = config_lib.load_config(str(REPO_ROOT / SMOKE_CONFIG))
  model = flip_lib.flip_model_from_config(config)
  images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.uint8)
  tokens = jax.ShapeDtypeStruct((1, config.aug.txt.max_len), jnp.int32)
  variables = jax.eval_shape(
      lambda x, t: model.init({"params": jax.random.PRNGKey(0)}, x, t, train=False), images,
      tokens)
  optimizer = t5x_optimizers.OptaxWrapper(optim.make_optimizer(config))
  state = jax.eval_shape(
      lambda v: t5x_train_state.FlaxOptimTrainState.create(optimizer, flax.core.freeze(v)),
      variables)
  return config, variables, state


def flat(tree):
  return traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def assert_maps_every_parameter(partitioner, variables, state):
  params = flat(variables["params"])
  specs = flat(partitioner.get_mesh_axes(state).params)
  assert set(specs) == set(params)
  for key, spec in specs.items():
    assert isinstance(spec, PartitionSpec), key
    assert len(spec) == params[key].ndim, key
  return specs


def test_gin_bound_t5x_partitioner_class_builds(smoke):
  config, variables, state = smoke
  gin.parse_config(T5X_PJIT_GIN)
  configured_cls = gin.get_configurable(t5x_partitioning.PjitPartitioner)
  partitioner = builders.build_partitioner(config.partitioning, partitioner_cls=configured_cls)
  assert type(partitioner) is t5x_partitioning.PjitPartitioner  # pylint: disable=unidiomatic-typecheck
  # The rules come from the gin binding (t5x's standard rules, no FLIP additions) ...
  assert tuple(partitioner.logical_axis_rules) == tuple(
      t5x_partitioning.standard_logical_axis_rules())
  assert not any(name == "proj" for name, _ in partitioner.logical_axis_rules)
  # ... and every device is in the mesh.
  assert partitioner.mesh.devices.size == jax.device_count()
  specs = assert_maps_every_parameter(partitioner, variables, state)
  mlp_kernel = "img_encoder/Transformer/encoderblock_00/MlpBlock_0/Dense_0/kernel"
  assert specs[mlp_kernel] == PartitionSpec(None, "model")


def test_gin_rebinds_the_partitioner_class_of_build_partitioner(smoke):
  config, variables, state = smoke
  gin.parse_config(T5X_PJIT_GIN + """
from flip import builders
builders.build_partitioner.partitioner_cls = @partitioning.PjitPartitioner
""")
  partitioner = builders.build_partitioner(config.partitioning)
  assert type(partitioner) is t5x_partitioning.PjitPartitioner  # pylint: disable=unidiomatic-typecheck
  assert_maps_every_parameter(partitioner, variables, state)
  gin.clear_config()
  assert type(builders.build_partitioner(config.partitioning)) is partitioning.FlipPjitPartitioner  # pylint: disable=unidiomatic-typecheck


def test_t5x_class_refuses_flip_only_keys_by_name(smoke):
  config, _, _ = smoke
  gin.parse_config(T5X_PJIT_GIN)
  configured_cls = gin.get_configurable(t5x_partitioning.PjitPartitioner)
  with config.partitioning.unlocked():
    zero1 = config.partitioning.copy_and_resolve_references()
  zero1.partition_states = True
  with pytest.raises(ValueError, match=r"config\.partitioning\.partition_states=True"):
    builders.build_partitioner(zero1, partitioner_cls=configured_cls)


def test_gin_unknown_binding_fails_naming_it():
  with pytest.raises(ValueError, match="num_partitionz"):
    gin.parse_config(T5X_PJIT_GIN + "partitioning.PjitPartitioner.num_partitionz = 2\n")


def test_gin_files_are_shipped():
  assert GIN_FILES, f"no gin files under {GIN_DIR}"


@pytest.mark.parametrize("gin_file", GIN_FILES)
def test_shipped_gin_file_builds_a_partitioner(gin_file, smoke):
  config, variables, state = smoke
  gin.add_config_file_search_path(str(REPO_ROOT))
  gin.parse_config_files_and_bindings([str(REPO_ROOT / gin_file)], [], finalize_config=True)
  partitioner = builders.build_partitioner(config.partitioning)
  assert isinstance(partitioner, t5x_partitioning.BasePartitioner)
  assert partitioner.mesh.devices.size == jax.device_count()
  specs = assert_maps_every_parameter(partitioner, variables, state)
  task = builders.build_task(config)
  assert task.name == "flip"

  rules = dict(reversed(tuple(partitioner.logical_axis_rules)))  # first rule for a name wins
  assert rules["batch"] == "data"
  assert rules["mlp"] == "model"
  for name, _ in partitioning.FLIP_AXIS_RULES:
    assert rules[name] is None, (gin_file, name)
  if gin_file == "gin/partitioning/t5x_pjit.gin":
    assert type(partitioner) is t5x_partitioning.PjitPartitioner  # pylint: disable=unidiomatic-typecheck
  elif gin_file == "gin/flip.gin":
    assert type(partitioner) is partitioning.FlipPjitPartitioner  # pylint: disable=unidiomatic-typecheck
  elif gin_file == "gin/partitioning/fsdp.gin":
    # Parameters themselves are sharded over data on their `embed` axis (FSDP-style).
    assert rules["embed"] == "data"
    mlp_kernel = "img_encoder/Transformer/encoderblock_00/MlpBlock_0/Dense_0/kernel"
    assert specs[mlp_kernel] == PartitionSpec("data", "model")
