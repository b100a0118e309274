"""flip.train / flip.tasks: exact gradient accumulation, numeric faults, the schedule the
optimizer really applies, and the weight-decay mask on the real FLIP parameter tree.

References are independent of the code under test: the single-device plain-jit run of
train_utils, the full-batch gradient for accumulation, the learning rate recovered from the
parameter updates and Adam moments (float64) compared with the schedule formula written out here.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import train_utils
from flip import checkpoints
from flip import optim
from flip.tasks import contrastive
from flip import train

# Gradient accumulation must reproduce the full-batch loss and gradient to float32 rounding.
GRAD_RTOL = 1e-5
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-6  # see test_partitioning: updates are ~3e-3, rounding differences <= 1.5e-7


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  with train_utils.persistent_compilation_cache(
      str(tmp_path_factory.getbasetemp() / "jax_compilation_cache")):
    yield


@pytest.fixture(scope="module")
def reference():
  return train_utils.single_device_reference(3)


# --------------------------------------------------------------------------- gradient accumulation

@pytest.fixture(scope="module")
def accumulated_grads(reference):
  """compute_grads of one batch with accum_steps 1, 2, 4 (plain jit, one device)."""
  config = train_utils.tiny_config()
  assert config.model.model_img.mask_ratio == 0.5
  task = contrastive.FlipTask(config)
  params = reference.init_state.params
  batch = next(train_utils.fixed_batches(config, 1))
  rng = jax.random.PRNGKey(7)
  out = {}
  for k in (1, 2, 4):
    fn = jax.jit(functools.partial(task.compute_grads, accum_steps=k))
    loss, metrics, grads = fn(params, batch, rng)
    out[k] = (float(loss), jax.device_get(metrics), train_utils.flat_tree(grads))
  return out


@pytest.mark.parametrize("k", [2, 4])
def test_grad_accumulation_equals_full_batch(accumulated_grads, k):
  loss_1, metrics_1, grads_1 = accumulated_grads[1]
  loss_k, metrics_k, grads_k = accumulated_grads[k]
  np.testing.assert_allclose(loss_k, loss_1, rtol=LOSS_RTOL)
  for name in ("loss_i2t", "loss_t2i", "acc_i2t", "acc_t2i", "logit_scale"):
    np.testing.assert_allclose(metrics_k[name], metrics_1[name], rtol=LOSS_RTOL)
  scale = max(float(np.max(np.abs(g))) for g in grads_1.values())
  worst = 0.0
  for key, g1 in train_utils.without_key_bias(grads_1).items():
    gk = train_utils.without_key_bias(grads_k)[key]
    rel = np.linalg.norm(gk - g1) / max(np.linalg.norm(g1), 1e-30)
    worst = max(worst, rel)
    assert rel <= GRAD_RTOL, (key, rel)
    np.testing.assert_allclose(gk, g1, rtol=1e-4, atol=GRAD_RTOL * scale, err_msg=key)
  print(f"accum_steps={k}: worst per-leaf relative gradient error {worst:.2g}")
  # The key bias: its exact gradient is zero, both computations return rounding noise.
  for key in train_utils.key_biases(grads_1):
    for grads in (grads_1, grads_k):
      assert np.max(np.abs(train_utils.key_biases(grads)[key])) <= GRAD_RTOL * scale, key


def test_key_bias_gradient_is_rounding_noise(accumulated_grads):
  """Why test_partitioning compares the key bias separately: its gradient is ~0, not just small."""
  _, _, grads = accumulated_grads[1]
  key_biases = train_utils.key_biases(grads)
  assert key_biases
  for key, key_grad in key_biases.items():
    if key.endswith(train_utils.SEPARATE_KEY_BIAS_SUFFIX):  # FLIP's layout: .../key/bias
      stem = key[:-len(train_utils.SEPARATE_KEY_BIAS_SUFFIX)]
      query_and_value = np.stack([grads[f"{stem}/query/bias"], grads[f"{stem}/value/bias"]])
    else:
      query_and_value = np.delete(grads[key], train_utils.KEY_BIAS_INDEX, axis=0)
    assert np.max(np.abs(key_grad)) < 1e-6 * np.max(np.abs(query_and_value)), key


def test_grad_accumulation_through_the_trainer_matches_full_batch_steps(reference):
  config = train_utils.tiny_config("grad_accum_steps=2")
  trainer = train_utils.build_trainer(config)
  assert trainer.accum_steps == 2
  run = train_utils.run_steps(trainer, reference.init_state,
                              list(train_utils.fixed_batches(config, len(reference.losses))))
  np.testing.assert_allclose(run.losses, reference.losses, rtol=LOSS_RTOL)
  params = train_utils.without_key_bias(train_utils.flat_tree(run.state.params))
  worst, where = train_utils.max_abs_diff(
      params, train_utils.without_key_bias(train_utils.flat_tree(reference.state.params)))
  print(f"grad_accum_steps=2 through the trainer: max |param diff| {worst:.3g} at {where}")
  assert worst <= PARAM_ATOL, where


# --------------------------------------------------------------------------- numeric faults

def poisoned_compute_grads(original):
  """Wraps FlipTask.compute_grads: a batch whose captions are all POISON_TOKEN gives a NaN loss
  and infinite gradients (what an overflow in a real step looks like)."""

  def compute_grads(self, params, batch, rng, accum_steps=1):
    loss, metrics, grads = original(self, params, batch, rng, accum_steps)
    poison = jnp.all(batch["txt"] == train_utils.POISON_TOKEN)
    loss = jnp.where(poison, jnp.nan, loss)
    grads = jax.tree.map(lambda g: jnp.where(poison, jnp.inf, g), grads)
    return loss, metrics, grads

  return compute_grads


@pytest.fixture
def poisoned_task(monkeypatch):
  monkeypatch.setattr(contrastive.FlipTask, "compute_grads",
                      poisoned_compute_grads(contrastive.FlipTask.compute_grads))


def test_nonfinite_step_leaves_params_and_optimizer_state_unchanged(poisoned_task, reference):
  config = train_utils.tiny_config()
  trainer = train_utils.build_trainer(config)
  batches = list(train_utils.fixed_batches(config, 3))
  batches[1]["txt"] = np.full_like(batches[1]["txt"], train_utils.POISON_TOKEN)
  state = train_utils.place_state(trainer, reference.init_state)
  state, metrics = trainer.train_step(state, batches[0])
  assert int(metrics["nonfinite"]) == 0
  before = jax.device_get(state)
  state, metrics = trainer.train_step(state, batches[1])
  assert int(metrics["nonfinite"]) == 1 and np.isnan(float(metrics["loss"]))
  after = jax.device_get(state)
  assert train_utils.unequal_leaves(train_utils.flat_tree(after.params),
                                    train_utils.flat_tree(before.params)) == []
  assert train_utils.unequal_leaves(train_utils.flat_tree(after.param_states),
                                    train_utils.flat_tree(before.param_states)) == []
  # The skipped step still counts as a step (its batch was consumed): the state's step, which
  # names checkpoints and seeds the step's randomness, stays equal to the loop's step.
  assert int(after.step) == 2
  state, metrics = trainer.train_step(state, batches[2])
  assert int(metrics["nonfinite"]) == 0 and np.isfinite(float(metrics["loss"]))
  assert int(state.step) == 3
  moved = train_utils.flat_tree(jax.device_get(state.params))
  assert train_utils.unequal_leaves(moved, train_utils.flat_tree(before.params))


def test_nonfinite_steps_are_counted_and_too_many_in_a_row_stop_the_run(poisoned_task, tmp_path):
  # Steps 3, 5 and 6 are non-finite; two in a row (5, 6) reach the limit of 2.
  config = train_utils.tiny_config("max_consecutive_nonfinite=2", "checkpoint_every_steps=4",
                                   "num_train_steps=8")
  make_dataset = train_utils.poisoned_dataset_factory(poison_steps=(3, 5, 6), num_steps=8)
  with pytest.raises(train.NonFiniteError) as error:
    train.train_and_evaluate(config, str(tmp_path), make_dataset=make_dataset)
  message = str(error.value)
  assert "\n" not in message
  assert "2 consecutive steps" in message and "max_consecutive_nonfinite=2" in message
  assert "last good checkpoint: 4" in message
  totals = train_utils.logged_scalars(str(tmp_path), "nonfinite_steps_total")
  assert totals == {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 3}
  losses = train_utils.logged_scalars(str(tmp_path), "loss")
  assert [s for s, v in sorted(losses.items()) if not np.isfinite(v)] == [3, 5, 6]
  # The checkpoint after step 4 is named for step 4 (one skipped step before it), has its
  # samples-seen sidecar, and holds finite parameters; nothing was written after the fault.
  assert checkpoints.complete_steps(str(tmp_path)) == [4]
  assert checkpoints.read_meta(str(tmp_path), 4)["samples_seen"] == 4 * config.batch_size
  params = checkpoints.load_params_tree(str(tmp_path))
  checkpoints.check_finite(params, "step 4")


# --------------------------------------------------------------------------- schedule

def test_applied_lr_follows_the_schedule_through_warmup_and_to_the_end(reference):
  """Ten steps (the whole schedule: num_epochs 0.1 of 1600 samples at batch 16) of the real
  partitioned step; the lr each step applied, recovered from the parameters, is the formula's at
  the epoch of the samples seen before the step."""
  config = train_utils.tiny_config()
  num_steps = int(round(config.num_epochs * config.samples_per_epoch / config.batch_size))
  warmup_steps = int(round(config.warmup_epochs * config.samples_per_epoch / config.batch_size))
  assert (num_steps, warmup_steps) == (10, 3)
  trainer = train_utils.build_trainer(config)
  state = train_utils.place_state(trainer, reference.init_state)
  applied = []
  for step, batch in enumerate(train_utils.fixed_batches(config, num_steps), start=1):
    before = train_utils.flat_tree(jax.device_get(state.params))
    state, _ = trainer.train_step(state, batch)
    after = train_utils.flat_tree(jax.device_get(state.params))
    mu, nu = train_utils.adam_moments(state)
    if step == 1:  # warmup starts at warmup_abs_lr = 0: nothing moves at all
      assert config.warmup_abs_lr == 0.0
      assert train_utils.unequal_leaves(before, after) == []
      applied.append(0.0)
      continue
    applied.append(train_utils.applied_adam_lr(before, after, mu, nu, step, config.opt.b1, config.opt.b2))
  expected = [train_utils.formula_lr(config, (s - 1) * config.batch_size / config.samples_per_epoch)
              for s in range(1, num_steps + 1)]
  print("applied lr per step", np.array(applied), "\nformula", np.array(expected))
  np.testing.assert_allclose(applied, expected, rtol=1e-4, atol=1e-12)
  peak = config.learning_rate * config.batch_size / 256
  # Warmup ends after 3 steps: step 4 runs at the peak; the cosine then decreases to the end.
  np.testing.assert_allclose(applied[warmup_steps], peak, rtol=1e-4)
  assert all(a > b for a, b in zip(applied[warmup_steps:], applied[warmup_steps + 1:]))
  # At num_epochs the schedule reaches min_abs_lr (and stays there).
  end_lr = optim.epoch_schedule(config)
  assert float(end_lr(config.num_epochs)) == pytest.approx(config.min_abs_lr, abs=1e-12)
  assert float(end_lr(2 * config.num_epochs)) == pytest.approx(config.min_abs_lr, abs=1e-12)
  np.testing.assert_allclose(float(end_lr(config.warmup_epochs)), peak, rtol=1e-6)


# --------------------------------------------------------------------------- weight decay mask

def test_weight_decay_mask_on_the_real_flip_params_excludes_exactly_these():
  config = train_utils.tiny_config("model.model_img.use_cls_token=True")
  task = contrastive.FlipTask(config)
  params = jax.eval_shape(task.init_variables, jax.random.PRNGKey(0))["params"]
  mask = optim.weight_decay_mask(params, optim.no_decay_names(config))
  not_decayed = {k for k, v in train_utils.flat_tree(mask).items() if not v}
  block = "Transformer/encoderblock_00"
  tower_exempt = [f"{block}/LayerNorm_0/scale", f"{block}/LayerNorm_0/bias",
                  f"{block}/LayerNorm_1/scale", f"{block}/LayerNorm_1/bias",
                  f"{block}/MultiHeadSelfAttention_0/query/bias",
                  f"{block}/MultiHeadSelfAttention_0/key/bias",
                  f"{block}/MultiHeadSelfAttention_0/value/bias",
                  f"{block}/MultiHeadSelfAttention_0/out/bias",
                  f"{block}/MlpBlock_0/Dense_0/bias", f"{block}/MlpBlock_0/Dense_1/bias",
                  "Transformer/encoder_norm/scale", "Transformer/encoder_norm/bias"]
  expected = ({f"img_encoder/{k}" for k in tower_exempt} |
              {f"txt_encoder/{k}" for k in tower_exempt} |
              {"img_encoder/embedding/bias", "img_encoder/cls", "txt_encoder/pos_embedding",
               "logit_scale"})
  assert not_decayed == expected
  decayed = {k for k, v in train_utils.flat_tree(mask).items() if v}
  attention = [f"{block}/MultiHeadSelfAttention_0/{name}/kernel"
               for name in ("query", "key", "value", "out")]
  tower_decayed = attention + [f"{block}/MlpBlock_0/Dense_0/kernel",
                               f"{block}/MlpBlock_0/Dense_1/kernel"]
  assert decayed == ({f"img_encoder/{k}" for k in tower_decayed} |
                     {f"txt_encoder/{k}" for k in tower_decayed} |
                     {"img_encoder/embedding/kernel", "txt_encoder/token_embedding",
                      "img_proj/kernel", "txt_proj/kernel"})


def test_the_optimizer_decays_exactly_the_masked_params():
  """The run's optax chain (not just the mask function): with zero gradients AdamW's update is
  -lr * wd * p on decayed parameters and exactly zero on the others."""
  config = train_utils.tiny_config("model.model_img.use_cls_token=True", "warmup_abs_lr=1e-3")
  task = contrastive.FlipTask(config)
  shapes = jax.eval_shape(task.init_variables, jax.random.PRNGKey(0))["params"]
  params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), flax.core.unfreeze(shapes))
  tx = optim.make_optimizer(config)

  def zero_gradient_updates(p):
    return tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0]

  updates = jax.jit(zero_gradient_updates)(params)
  expected_mask = train_utils.flat_tree(
      optim.weight_decay_mask(params, optim.no_decay_names(config)))
  lr = config.warmup_abs_lr
  for key, update in train_utils.flat_tree(updates).items():
    want = -lr * config.opt.weight_decay if expected_mask[key] else 0.0
    np.testing.assert_allclose(update, want, rtol=1e-6, err_msg=key)
  assert float(optax.global_norm(updates)) > 0
