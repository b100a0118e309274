"""flip.partitioning (t5x's PjitPartitioner) through the real train step on 8 simulated CPU devices.

Reference: the same three steps with plain `jax.jit` of the trainer's unpartitioned init and step
functions on one device. A 1x1 mesh cannot be built from 8 devices, and a device subset would go
through the same partitioner code anyway; plain jit has no mesh, no sharding constraint and no
partitioner, which is the honest "one device". Every partitioned run starts from that reference's
initial state (put on the mesh with the run's own shardings) and consumes the same batches, so
losses and parameters may differ only by the rounding of differently split reductions.

One parameter is compared differently: the attention key bias (`qkv_bias[1]`). Its exact gradient
is zero (adding the same vector to every key shifts all logits of a query by one constant, which
softmax ignores), so what each partitioning computes for it is rounding noise of ~1e-10, and Adam
divides that noise by its own running RMS: the update is +-lr with a sign that depends on the
rounding (test_train checks that this gradient is noise). Measured: every other parameter agrees
with the reference to <= 1.5e-7 after three steps of ~3e-3 each; the key bias differs by up to the
full update. It is checked to have stayed within the Adam bound (|delta| <= steps * peak lr).
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import train_utils
from flip import optim
from flip import partitioning

NUM_STEPS = 3
# Partitioned runs, as `config.partitioning` overrides. The first is the tiny config's own
# partitioning (cfg_flip_large: FLIP's partition_states=True on the default CPU mesh, data=8),
# which the train and checkpoint tests use too.
PARTITIONINGS = {
    "data8_partition_states": (),
    "data4_model2": ("partitioning.mesh_shape=(4, 2)", "partitioning.num_partitions=2",
                     "partitioning.partition_states=False"),
    "data4_model2_partition_states": ("partitioning.mesh_shape=(4, 2)",
                                      "partitioning.num_partitions=2",
                                      "partitioning.partition_states=True"),
    "data4_model2_fsdp": ("partitioning.mesh_shape=(4, 2)", "partitioning.num_partitions=2",
                          "partitioning.partition_states=False",
                          "partitioning.parameter_partitioning_dims=2"),
}
# Losses agree to ~1e-7 relative; parameters to <= 1.5e-7 absolute after updates of ~3e-3 per step,
# so 1e-6 is 1/3000 of one update: a wrong shard or a missing reduction is orders of magnitude above.
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-6

MLP_KERNEL = "img_encoder/Transformer/encoderblock_00/MlpBlock_0/Dense_0/kernel"  # (embed, mlp)
MLP_BIAS = "img_encoder/Transformer/encoderblock_00/MlpBlock_0/Dense_0/bias"  # (mlp,)
TOKEN_EMBEDDING = "txt_encoder/token_embedding"  # (vocab, embed)
LOGIT_SCALE = "logit_scale"  # ()

# What the rules say for these parameters, and for their Adam moments, per partitioning:
# t5x's standard rules map mlp/vocab -> model, embed -> None (-> data with
# parameter_partitioning_dims=2); partition_states adds data to the largest free axis of a
# >=2-D optimizer state that it divides (flip.partitioning.shard_over_data: the MLP kernel is
# (32, 64) with 64 on model, so data goes on axis 0; the embedding is (64, 32) with 64 on model).
EXPECTED_PARAM_SPECS = {
    "data8_partition_states": {MLP_KERNEL: PartitionSpec(None, "model"),
                               MLP_BIAS: PartitionSpec("model"),
                               TOKEN_EMBEDDING: PartitionSpec("model", None)},
    "data4_model2": {MLP_KERNEL: PartitionSpec(None, "model"), MLP_BIAS: PartitionSpec("model"),
                     TOKEN_EMBEDDING: PartitionSpec("model", None)},
    "data4_model2_partition_states": {MLP_KERNEL: PartitionSpec(None, "model"),
                                      MLP_BIAS: PartitionSpec("model"),
                                      TOKEN_EMBEDDING: PartitionSpec("model", None)},
    "data4_model2_fsdp": {MLP_KERNEL: PartitionSpec("data", "model"),
                          MLP_BIAS: PartitionSpec("model"),
                          TOKEN_EMBEDDING: PartitionSpec("model", "data")},
}
EXPECTED_MOMENT_SPECS = {
    "data8_partition_states": {MLP_KERNEL: PartitionSpec("data", "model"),
                               MLP_BIAS: PartitionSpec("model"),
                               TOKEN_EMBEDDING: PartitionSpec("model", "data")},
    "data4_model2": EXPECTED_PARAM_SPECS["data4_model2"],
    "data4_model2_partition_states": {MLP_KERNEL: PartitionSpec("data", "model"),
                                      MLP_BIAS: PartitionSpec("model"),
                                      TOKEN_EMBEDDING: PartitionSpec("model", "data")},
    "data4_model2_fsdp": EXPECTED_PARAM_SPECS["data4_model2_fsdp"],
}
EXPECTED_MESH = {"data8_partition_states": {"data": 8, "model": 1},
                 "data4_model2": {"data": 4, "model": 2},
                 "data4_model2_partition_states": {"data": 4, "model": 2},
                 "data4_model2_fsdp": {"data": 4, "model": 2}}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  with train_utils.persistent_compilation_cache(
      str(tmp_path_factory.getbasetemp() / "jax_compilation_cache")):
    yield


@pytest.fixture(scope="module")
def reference():
  return train_utils.single_device_reference(NUM_STEPS)


@pytest.fixture(scope="module", params=list(PARTITIONINGS))
def partitioned(request, reference):
  config = train_utils.tiny_config(*PARTITIONINGS[request.param])
  trainer = train_utils.build_trainer(config)
  batches = list(train_utils.fixed_batches(config, NUM_STEPS))
  return request.param, trainer, train_utils.run_steps(trainer, reference.init_state, batches)


def test_partitioned_runs_match_single_device(partitioned, reference):
  name, _, run = partitioned
  ref_params = train_utils.flat_tree(reference.state.params)
  params = train_utils.flat_tree(run.state.params)
  worst, where = train_utils.max_abs_diff(train_utils.without_key_bias(params),
                                          train_utils.without_key_bias(ref_params))
  moved, _ = train_utils.max_abs_diff(ref_params, train_utils.flat_tree(reference.init_state.params))
  print(f"{name}: max |loss diff| "
        f"{np.max(np.abs(np.subtract(run.losses, reference.losses))):.3g}, max |param diff| "
        f"{worst:.3g} at {where} (largest update {moved:.3g})")
  np.testing.assert_allclose(run.losses, reference.losses, rtol=LOSS_RTOL)
  assert moved > 1000 * PARAM_ATOL  # the steps really moved the parameters
  assert worst <= PARAM_ATOL, f"{name}: {where} differs by {worst}"

  config = train_utils.tiny_config()
  adam_bound = NUM_STEPS * optim.peak_learning_rate(config) * (1 + 1e-5)
  init_keys = train_utils.key_biases(train_utils.flat_tree(reference.init_state.params))
  for key, value in train_utils.key_biases(params).items():
    assert np.all(np.abs(value - init_keys[key]) <= adam_bound), key


def test_mesh_shape_follows_config(partitioned):
  name, trainer, _ = partitioned
  assert dict(trainer.partitioner.mesh.shape) == EXPECTED_MESH[name]
  assert trainer.partitioner.partition_states == ("partition_states" in name)


def _adam_moments(state):
  """{"mu/<param path>" | "nu/<param path>": array} of the AdamW state, whatever its nesting."""
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state.param_states)[0]:
    names = [train_utils.key_name(k) for k in path]
    for moment in ("mu", "nu"):
      if moment in names:
        found[f"{moment}/" + "/".join(names[names.index(moment) + 1:])] = leaf
  return found


def test_shardings_of_the_state_after_a_step_follow_the_rules(partitioned):
  name, trainer, run = partitioned
  params = {"/".join(train_utils.key_name(k) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(run.state.params)[0]}
  moments = _adam_moments(run.state)
  for key, spec in EXPECTED_PARAM_SPECS[name].items():
    assert params[key].sharding.spec == spec, (name, key, params[key].sharding.spec)
    for moment in ("mu", "nu"):
      got = moments[f"{moment}/{key}"].sharding.spec
      assert got == EXPECTED_MOMENT_SPECS[name][key], (name, moment, key, got)
  assert params[LOGIT_SCALE].sharding.is_fully_replicated
  # Every leaf of the state lives on all 8 devices (replicated or sharded, never on one).
  for leaf in jax.tree_util.tree_leaves(run.state):
    assert len(leaf.sharding.device_set) == 8


def test_batch_is_sharded_over_data(partitioned):
  name, trainer, _ = partitioned
  config = trainer.config
  batch = trainer.global_batch(next(train_utils.fixed_batches(config, 1)))
  data = EXPECTED_MESH[name]["data"]
  assert batch["image"].sharding.spec == PartitionSpec("data", None, None, None)
  shard_rows = {s.data.shape[0] for s in batch["image"].addressable_shards}
  assert shard_rows == {config.batch_size // data}
  layout = trainer.data_layout
  assert (layout.batch_size, layout.shard_id, layout.num_shards) == (config.batch_size, 0, 1)


@pytest.mark.parametrize("spec, shape, data, expected", [
    (PartitionSpec(None, "model"), (32, 64), 4, PartitionSpec("data", "model")),
    (PartitionSpec("model", None), (64, 32), 4, PartitionSpec("model", "data")),
    (PartitionSpec(None, None), (8, 32), 4, PartitionSpec(None, "data")),  # largest free axis
    (PartitionSpec(None, None), (6, 10), 4, PartitionSpec(None, None)),  # nothing divides
    (PartitionSpec("model"), (64,), 4, PartitionSpec("model")),  # 1-D: untouched
    (PartitionSpec("data", "model"), (32, 64), 4, PartitionSpec("data", "model")),  # has data
    (PartitionSpec(None, "model"), (32, 64), 1, PartitionSpec(None, "model")),  # no data axis
    (PartitionSpec(), (3, 3, 3, 32), 4, PartitionSpec(None, None, None, "data")),  # short spec
])
def test_shard_over_data(spec, shape, data, expected):
  assert partitioning.shard_over_data(spec, shape, data) == expected


def test_bad_partitioning_config_names_the_key():
  with pytest.raises(ValueError, match=r"mesh \(data=3, model=2\) needs 6 devices"):
    _ = partitioning.make_partitioner({"mesh_shape": (3, 2), "num_partitions": 2}).mesh
  with pytest.raises(ValueError, match=r"config\.partitioning\.mesh_shape .* disagrees"):
    partitioning.make_partitioner({"mesh_shape": (4, 2), "num_partitions": 1})
  with pytest.raises(ValueError, match=r"config\.partitioning\.num_partitions=3"):
    partitioning.make_partitioner({"num_partitions": 3})
  with pytest.raises(ValueError, match=r"config\.partitioning\.bogus"):
    partitioning.make_partitioner({"bogus": 1})
