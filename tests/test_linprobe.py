"""Linear probe (flip.classifier_tasks.LinearProbeTask, flip.models.classifier) and pretrained image towers
loading into the probe and the fine-tuning model.

References: PyTorch's `BatchNorm1d(affine=False)` written out in float64 numpy (biased batch
variance to normalise, unbiased variance into the running estimate, momentum 0.1); MAE's LARS
written out in float64 for the probe head (coupled weight decay and trust ratio on the kernel,
neither on the bias, heavy-ball momentum), with the cosine schedule from its formula; the FLIP and
MAE checkpoints' own `img_encoder` arrays for loading and freezing. The slow test is the issue's
acceptance check on the Fashion-MNIST demo set: a probe of the MAE-pretrained demo encoder beats
the same probe of a random encoder.
"""

import math
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf
from t5x import checkpoints as t5x_checkpoints

from flip import checkpoints
from flip import config as config_lib
from flip.tasks import classifier as classifier_tasks
from flip.tasks import common
from flip import train
from flip.models import classifier as classifier_lib
import train_utils

PROBE_SMOKE = "configs/cfg_linprobe_base.py:smoke"
FINETUNE_SMOKE = "configs/cfg_finetune_base.py:smoke"
MAE_SMOKE = "configs/cfg_mae_base.py:smoke"
# The image tower of train_utils.tiny_config() (16 px, 8 px patches, one block of width 32), so a
# FLIP checkpoint of that config fits; MAE-family configs have a class token, FLIP's tower not.
TOWER = ("image_size=16", "model.model_img.patches.size=(8, 8)", "model.model_img.hidden_size=32",
         "model.model_img.transformer.mlp_dim=64", "model.model_img.transformer.num_heads=2",
         "model.model_img.transformer.num_layers=1", "data.train=")
NO_HELDOUT = "evals.classification.dataset="  # the probe's and fine-tuning's held-out evaluation
# A FLIP image tower: class token, separate q/k/v, tanh GELU; FLIP's feature averages all tokens.
FLIP_TOWER = ("model.model_img.transformer.qkv_layout=separate",
              "model.model_img.transformer.gelu=tanh", "model.model_img.pool=avg_all")
NUM_CLASSES = 10
WIDTH = 32
NUM_PROBE_STEPS = 4


def probe_config(*overrides):
  return config_lib.load_config(PROBE_SMOKE, list(TOWER) + [f"data.num_classes={NUM_CLASSES}",
                                                            NO_HELDOUT] + list(overrides))


def finetune_config(*overrides):
  return config_lib.load_config(FINETUNE_SMOKE, list(TOWER) + [f"data.num_classes={NUM_CLASSES}",
                                                               NO_HELDOUT] + list(overrides))


def save_initial_state(config, workdir):
  """The loop's train state for `config`, initialised and written by t5x's Checkpointer as the
  loop writes it (no training step: nothing but init is compiled)."""
  trainer = train_utils.build_trainer(config)
  state = trainer.init_state()
  t5x_checkpoints.Checkpointer(trainer.state_shape, trainer.partitioner, workdir).save(state)
  return checkpoints.find_checkpoint_dir(workdir)


@pytest.fixture(scope="module")
def flip_checkpoint(tmp_path_factory):
  # seed_jax differs from the probe's, so a loaded encoder cannot equal a fresh one by chance.
  return save_initial_state(train_utils.tiny_config("seed_jax=7"),
                            str(tmp_path_factory.mktemp("flip_ckpt")))


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory):
  config = config_lib.load_config(MAE_SMOKE, list(TOWER) + [
      "seed_jax=11", "model.decoder.hidden_size=16", "model.decoder.mlp_dim=32",
      "model.decoder.num_heads=2", "model.decoder.num_layers=1",
      "evals.reconstruction.dataset="])
  return save_initial_state(config, str(tmp_path_factory.mktemp("mae_ckpt")))


def encoder_of(ckpt_dir):
  return train_utils.flat_tree(checkpoints.load_params_tree(ckpt_dir)[common.ENCODER])


# ---------------------------------------------------------------- BatchNorm without affine

def test_probe_batchnorm_has_no_scale_or_bias_and_keeps_running_statistics():
  task = classifier_tasks.LinearProbeTask(probe_config())
  variables = jax.eval_shape(task.init_variables, jax.random.PRNGKey(0))
  assert set(variables["params"]) == {common.ENCODER, "head"}
  assert set(variables["params"]["head"]) == {"kernel", "bias"}
  stats = flax.core.unfreeze(variables[classifier_lib.BATCH_STATS])
  assert jax.tree.map(lambda x: x.shape, stats) == {"head_norm": {"mean": (WIDTH,),
                                                                  "var": (WIDTH,)}}
  # Fine-tuning has no BatchNorm at all.
  finetune_variables = jax.eval_shape(classifier_tasks.FinetuneTask(finetune_config()).init_variables,
                                      jax.random.PRNGKey(0))
  assert classifier_lib.BATCH_STATS not in finetune_variables


def test_feature_batchnorm_matches_pytorch_batchnorm1d_in_float64():
  rng = np.random.default_rng(0)
  # Features whose scales differ by orders of magnitude, the case the probe's BatchNorm is for.
  x = rng.normal(size=(6, 5)) * np.array([1e-3, 1.0, 30.0, 5.0, 1e2]) + np.arange(5)
  norm = classifier_lib.FeatureBatchNorm()
  variables = norm.init(jax.random.PRNGKey(0), jnp.asarray(x, jnp.float32), train=False)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(5))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(5))
  assert "params" not in variables

  out, updated = norm.apply(variables, jnp.asarray(x, jnp.float32), train=True,
                            mutable=["batch_stats"])
  eps, torch_momentum = 1e-6, 0.1
  mean, biased_var, unbiased_var = x.mean(0), x.var(0), x.var(0, ddof=1)
  np.testing.assert_allclose(out, (x - mean) / np.sqrt(biased_var + eps), rtol=1e-4, atol=1e-4)
  running_mean = torch_momentum * mean
  running_var = (1 - torch_momentum) * 1.0 + torch_momentum * unbiased_var
  np.testing.assert_allclose(updated["batch_stats"]["mean"], running_mean, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(updated["batch_stats"]["var"], running_var, rtol=1e-5)

  evaluated = norm.apply(updated, jnp.asarray(x, jnp.float32), train=False)
  np.testing.assert_allclose(evaluated, (x - running_mean) / np.sqrt(running_var + eps),
                             rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- LARS on the head only

def test_probe_optimizer_is_lars_on_the_head_and_leaves_the_encoder_alone():
  lr_peak, momentum, trust, weight_decay, num_epochs = 0.5, 0.9, 1e-3, 0.01, 1000.0
  config = probe_config("batch_size=256", "samples_per_epoch=256", f"learning_rate={lr_peak}",
                        "warmup_epochs=0.0", f"num_epochs={num_epochs}", "min_abs_lr=0.0",
                        f"opt.momentum={momentum}", f"opt.trust_coefficient={trust}",
                        f"opt.weight_decay={weight_decay}")
  assert config.opt_type == "lars"
  task = classifier_tasks.LinearProbeTask(config)
  params = jax.jit(task.init_variables)(jax.random.PRNGKey(0))["params"]
  optimizer = task.make_optimizer(config)
  state = optimizer.init(params)
  rng = np.random.default_rng(1)
  grads_per_step = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
                    for _ in range(2)]

  kernel = np.float64(params["head"]["kernel"])
  bias = np.float64(params["head"]["bias"])
  trace_kernel, trace_bias = np.zeros_like(kernel), np.zeros_like(bias)
  current = params
  for step, grads in enumerate(grads_per_step):
    updates, state = optimizer.update(grads, state, current)
    current = optax.apply_updates(current, updates)
    for leaf in jax.tree.leaves(updates[common.ENCODER]):
      np.testing.assert_array_equal(leaf, 0.0)
    # MAE's LARS, by hand (lr from the half cosine: no warmup, epoch = step here).
    lr = lr_peak * 0.5 * (1 + math.cos(math.pi * step / num_epochs))
    direction = np.float64(grads["head"]["kernel"]) + weight_decay * kernel
    ratio = trust * np.linalg.norm(kernel) / np.linalg.norm(direction)
    trace_kernel = momentum * trace_kernel + lr * ratio * direction
    trace_bias = momentum * trace_bias + lr * np.float64(grads["head"]["bias"])
    kernel, bias = kernel - trace_kernel, bias - trace_bias
    np.testing.assert_allclose(current["head"]["kernel"], kernel, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(current["head"]["bias"], bias, rtol=1e-5, atol=1e-7)
  assert np.abs(kernel - np.float64(params["head"]["kernel"])).max() > 1e-5  # it did move
  assert train_utils.unequal_leaves(train_utils.flat_tree(current[common.ENCODER]),
                                    train_utils.flat_tree(params[common.ENCODER])) == []


# ---------------------------------------------------------------- probe from a FLIP checkpoint

def labelled_dataset(config, shard_index, num_shards, seed):
  rng = np.random.default_rng(0)
  examples = {"image": rng.integers(0, 256, (64, config.image_size, config.image_size, 3),
                                    dtype=np.uint8),
              "label": rng.integers(0, NUM_CLASSES, 64).astype(np.int32)}
  ds = tf.data.Dataset.from_tensor_slices(examples).shard(num_shards, shard_index)
  ds = ds.shuffle(64, seed=seed, reshuffle_each_iteration=True).repeat()
  return ds.batch(config.batch_size // num_shards, drop_remainder=True)


def test_probe_of_a_flip_image_tower_trains_head_and_statistics_and_freezes_the_encoder(
    flip_checkpoint, tmp_path):
  config = probe_config(*FLIP_TOWER, f"pretrain_dir={flip_checkpoint}",
                        f"num_train_steps={NUM_PROBE_STEPS}", "learning_rate=10.0",
                        "warmup_epochs=0.0", "checkpoint_every_steps=0")
  workdir = str(tmp_path / "probe")
  result = train.train_and_evaluate(config, workdir, make_dataset=labelled_dataset)
  assert result["step"] == NUM_PROBE_STEPS
  state = result["state"]
  params = train_utils.flat_tree(state.params)
  encoder = {k.split("/", 1)[1]: v for k, v in params.items()
             if k.startswith(common.ENCODER + "/")}
  assert train_utils.unequal_leaves(encoder, encoder_of(flip_checkpoint)) == []

  task = classifier_tasks.LinearProbeTask(config)
  fresh = jax.jit(task.init_variables)(jax.random.PRNGKey(config.seed_jax))
  fresh_params = train_utils.flat_tree(fresh["params"])
  # The FLIP tower replaced the fresh encoder; the head is trained from its fresh init.
  assert all(not np.array_equal(fresh_params[k], params[k]) for k in fresh_params
             if k.startswith(common.ENCODER + "/") and "kernel" in k)
  assert train_utils.unequal_leaves(
      {k: v for k, v in params.items() if k.startswith("head/")},
      {k: v for k, v in fresh_params.items() if k.startswith("head/")}) == ["head/bias",
                                                                           "head/kernel"]
  stats = train_utils.flat_tree(state.flax_mutables)
  assert np.abs(stats["batch_stats/head_norm/mean"]).max() > 1e-3
  saved = t5x_checkpoints.load_t5x_checkpoint(checkpoints.find_checkpoint_dir(workdir))
  saved_stats = train_utils.flat_tree({"batch_stats": saved["flax_mutables"]["batch_stats"]})
  assert train_utils.unequal_leaves(saved_stats, stats) == []


# ---------------------------------------------------------------- loading pretrained towers

def test_finetune_and_probe_load_exactly_the_image_tower_of_flip_and_mae_checkpoints(
    flip_checkpoint, mae_checkpoint):
  cases = [(classifier_tasks.FinetuneTask(finetune_config(*FLIP_TOWER)), flip_checkpoint),
           (classifier_tasks.LinearProbeTask(probe_config(*FLIP_TOWER)), flip_checkpoint),
           (classifier_tasks.FinetuneTask(finetune_config()), mae_checkpoint),
           (classifier_tasks.LinearProbeTask(probe_config()), mae_checkpoint)]
  for task, ckpt_dir in cases:
    shapes = jax.eval_shape(task.init_variables, jax.random.PRNGKey(0))["params"]
    loaded = task.load_pretrained_params(ckpt_dir, shapes)
    assert set(loaded) == {common.ENCODER}  # the head (and MAE's decoder) stay out
    got = train_utils.flat_tree(loaded[common.ENCODER])
    assert train_utils.unequal_leaves(got, encoder_of(ckpt_dir)) == []
  mae_encoder, flip_encoder = encoder_of(mae_checkpoint), encoder_of(flip_checkpoint)
  attention = "Transformer/encoderblock_00/MultiHeadSelfAttention_0"
  assert "cls" in mae_encoder and "cls" in flip_encoder
  assert f"{attention}/qkv_kernel" in mae_encoder and f"{attention}/qkv_kernel" not in flip_encoder
  assert f"{attention}/query/kernel" in flip_encoder


def test_a_tower_that_does_not_fit_is_refused_naming_the_keys(flip_checkpoint):
  # MAE-family configs have a fused q/k/v; FLIP's tower has separate ones.
  task = classifier_tasks.FinetuneTask(finetune_config())
  shapes = jax.eval_shape(task.init_variables, jax.random.PRNGKey(0))["params"]
  with pytest.raises(checkpoints.CheckpointError,
                     match="missing 4 .*MultiHeadSelfAttention_0/out_bias.*8 without a place "
                           ".*MultiHeadSelfAttention_0/key/bias"):
    task.load_pretrained_params(flip_checkpoint, shapes)
  wider = classifier_tasks.LinearProbeTask(probe_config(*FLIP_TOWER, "model.model_img.hidden_size=64",
                                                 "model.model_img.transformer.mlp_dim=128"))
  shapes = jax.eval_shape(wider.init_variables, jax.random.PRNGKey(0))["params"]
  with pytest.raises(checkpoints.CheckpointError, match="wrong shapes"):
    wider.load_pretrained_params(flip_checkpoint, shapes)


def test_probe_config_refuses_a_trainable_encoder():
  with pytest.raises(config_lib.ConfigError, match="frozen_encoder"):
    classifier_tasks.LinearProbeTask(probe_config("classifier.frozen_encoder=False"))


# ---------------------------------------------------------------- the demo set (slow)

@pytest.mark.slow
def test_probe_of_the_mae_demo_encoder_beats_the_probe_of_a_random_encoder(tmp_path_factory,
                                                                          fashion_mnist_dir):
  """The issue's acceptance check, with the demo configs of `make demo-mae` (minutes on 2 cores)."""
  from flip.data import demo  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("demo_mae")
  demo.build_demo(str(fashion_mnist_dir), str(root / "data"))
  train_data = f"data.train=demo:{root / 'data'}"
  mae_config = config_lib.load_config("configs/cfg_mae_demo.py",
                                      [train_data, "evals.reconstruction.dataset="])
  train.train_and_evaluate(mae_config, str(root / "mae"))

  def probe_top1(name, pretrain_dir):
    config = config_lib.load_config("configs/cfg_linprobe_demo.py", [
        train_data, f"evals.classification.dataset=demo:{root / 'data'}",
        f"pretrain_dir={pretrain_dir}"])
    metrics = train.train_and_evaluate(config, str(root / name))["metrics"]
    return metrics["classification/demo/top1"]

  trained = probe_top1("probe_trained", str(root / "mae"))
  random_features = probe_top1("probe_random", "")
  assert trained > random_features + 0.05, (trained, random_features)
  assert random_features > 0.2  # both well above chance (0.1): the probe itself works
