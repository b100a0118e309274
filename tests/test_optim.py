"""Tests for flip.optim against float64 numpy references written out here independently."""

import math

import flax
import flax.linen as nn
from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from t5x import optimizers as t5x_optimizers
from t5x import train_state as t5x_train_state

from flip import optim

IMAGENET_SAMPLES = 1_281_167


def make_config(**overrides):
  """A complete config in FLIP's key names; overrides use dotted keys ("opt.b2")."""
  config = ml_collections.ConfigDict({
      "learning_rate": 4e-6,
      "batch_size": 1024,
      "samples_per_epoch": 1024 * 50,  # 50 steps per virtual epoch at batch 1024
      "warmup_epochs": 2,
      "num_epochs": 10,
      "min_abs_lr": 1e-8,
      "warmup_abs_lr": 1e-9,
      "opt_type": "adamw",
      "opt_mu_dtype": "float32",
      "exclude_wd": True,
      "opt": {"b1": 0.9, "b2": 0.95, "weight_decay": 0.2, "clip_grad": 0.0},
  })
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def reference_lr(epoch, base_lr, batch_size, warmup_epochs, num_epochs, warmup_abs_lr, min_abs_lr):
  peak = base_lr * batch_size / 256.0
  if epoch < warmup_epochs:
    return warmup_abs_lr + (peak - warmup_abs_lr) * epoch / warmup_epochs
  progress = min((epoch - warmup_epochs) / (num_epochs - warmup_epochs), 1.0)
  return min_abs_lr + (peak - min_abs_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def reference_lr_for(config, epoch):
  return reference_lr(epoch, config.learning_rate, config.batch_size, config.warmup_epochs,
                      config.num_epochs, config.warmup_abs_lr, config.min_abs_lr)


def assert_lr_close(got, expected, config, rtol=1e-5):
  # The schedule runs in float32 (it lives inside the jitted step): near the end of the cosine,
  # 1 + cos(pi * progress) loses digits, so allow an absolute error of a millionth of the peak.
  peak = config.learning_rate * config.batch_size / 256.0
  np.testing.assert_allclose(float(got), expected, rtol=rtol, atol=1e-6 * peak)


# ---------------------------------------------------------------- schedule


def test_schedule_step_zero_warmup_end_mid_cosine_and_end():
  config = make_config()
  schedule = optim.step_schedule(config)
  steps_per_epoch = 50
  peak = 4e-6 * 1024 / 256
  assert optim.peak_learning_rate(config) == pytest.approx(peak, rel=1e-12)
  np.testing.assert_allclose(float(schedule(0)), 1e-9, rtol=1e-6)
  warmup_end = 2 * steps_per_epoch
  np.testing.assert_allclose(float(schedule(warmup_end)), peak, rtol=1e-6)
  # Halfway through the cosine the lr is the midpoint of peak and minimum.
  mid = (2 + 4) * steps_per_epoch
  np.testing.assert_allclose(float(schedule(mid)), (peak + 1e-8) / 2, rtol=1e-6)
  end = 10 * steps_per_epoch
  np.testing.assert_allclose(float(schedule(end)), 1e-8, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(end + 77)), 1e-8, rtol=1e-5)
  for step in (1, 37, warmup_end - 1, warmup_end + 1, 251, 333, end - 1):
    assert_lr_close(schedule(step), reference_lr_for(config, step / steps_per_epoch), config)


def test_schedule_with_flip_large_numbers():
  config = make_config(batch_size=65536, samples_per_epoch=IMAGENET_SAMPLES, warmup_epochs=40,
                       num_epochs=10000, min_abs_lr=0.0, warmup_abs_lr=0.0)
  schedule = optim.step_schedule(config)
  epochs_per_step = 65536 / IMAGENET_SAMPLES
  total_steps = math.ceil(10000 / epochs_per_step)
  for step in (0, 1, 500, 782, 100_000, 150_000, total_steps - 10):
    assert_lr_close(schedule(jnp.asarray(step, jnp.int32)),
                    reference_lr_for(config, step * epochs_per_step), config, rtol=1e-4)
  assert float(schedule(total_steps)) == 0.0


def test_epoch_schedule_is_the_definition_and_no_warmup_starts_at_peak():
  config = make_config(warmup_epochs=0)
  lr_at_epoch = optim.epoch_schedule(config)
  for epoch in (0.0, 0.3, 5.0, 9.99):
    np.testing.assert_allclose(float(lr_at_epoch(epoch)), reference_lr_for(config, epoch),
                               rtol=1e-5)
  np.testing.assert_allclose(float(lr_at_epoch(0.0)), optim.peak_learning_rate(config), rtol=1e-6)


def test_schedule_is_traceable_under_jit():
  config = make_config()
  schedule = optim.step_schedule(config)
  jitted = jax.jit(schedule)
  for step in (0, 99, 300):
    np.testing.assert_allclose(float(jitted(step)), float(schedule(step)), rtol=1e-6)


def test_resume_with_changed_batch_size_and_num_epochs_continues_from_epoch_position():
  # Zero absolute floors, so that the lr is exactly proportional to the batch size.
  old = make_config(min_abs_lr=0.0, warmup_abs_lr=0.0)
  resume_step = 237  # in the cosine phase of the old run
  samples_seen = resume_step * old.batch_size
  start_epoch = samples_seen / old.samples_per_epoch
  old_schedule = optim.step_schedule(old)

  # Batch size doubled only: the lr at the resume point jumps by exactly the batch ratio, and each
  # further step advances the epoch by the new batch size.
  bigger_batch = make_config(batch_size=2048, min_abs_lr=0.0, warmup_abs_lr=0.0)
  resumed = optim.step_schedule(bigger_batch, start_step=resume_step, start_epoch=start_epoch)
  np.testing.assert_allclose(float(resumed(resume_step)) / float(old_schedule(resume_step)),
                             2.0, rtol=1e-5)
  for extra in (1, 10, 50):
    epoch = start_epoch + extra * 2048 / old.samples_per_epoch
    np.testing.assert_allclose(float(resumed(resume_step + extra)),
                               reference_lr_for(bigger_batch, epoch), rtol=1e-5)

  # Batch size and num_epochs changed: the cosine is recomputed over the new total from the same
  # epoch position, warmup is not restarted.
  changed = make_config(batch_size=2048, num_epochs=20, min_abs_lr=1e-8)
  resumed = optim.step_schedule(changed, start_step=resume_step, start_epoch=start_epoch)
  np.testing.assert_allclose(float(resumed(resume_step)), reference_lr_for(changed, start_epoch),
                             rtol=1e-5)
  # A longer cosine sits higher at the same epoch, beyond the batch ratio alone.
  assert float(resumed(resume_step)) > 2 * float(old_schedule(resume_step))
  steps_to_new_end = math.ceil((20 - start_epoch) * old.samples_per_epoch / 2048)
  np.testing.assert_allclose(float(resumed(resume_step + steps_to_new_end)), 1e-8, rtol=1e-5)
  np.testing.assert_allclose(
      optim.learning_rate_at(changed, resume_step + 5, resume_step, start_epoch),
      reference_lr_for(changed, start_epoch + 5 * 2048 / old.samples_per_epoch), rtol=1e-5)

  # Unchanged config: resuming reproduces the uninterrupted schedule step for step.
  same = optim.step_schedule(old, start_step=resume_step, start_epoch=start_epoch)
  for step in (resume_step, resume_step + 1, resume_step + 200):
    np.testing.assert_allclose(float(same(step)), float(old_schedule(step)), rtol=1e-6)


def test_resume_during_warmup_keeps_warmup_position():
  old = make_config()
  resume_step = 40  # epoch 0.8, inside the 2-epoch warmup
  start_epoch = resume_step * old.batch_size / old.samples_per_epoch
  changed = make_config(num_epochs=30)
  resumed = optim.step_schedule(changed, start_step=resume_step, start_epoch=start_epoch)
  np.testing.assert_allclose(float(resumed(resume_step)),
                             float(optim.step_schedule(old)(resume_step)), rtol=1e-6)


@pytest.mark.parametrize("overrides, key", [
    ({"num_epochs": 2}, "config.num_epochs"),
    ({"batch_size": 0}, "config.batch_size"),
    ({"samples_per_epoch": -1}, "config.samples_per_epoch"),
])
def test_bad_schedule_values_name_the_key(overrides, key):
  with pytest.raises(ValueError, match=key):
    optim.step_schedule(make_config(**overrides))


def test_missing_and_bad_optimizer_keys_name_the_key():
  config = make_config()
  del config.opt["b2"]
  with pytest.raises(KeyError, match="config.opt.b2"):
    optim.make_optimizer(config)
  with pytest.raises(ValueError, match="config.opt_type"):
    optim.make_optimizer(make_config(opt_type="adam"))
  with pytest.raises(ValueError, match="config.opt_mu_dtype"):
    optim.make_optimizer(make_config(opt_mu_dtype="float33"))


# ---------------------------------------------------------------- weight-decay mask


def flip_like_params():
  """A nested param tree with FLIP's module and leaf names (tiny shapes)."""
  z = lambda *shape: jnp.zeros(shape, jnp.float32)  # pylint: disable=unnecessary-lambda-assignment
  block = lambda: {  # pylint: disable=unnecessary-lambda-assignment
      "LayerNorm_0": {"scale": z(4), "bias": z(4)},
      "MultiHeadDotProductAttention_0": {
          "query": {"kernel": z(4, 2, 2), "bias": z(2, 2)},
          "out": {"kernel": z(2, 2, 4), "bias": z(4)},
      },
      # Fused attention as flip.models.layers names it.
      "MultiHeadSelfAttention_0": {"qkv_kernel": z(4, 3, 2, 2), "qkv_bias": z(3, 2, 2),
                                   "out_kernel": z(2, 2, 4), "out_bias": z(4)},
      "LayerNorm_1": {"scale": z(4), "bias": z(4)},
      "MlpBlock_0": {"Dense_0": {"kernel": z(4, 8), "bias": z(8)},
                     "Dense_1": {"kernel": z(8, 4), "bias": z(4)}},
  }
  return {
      "img_encoder": {
          "embedding": {"kernel": z(2, 2, 3, 4), "bias": z(4)},
          "cls": z(1, 1, 4),
          "pos_embedding": z(1, 5, 4),
          "Transformer": {"encoderblock_0": block(), "encoderblock_1": block(),
                          "encoder_norm": {"scale": z(4), "bias": z(4)}},
      },
      "txt_encoder": {
          "token_embedding": {"embedding": z(10, 4)},
          "pos_embedding": z(1, 3, 4),
          "Transformer": {"encoderblock_0": block(),
                          "encoder_norm": {"scale": z(4), "bias": z(4)}},
      },
      "img_proj": {"kernel": z(4, 3)},
      "txt_proj": {"kernel": z(4, 3)},
      # Substring traps: names that contain excluded names or patterns but do not match them.
      "scale_head": {"kernel": z(3, 2)},
      "biased_norm": {"kernel": z(3, 2)},
      "bias_head": {"kernel": z(3, 2)},
      "logit_scale": z(),
  }


EXPECTED_DECAYED = {
    "img_encoder/embedding/kernel",
    "txt_encoder/token_embedding/embedding",
    "img_proj/kernel",
    "txt_proj/kernel",
    "scale_head/kernel",
    "biased_norm/kernel",
    "bias_head/kernel",
} | {
    f"{tower}/Transformer/encoderblock_{i}/{kernel}"
    for tower, blocks in (("img_encoder", 2), ("txt_encoder", 1))
    for i in range(blocks)
    for kernel in ("MultiHeadDotProductAttention_0/query/kernel",
                   "MultiHeadDotProductAttention_0/out/kernel",
                   "MultiHeadSelfAttention_0/qkv_kernel", "MultiHeadSelfAttention_0/out_kernel",
                   "MlpBlock_0/Dense_0/kernel", "MlpBlock_0/Dense_1/kernel")
}


def flat_mask(mask):
  return {"/".join(optim.param_path_names(path)): bool(value)
          for path, value in jax.tree_util.tree_flatten_with_path(mask)[0]}


def test_weight_decay_mask_excludes_exactly_the_named_parameters():
  params = flip_like_params()
  mask = flat_mask(optim.weight_decay_mask(params, optim.no_decay_names(make_config())))
  assert len(mask) == len(jax.tree_util.tree_leaves(params))
  assert {path for path, decayed in mask.items() if decayed} == EXPECTED_DECAYED


def test_weight_decay_mask_on_the_real_flip_model(repo_root):
  from flip import config as config_lib  # pylint: disable=g-import-not-at-top
  from flip.models import flip as flip_model  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(str(repo_root / "configs" / "default.py") + ":smoke")
  model = flip_model.flip_model_from_config(config)
  images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  tokens = jnp.zeros((1, config.aug.txt.max_len), jnp.int32)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), images, tokens, train=False, mask_ratio=0.0))
  mask = flat_mask(optim.weight_decay_mask(shapes["params"]))
  # Decayed: exactly the weight matrices and embedding tables.
  weight_leaf_names = {"kernel", "qkv_kernel", "out_kernel", "embedding", "token_embedding"}
  decayed = {path for path, is_decayed in mask.items() if is_decayed}
  assert decayed == {path for path in mask if path.split("/")[-1] in weight_leaf_names}
  # FLIP's separate q/k/v: their biases and the class token are not decayed.
  assert any(path.endswith("/query/bias") for path in mask)
  assert "img_encoder/cls" in mask and "img_encoder/cls" not in decayed
  assert "logit_scale" in mask and "logit_scale" not in decayed


def test_weight_decay_mask_keeps_frozen_dict_structure():
  params = flax.core.freeze(flip_like_params())
  mask = optim.weight_decay_mask(params)
  assert isinstance(mask, flax.core.FrozenDict)
  assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params)
  assert {path for path, decayed in flat_mask(mask).items() if decayed} == EXPECTED_DECAYED


def test_weight_decay_mask_without_exclusion_and_with_module_names():
  params = flip_like_params()
  names = optim.no_decay_names(make_config(exclude_wd=False))
  assert names == ()
  assert all(flat_mask(optim.weight_decay_mask(params, names)).values())
  # A module name in the list excludes that whole subtree, and nothing else by substring.
  mask = flat_mask(optim.weight_decay_mask(params, ("img_proj", "Dense_1")))
  excluded = {path for path, decayed in mask.items() if not decayed}
  assert excluded == {"img_proj/kernel"} | {p for p in mask if "/Dense_1/" in p}
  config = make_config(**{"opt.no_decay_names": ("bias",)})
  assert optim.no_decay_names(config) == ("bias",)
  mask = flat_mask(optim.weight_decay_mask(params, ("bias",)))
  assert mask["img_encoder/Transformer/encoderblock_0/MultiHeadSelfAttention_0/qkv_bias"]
  assert not mask["img_encoder/embedding/bias"]


# ---------------------------------------------------------------- AdamW, clipping, SGD, LARS


def tiny_params():
  rng = np.random.default_rng(0)
  return {
      "Dense_0": {"kernel": rng.normal(size=(3, 2)).astype(np.float32),
                  "bias": rng.normal(size=(2,)).astype(np.float32)},
      "LayerNorm_0": {"scale": (1.0 + 0.1 * rng.normal(size=(2,))).astype(np.float32)},
  }


def tiny_grads(step):
  rng = np.random.default_rng(100 + step)
  return jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32),
                                tiny_params())


def run_optimizer(optimizer, params, num_steps):
  params = jax.tree_util.tree_map(jnp.asarray, params)
  state = optimizer.init(params)
  for step in range(num_steps):
    updates, state = optimizer.update(tiny_grads(step), state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_adamw_matches_float64_reference():
  # A schedule that changes every step: warmup over 2 epochs of 2 steps each.
  config = make_config(learning_rate=0.1, batch_size=256, samples_per_epoch=512, warmup_epochs=2,
                       num_epochs=6, warmup_abs_lr=1e-3, min_abs_lr=0.0)
  num_steps = 5
  got = run_optimizer(optim.make_optimizer(config), tiny_params(), num_steps)

  b1, b2, eps, wd = 0.9, 0.95, 1e-8, 0.2
  params = jax.tree_util.tree_map(np.float64, tiny_params())
  decayed = {"Dense_0/kernel"}
  names = [("Dense_0", "kernel"), ("Dense_0", "bias"), ("LayerNorm_0", "scale")]
  mu = {n: 0.0 for n in names}
  nu = {n: 0.0 for n in names}
  for step in range(num_steps):
    lr = reference_lr_for(config, step * 256 / 512)
    grads = tiny_grads(step)
    t = step + 1
    for module, leaf in names:
      g = np.float64(grads[module][leaf])
      p = params[module][leaf]
      mu[module, leaf] = b1 * mu[module, leaf] + (1 - b1) * g
      nu[module, leaf] = b2 * nu[module, leaf] + (1 - b2) * g * g
      m_hat = mu[module, leaf] / (1 - b1**t)
      v_hat = nu[module, leaf] / (1 - b2**t)
      update = m_hat / (np.sqrt(v_hat) + eps)
      if f"{module}/{leaf}" in decayed:
        update = update + wd * p
      params[module][leaf] = p - lr * update
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
                         got, params)
  # The step moved the parameters well beyond the tolerance.
  start = tiny_params()["Dense_0"]["kernel"]
  assert np.abs(np.asarray(got["Dense_0"]["kernel"]) - start).max() > 0.05


def sgd_config(**overrides):
  settings = {"opt_type": "sgd", "learning_rate": 0.5, "batch_size": 256, "samples_per_epoch": 256,
              "warmup_epochs": 0, "num_epochs": 1000, "min_abs_lr": 0.0, "warmup_abs_lr": 0.0,
              "opt.weight_decay": 0.0, "opt.momentum": 0.0}
  settings.update(overrides)
  return make_config(**settings)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_by_global_norm_matches_reference(max_norm):
  config = sgd_config(**{"opt.clip_grad": max_norm})
  got = run_optimizer(optim.make_optimizer(config), tiny_params(), 1)
  grads = jax.tree_util.tree_map(np.float64, tiny_grads(0))
  norm = math.sqrt(sum(float(np.sum(g * g)) for g in jax.tree_util.tree_leaves(grads)))
  factor = min(1.0, max_norm / norm)
  assert (factor < 1.0) == (max_norm == 0.5)
  lr = reference_lr_for(config, 0.0)
  expected = jax.tree_util.tree_map(lambda p, g: np.float64(p) - lr * factor * g, tiny_params(),
                                    grads)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         got, expected)


def test_sgd_momentum_with_coupled_masked_decay_matches_reference():
  config = sgd_config(**{"opt.weight_decay": 0.1, "opt.momentum": 0.8})
  num_steps = 3
  got = run_optimizer(optim.make_optimizer(config), tiny_params(), num_steps)
  params = jax.tree_util.tree_map(np.float64, tiny_params())
  trace = jax.tree_util.tree_map(np.zeros_like, params)
  for step in range(num_steps):
    lr = reference_lr_for(config, step * 1.0)
    grads = tiny_grads(step)
    for module, leaf in (("Dense_0", "kernel"), ("Dense_0", "bias"), ("LayerNorm_0", "scale")):
      direction = np.float64(grads[module][leaf])
      if leaf == "kernel":
        direction = direction + 0.1 * params[module][leaf]
      trace[module][leaf] = 0.8 * trace[module][leaf] + direction
      params[module][leaf] = params[module][leaf] - lr * trace[module][leaf]
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         got, params)


def test_lars_matches_hand_reference():
  config = sgd_config(opt_type="lars", **{"opt.weight_decay": 0.01, "opt.momentum": 0.9,
                                          "opt.trust_coefficient": 0.02})
  params = {"Dense_0": {"kernel": np.array([[3.0, 0.0], [0.0, 4.0]], np.float32),
                        "bias": np.array([1.0, -1.0], np.float32)}}
  grads = [{"Dense_0": {"kernel": np.array([[0.6, 0.0], [0.0, 0.8]], np.float32),
                        "bias": np.array([0.5, 0.5], np.float32)}},
           {"Dense_0": {"kernel": np.array([[0.0, 1.0], [1.0, 0.0]], np.float32),
                        "bias": np.array([-0.5, 0.0], np.float32)}}]
  optimizer = optim.make_optimizer(config)
  state = optimizer.init(params)
  got = jax.tree_util.tree_map(jnp.asarray, params)
  for step_grads in grads:
    updates, state = optimizer.update(step_grads, state, got)
    got = optax.apply_updates(got, updates)

  # By hand, step 1 (lr(0) = 0.5; kernel decayed and trust-scaled, bias neither):
  #   kernel: d = g + 0.01 p = [[0.63, 0], [0, 0.84]], |p| = 5, |d| = 1.05,
  #           ratio = 0.02 * 5 / 1.05; trace = lr * ratio * d; p -= trace.
  #   bias:   trace = lr * g = [0.25, 0.25]; p -= trace.
  lr0 = reference_lr_for(config, 0.0)
  lr1 = reference_lr_for(config, 1.0)
  kernel = np.array([[3.0, 0.0], [0.0, 4.0]])
  direction = np.array([[0.63, 0.0], [0.0, 0.84]])
  trace_k = lr0 * (0.02 * 5.0 / 1.05) * direction
  kernel = kernel - trace_k
  bias = np.array([1.0, -1.0]) - lr0 * np.array([0.5, 0.5])
  trace_b = lr0 * np.array([0.5, 0.5])
  # Step 2 from the new kernel.
  direction = np.array([[0.0, 1.0], [1.0, 0.0]]) + 0.01 * kernel
  ratio = 0.02 * np.linalg.norm(kernel) / np.linalg.norm(direction)
  kernel = kernel - (0.9 * trace_k + lr1 * ratio * direction)
  bias = bias - (0.9 * trace_b + lr1 * np.array([-0.5, 0.0]))
  np.testing.assert_allclose(got["Dense_0"]["kernel"], kernel, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got["Dense_0"]["bias"], bias, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- layer-wise lr decay


def vit_layer_of(names):
  for name in names:
    if name.startswith("encoderblock_"):
      return int(name.split("_")[1]) + 1
  return 0 if names[0] in ("embedding", "cls", "pos_embedding") else 3 + 1


def test_layer_decay_multipliers_follow_formula_and_scale_updates():
  z = jnp.zeros((2,), jnp.float32)
  params = {"embedding": {"kernel": z}, "cls": z,
            "encoderblock_0": {"kernel": z}, "encoderblock_2": {"kernel": z},
            "head": {"kernel": z}}
  num_layers, decay = 3, 0.75
  multipliers = optim.layer_decay_multipliers(params, num_layers, decay, vit_layer_of)
  expected_layer = {"embedding/kernel": 0, "cls": 0, "encoderblock_0/kernel": 1,
                    "encoderblock_2/kernel": 3, "head/kernel": 4}
  for path, value in jax.tree_util.tree_flatten_with_path(multipliers)[0]:
    layer_id = expected_layer["/".join(optim.param_path_names(path))]
    assert value == pytest.approx(decay**(num_layers + 1 - layer_id), rel=1e-12)

  config = sgd_config()
  optimizer = optim.make_optimizer(config, lr_multipliers=multipliers)
  grads = jax.tree_util.tree_map(lambda p: jnp.ones_like(p), params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  lr = reference_lr_for(config, 0.0)
  for path, update in jax.tree_util.tree_flatten_with_path(updates)[0]:
    layer_id = expected_layer["/".join(optim.param_path_names(path))]
    np.testing.assert_allclose(update, -lr * 0.75**(4 - layer_id) * np.ones(2), rtol=1e-6)

  with pytest.raises(ValueError, match="head/kernel"):
    optim.layer_decay_multipliers(params, 2, decay, vit_layer_of)


# ---------------------------------------------------------------- t5x integration


class TinyAxesModel(nn.Module):
  """Dense + LayerNorm-like scale, params declared with logical axes as the real models do."""

  @nn.compact
  def __call__(self, x):
    kernel = nn_partitioning.param_with_axes(
        "kernel", nn.initializers.normal(), (4, 3), axes=("embed", "mlp"))
    bias = nn_partitioning.param_with_axes("bias", nn.initializers.zeros, (3,), axes=("mlp",))
    scale = nn_partitioning.param_with_axes("scale", nn.initializers.ones, (3,), axes=("mlp",))
    return (x @ kernel + bias) * scale


@pytest.mark.parametrize("overrides, use_multipliers", [
    ({"opt.clip_grad": 1.0}, False),
    ({}, True),
    ({"opt_type": "sgd", "opt.momentum": 0.9, "opt.clip_grad": 1.0}, False),
    ({"opt_type": "lars", "opt.weight_decay": 1e-4}, False),
])
def test_t5x_wrapper_derives_logical_axes_for_every_state_leaf(overrides, use_multipliers):
  model = TinyAxesModel()
  x = jnp.ones((2, 4), jnp.float32)
  variables = flax.core.freeze(model.init(jax.random.PRNGKey(0), x))
  multipliers = None
  if use_multipliers:
    multipliers = jax.tree_util.tree_map(lambda _: 0.5, flax.core.unfreeze(variables["params"]))
    multipliers = flax.core.freeze(multipliers)
  optimizer = optim.make_optimizer(make_config(**overrides), lr_multipliers=multipliers)
  state = t5x_train_state.FlaxOptimTrainState.create(
      t5x_optimizers.OptaxWrapper(optimizer), variables)
  axes = state.as_logical_axes()

  param_axes = {optim.param_path_names(path): spec for path, spec in
                jax.tree_util.tree_flatten_with_path(
                    axes.params, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]}
  assert param_axes == {("kernel",): jax.sharding.PartitionSpec("embed", "mlp"),
                        ("bias",): jax.sharding.PartitionSpec("mlp"),
                        ("scale",): jax.sharding.PartitionSpec("mlp")}
  state_leaves, state_def = jax.tree_util.tree_flatten_with_path(state.param_states)
  axes_leaves, axes_def = jax.tree_util.tree_flatten_with_path(
      axes.param_states,
      is_leaf=lambda x: x is None or isinstance(x, jax.sharding.PartitionSpec))
  assert state_def == axes_def
  assert len(state_leaves) == len(axes_leaves) > 0
  moment_leaves = 0
  for (path, value), (axes_path, spec) in zip(state_leaves, axes_leaves):
    assert path == axes_path
    if np.ndim(value) == 0:
      assert spec is None, path
    else:
      moment_leaves += 1
      assert spec == param_axes[optim.param_path_names(path)[-1:]], path
  assert moment_leaves in (3, 6)  # one trace or two Adam moments per parameter

  grads = jax.tree_util.tree_map(jnp.ones_like, state.params)
  stepped = jax.jit(lambda s, g: s.apply_gradient(g, learning_rate=None))(state, grads)
  assert int(stepped.step) == 1


def test_t5x_rejects_an_unregistered_state_type():
  # Guards the test above: an optax state t5x has no rule for must fail the same way.
  variables = flax.core.freeze(TinyAxesModel().init(jax.random.PRNGKey(0), jnp.ones((2, 4))))
  state = t5x_train_state.FlaxOptimTrainState.create(
      t5x_optimizers.OptaxWrapper(optax.adadelta(1.0)), variables)
  with pytest.raises(ValueError, match="unregistered optax state"):
    state.as_logical_axes()


# --- opt.flatten_params (FLIP's AdamW option) -----------------------------------------------------


def test_flatten_params_keeps_2d_moments_as_columns_with_the_same_updates():
  """FLIP's flatten_params: Adam's moments of 2-D parameters are [rows * cols, 1] columns; the
  updates are those of the plain AdamW (reference: optax.adamw with the same schedule and mask)."""
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32),
                      "bias": jnp.asarray(rng.standard_normal(4), jnp.float32)},
            "conv": {"kernel": jnp.asarray(rng.standard_normal((2, 2, 3, 4)), jnp.float32)}}
  fast = dict(learning_rate=0.025, warmup_epochs=0)  # peak lr 0.1: updates far above rounding
  flat_opt = optim.make_optimizer(make_config(**fast, **{"opt.flatten_params": True}))
  plain_opt = optim.make_optimizer(make_config(**fast, **{"opt.flatten_params": False}))
  reference = optax.adamw(optim.step_schedule(make_config(**fast)), b1=0.9, b2=0.95,
                          eps=optim.ADAMW_EPS, weight_decay=0.2,
                          mask=lambda p: optim.weight_decay_mask(p, optim.DEFAULT_NO_DECAY_NAMES))
  states = {name: opt.init(params) for name, opt in
            (("flat", flat_opt), ("plain", plain_opt), ("reference", reference))}
  moments = states["flat"][0][0]  # chain(adamw chain(scale_by_adam, ...))
  assert moments.mu["dense"]["kernel"].shape == (24, 1)
  assert moments.nu["dense"]["kernel"].shape == (24, 1)
  assert moments.mu["dense"]["bias"].shape == (4,)
  assert moments.mu["conv"]["kernel"].shape == (2, 2, 3, 4)
  current = {name: params for name in states}
  for step in range(3):
    grads = jax.tree_util.tree_map(
        lambda p, s=step: jnp.asarray(np.random.default_rng(s).standard_normal(p.shape),
                                      jnp.float32), params)
    for name, opt in (("flat", flat_opt), ("plain", plain_opt), ("reference", reference)):
      updates, states[name] = opt.update(grads, states[name], current[name])
      current[name] = optax.apply_updates(current[name], updates)
  for name in ("flat", "plain"):
    for got, want in zip(jax.tree_util.tree_leaves(current[name]),
                         jax.tree_util.tree_leaves(current["reference"])):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
  moved = np.abs(np.asarray(current["flat"]["dense"]["kernel"] - params["dense"]["kernel"]))
  assert moved.min() > 1e-3


def test_flatten_params_is_adamw_only():
  with pytest.raises(ValueError, match="flatten_params"):
    optim.make_optimizer(make_config(opt_type="sgd", **{"opt.flatten_params": True}))
