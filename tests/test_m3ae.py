"""M3AE (flip.models.m3ae, flip.tasks.m3ae): masks, losses against float64 numpy references, the
MAE equivalence with the text branch off, text-only rows, the probe's view of the encoder, and a
4 x 2 mesh step against the one-device step.

References: the text mask is rebuilt from the noise in numpy (rank of each real token's noise);
the text loss is a float64 log-softmax; the image loss with the text branch off is MaeTask's loss
on the same images and noise with the M3AE parameters renamed into MAE's layout.
"""

import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_utils
from configs import cfg_m3ae_base
from flip import checkpoints
from flip import config as config_lib
from flip import masking
from flip import optim
from flip.models import m3ae as m3ae_lib
from flip.models import normalization
from flip.models import vit as vit_lib
from flip.tasks import common
from flip.tasks import m3ae as m3ae_tasks
from flip.tasks import mae as mae_tasks
from flip.tasks import registry

M3AE_SMOKE = "configs/cfg_m3ae_base.py:smoke"
MAE_SMOKE = "configs/cfg_mae_base.py:smoke"
IMAGE_SIZE, PATCH, TEXT_LEN, VOCAB = 16, 4, 8, 64
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2
BATCH = 4
TOWER = ("image_size=16", "model.model_img.patches.size=(4, 4)", "model.model_img.hidden_size=32",
         "model.model_img.transformer.mlp_dim=64", "model.model_img.transformer.num_heads=2",
         "model.model_img.transformer.num_layers=1", "model.decoder.hidden_size=16",
         "model.decoder.mlp_dim=32", "model.decoder.num_heads=2", "model.decoder.num_layers=1")
M3AE_TINY = TOWER + ("model.m3ae.vocab_size=64", "model.m3ae.text_max_len=8")
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}
IMAGE_TOWER = ("img_encoder/embedding", "img_encoder/type_embedding", "m3ae_decoder/mask_token",
               "m3ae_decoder/decoder_pred", "m3ae_decoder/image_type_embedding")


def m3ae_config(*overrides):
  return config_lib.load_config(M3AE_SMOKE, list(M3AE_TINY) + list(overrides))


def compile_fast(fn, *args, static_argnums=()):
  return jax.jit(fn, static_argnums=static_argnums).lower(*args).compile(FAST_COMPILE_OPTIONS)


def make_batch(seed, paired=(1, 1, 1, 1)):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
  text = rng.integers(1, VOCAB, (BATCH, TEXT_LEN)).astype(np.int32)
  lengths = np.array([8, 5, 3, 1])
  text[np.arange(TEXT_LEN)[None] >= lengths[:, None]] = 0
  return {"image": images, "text": text, "paired": np.asarray(paired, np.int32)}


def np_text_mask(noise, text, ratio):
  """1 = masked real token: every real token but the round(n (1 - ratio)) of smallest noise."""
  out = np.zeros(text.shape)
  for row in range(text.shape[0]):
    real = np.flatnonzero(text[row])
    kept = int(np.floor(len(real) * (1 - ratio) + 0.5))
    order = real[np.argsort(noise[row, real])]
    out[row, order[kept:]] = 1.0
  return out


def np_cross_entropy(logits, labels):
  logits = logits.astype(np.float64)
  logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  return logz - np.take_along_axis(logits, labels[..., None], -1)[..., 0]


def flat(tree):
  return {k: np.asarray(v) for k, v in train_utils.flat_tree(tree).items()}


@pytest.fixture(scope="module")
def task_and_params():
  task = m3ae_tasks.M3aeTask(m3ae_config("model.m3ae.unpaired_text_loss_weight=0.5"))
  rng = jax.random.PRNGKey(0)
  return task, compile_fast(task.init_variables, rng)(rng)["params"]


@pytest.fixture(scope="module")
def forward(task_and_params):
  task, params = task_and_params
  batch = make_batch(0)
  noise = (np.zeros((BATCH, NUM_PATCHES), np.float32), np.zeros((BATCH, TEXT_LEN), np.float32))
  return compile_fast(task.forward, params, batch, *noise)


@pytest.fixture(scope="module")
def grads_fn(task_and_params):
  task, params = task_and_params
  return compile_fast(task.compute_grads, params, make_batch(0), jax.random.PRNGKey(0))


# ---------------------------------------------------------------- masks

@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.3])
def test_text_mask_keeps_the_smallest_noise_real_tokens_and_never_touches_padding(ratio):
  batch = make_batch(1)
  noise = np.random.default_rng(2).uniform(size=(BATCH, TEXT_LEN)).astype(np.float32)
  text_mask = m3ae_lib.text_mask_from_noise(jnp.asarray(noise), jnp.asarray(batch["text"]), ratio)
  expected = np_text_mask(noise, batch["text"], ratio)
  np.testing.assert_array_equal(np.asarray(text_mask.mask), expected)
  real = batch["text"] != 0
  kept = np.asarray(text_mask.kept)
  np.testing.assert_array_equal(kept, real & (expected == 0))  # padding: neither kept nor masked
  # The encoder's valid slots hold exactly the kept tokens.
  gathered = np.take_along_axis(batch["text"], np.asarray(text_mask.keep_indices), 1)
  valid = np.asarray(text_mask.kept_valid)
  for row in range(BATCH):
    assert sorted(gathered[row][valid[row]]) == sorted(batch["text"][row][kept[row]])


def test_masks_differ_per_example_and_per_modality(task_and_params):
  task, _ = task_and_params
  batch = make_batch(3)
  batch["text"] = np.tile(np.arange(1, TEXT_LEN + 1, dtype=np.int32), (BATCH, 1))
  image_noise, text_noise, _ = task.draw_noise(jax.random.PRNGKey(5), batch)
  image_mask = np.asarray(masking.token_mask_from_noise(image_noise, 0.75).mask)
  text_mask = np.asarray(m3ae_lib.text_mask_from_noise(text_noise, batch["text"], 0.75).mask)
  assert len({tuple(r) for r in image_mask}) == BATCH
  assert len({tuple(r) for r in text_mask}) == BATCH  # same caption, different masks
  assert not np.array_equal(np.argsort(np.asarray(image_noise)[:, :TEXT_LEN]),
                            np.argsort(np.asarray(text_noise)))
  assert np.all(text_mask.sum(1) == 6) and np.all(image_mask.sum(1) == 12)


# ---------------------------------------------------------------- losses

def test_text_loss_is_cross_entropy_on_masked_real_tokens_only(task_and_params):
  task, params = task_and_params
  full = full_logits_task(task)  # logits at every position: the reference's view
  batch = make_batch(4, paired=(1, 1, 0, 1))
  rng = np.random.default_rng(6)
  noise = (rng.uniform(size=(BATCH, NUM_PATCHES)).astype(np.float32),
           rng.uniform(size=(BATCH, TEXT_LEN)).astype(np.float32))
  outputs = compile_fast(full.forward, params, batch, *noise)(params, batch, *noise)
  np.testing.assert_array_equal(np.asarray(outputs["text_positions"]),
                                np.tile(np.arange(TEXT_LEN), (BATCH, 1)))
  sums = full.term_sums(params, batch, outputs)
  counts = {k: jnp.sum(v) for k, v in full.weights_for(*noise, batch).items()}
  _, metrics = full.combine(sums, counts)

  masked = np_text_mask(noise[1], batch["text"], full.text_mask_ratio)
  ce = np_cross_entropy(np.asarray(outputs["text_logits"]), batch["text"])
  paired = batch["paired"][:, None].astype(np.float64)
  for name, rows in (("text_loss", paired), ("unpaired_text_loss", 1 - paired)):
    weight = masked * rows
    np.testing.assert_allclose(float(metrics[name]), np.sum(ce * weight) / np.sum(weight),
                               rtol=1e-5)
  # Logits at padding and at kept tokens do not enter the loss.
  shifted = dict(outputs, text_logits=outputs["text_logits"] + 50.0 * jnp.asarray(
      (masked == 0)[..., None] * np.eye(VOCAB * 2)[batch["text"]], jnp.float32))
  _, shifted_metrics = full.combine(full.term_sums(params, batch, shifted), counts)
  np.testing.assert_allclose(float(shifted_metrics["text_loss"]), float(metrics["text_loss"]),
                             rtol=1e-6)


def full_logits_task(task):
  full = m3ae_tasks.M3aeTask(task.config)
  full.model = full.model.clone(all_text_logits=True)
  return full


@pytest.mark.parametrize("length", [0, 1, 5, 8, 13, 16, 64])
@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.3])
def test_the_gathered_text_slots_are_exactly_the_masked_real_tokens(length, ratio):
  rng = np.random.default_rng(length)
  text = rng.integers(1, VOCAB, (6, length)).astype(np.int32)
  text[np.arange(length)[None] >= np.array([length, 0, 1, length // 2, 3, length - 1])[:, None]] = 0
  noise = rng.uniform(size=text.shape).astype(np.float32)
  text_mask = m3ae_lib.text_mask_from_noise(jnp.asarray(noise), jnp.asarray(text), ratio)
  slots = np.asarray(text_mask.masked_indices)
  valid = np.asarray(text_mask.masked_valid)
  expected = np_text_mask(noise, text, ratio)
  # Static: the slot count depends on L and the ratio only (the most any example can mask).
  assert slots.shape == (6, m3ae_lib.num_masked_slots(length, ratio))
  assert np.sum(expected, 1).max(initial=0) <= slots.shape[1]
  assert m3ae_lib.num_masked_slots(length, ratio) == max(
      (n - int(np.floor(n * (1 - ratio) + 0.5)) for n in range(length + 1)), default=0)
  for row in range(6):
    assert sorted(slots[row][valid[row]]) == list(np.flatnonzero(expected[row]))


def test_the_loss_over_gathered_logits_equals_the_loss_over_full_logits(task_and_params):
  task, params = task_and_params
  full = full_logits_task(task)
  batch = make_batch(21, paired=(1, 0, 1, 1))
  rng = jax.random.PRNGKey(22)
  losses_and_grads = [compile_fast(t.compute_grads, params, batch, rng)(params, batch, rng)
                      for t in (task, full)]
  (loss, metrics, grads), (full_loss, full_metrics, full_grads) = losses_and_grads
  assert float(metrics["text_loss"]) > 0 and float(metrics["unpaired_text_loss"]) > 0
  np.testing.assert_allclose(float(loss), float(full_loss), rtol=1e-6)
  for key in metrics:
    np.testing.assert_allclose(float(metrics[key]), float(full_metrics[key]), rtol=1e-6)
  flat_grads, flat_full = flat(grads), flat(full_grads)
  for key, grad in flat_full.items():
    # The two paths sum in different orders: float32 rounding relative to the leaf's scale.
    np.testing.assert_allclose(flat_grads[key], grad, rtol=1e-5,
                               atol=1e-6 * float(np.abs(grad).max()), err_msg=key)
  image_noise, text_noise, _ = task.draw_noise(rng, batch)
  gathered = compile_fast(task.forward, params, batch, image_noise, text_noise)(
      params, batch, image_noise, text_noise)
  assert gathered["text_logits"].shape == (BATCH, m3ae_lib.num_masked_slots(TEXT_LEN, 0.75),
                                           VOCAB * 2)


def test_image_loss_with_the_text_branch_off_equals_the_mae_task(tmp_path):
  m3ae = m3ae_tasks.M3aeTask(m3ae_config("model.m3ae.use_type_embedding=False",
                                         "image_normalization=imagenet"))
  mae = mae_tasks.MaeTask(config_lib.load_config(
      MAE_SMOKE, list(TOWER) + ["data.train=", "model.model_img.mask_ratio=0.75"]))
  rng = jax.random.PRNGKey(7)
  params = compile_fast(m3ae.init_variables, rng)(rng)["params"]
  decoder_names = ("decoder_embed", "mask_token", "Transformer", "decoder_pred")
  mae_params = {"img_encoder": params["img_encoder"],
                "mae_decoder": {k: params["m3ae_decoder"][k] for k in decoder_names}}
  batch = make_batch(8)
  batch["text"] = np.zeros_like(batch["text"])  # the text branch off: no caption tokens
  noise = np.random.default_rng(9).uniform(size=(BATCH, NUM_PATCHES)).astype(np.float32)
  text_noise = np.zeros((BATCH, TEXT_LEN), np.float32)
  outputs = compile_fast(m3ae.forward, params, batch, noise, text_noise)(
      params, batch, noise, text_noise)
  counts = {k: jnp.sum(v) for k, v in m3ae.weights_for(noise, text_noise, batch).items()}
  _, metrics = m3ae.combine(m3ae.term_sums(params, batch, outputs), counts)
  mae_outputs = compile_fast(mae.forward, mae_params, batch["image"], noise)(
      mae_params, batch["image"], noise)
  np.testing.assert_allclose(np.asarray(outputs["pred"]), np.asarray(mae_outputs["pred"]),
                             atol=1e-5)
  np.testing.assert_allclose(float(metrics["image_loss"]),
                             float(mae.loss_from_outputs(mae_outputs)), rtol=1e-5)


def test_text_only_rows_give_no_image_loss_and_no_image_tower_gradient(task_and_params, grads_fn):
  task, params = task_and_params
  rng = jax.random.PRNGKey(11)
  text_only = make_batch(12, paired=(0, 0, 0, 0))
  loss, metrics, grads = grads_fn(params, text_only, rng)
  assert float(metrics["image_loss"]) == 0.0
  flat_grads = flat(grads)
  for key, grad in flat_grads.items():
    if key.startswith(IMAGE_TOWER):
      assert np.all(grad == 0.0), key
  assert np.any(flat_grads["text_embed/token_embedding"] != 0.0)
  # In a mixed batch, the pixels of the text-only rows change nothing.
  mixed = make_batch(13, paired=(1, 0, 1, 0))
  other = dict(mixed, image=mixed["image"].copy())
  other["image"][[1, 3]] = 255 - other["image"][[1, 3]]
  loss_a, _, grads_a = grads_fn(params, mixed, rng)
  loss_b, _, grads_b = grads_fn(params, other, rng)
  assert float(loss_a) == float(loss_b)
  assert train_utils.unequal_leaves(flat(grads_a), flat(grads_b)) == []
  del loss


def test_gradient_accumulation_gives_the_full_batch_loss_and_gradient(task_and_params):
  task, params = task_and_params
  batch, rng = make_batch(14, paired=(1, 0, 1, 1)), jax.random.PRNGKey(15)
  full = jax.jit(task.compute_grads, static_argnums=3)(params, batch, rng, 1)
  accumulated = jax.jit(task.compute_grads, static_argnums=3)(params, batch, rng, 2)
  np.testing.assert_allclose(float(accumulated[0]), float(full[0]), rtol=1e-5)
  worst, where = train_utils.max_abs_diff(flat(accumulated[2]), flat(full[2]))
  assert worst < 1e-5, where


# ---------------------------------------------------------------- the probe's view

def test_the_probe_encoder_with_the_folded_type_embedding_gives_the_m3ae_image_features(
    task_and_params):
  task, params = task_and_params
  encoder = m3ae_lib.M3aeEncoder(**task.model.img)
  vit = vit_lib.VisionTransformer(**{**vit_lib.vit_kwargs_from_config(task.config.model.model_img),
                                     "pixel_mean": encoder.pixel_mean,
                                     "pixel_std": encoder.pixel_std})
  images = make_batch(16)["image"]
  in_order = jnp.tile(jnp.arange(NUM_PATCHES, dtype=jnp.float32), (BATCH, 1))
  no_text = jnp.zeros((BATCH, 0, 32)), jnp.zeros((BATCH, 0), bool)
  m3ae_tokens = encoder.apply({"params": params["img_encoder"]}, images, in_order, 0.0,
                              jnp.ones((BATCH,)), *no_text, train=False)["tokens"]
  shapes = jax.eval_shape(lambda r: vit.init(r, images, train=False), jax.random.PRNGKey(0))[
      "params"]
  folded = common.fold_type_embedding(params["img_encoder"], shapes)
  assert (set(traverse_util.flatten_dict(flax.core.unfreeze(folded)))
          == set(traverse_util.flatten_dict(flax.core.unfreeze(shapes))))
  vit_tokens = vit.apply({"params": folded}, images, train=False)["tokens"]
  np.testing.assert_allclose(np.asarray(vit_tokens), np.asarray(m3ae_tokens), atol=1e-5)
  unfolded = dict(folded, embedding=params["img_encoder"]["embedding"])
  assert not np.allclose(vit.apply({"params": unfolded}, images, train=False)["tokens"],
                         m3ae_tokens, atol=1e-3)


# ---------------------------------------------------------------- partitioning

MESH = ("partitioning.mesh_shape=(4, 2)", "partitioning.num_partitions=2",
        "partitioning.partition_states=False")
STEP_CONFIG = ("batch_size=16", "learning_rate=0.05", "warmup_epochs=0.03", "num_epochs=0.1",
               "model.m3ae.unpaired_text_loss_weight=0.3")


def step_batches(num):
  batches = []
  for step in range(num):
    parts = [make_batch(100 + 4 * step + i, paired=(1, 0, 1, 1)) for i in range(4)]
    batches.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
  return batches


def test_the_model_shards_over_a_4x2_mesh_and_matches_the_one_device_step():
  reference = train_utils.build_trainer(m3ae_config(*STEP_CONFIG))
  device = jax.devices()[0]
  batches = step_batches(2)
  with jax.default_device(device):
    state = jax.jit(reference._init_state)(reference._init_rng)  # pylint: disable=protected-access
    host_init = jax.device_get(state)
    step = jax.jit(reference._train_step)  # pylint: disable=protected-access
    ref_losses = []
    for batch in batches:
      state, metrics = step(state, jax.device_put(batch, device))
      ref_losses.append(float(metrics["loss"]))
  trainer = train_utils.build_trainer(m3ae_config(*STEP_CONFIG, *MESH))
  assert dict(trainer.partitioner.mesh.shape) == {"data": 4, "model": 2}
  run = train_utils.run_steps(trainer, host_init, batches)
  np.testing.assert_allclose(run.losses, ref_losses, rtol=1e-5)
  params = train_utils.without_key_bias(train_utils.flat_tree(run.state.params))
  ref_params = train_utils.without_key_bias(train_utils.flat_tree(state.params))
  worst, where = train_utils.max_abs_diff(params, ref_params)
  moved, _ = train_utils.max_abs_diff(ref_params, train_utils.without_key_bias(
      train_utils.flat_tree(host_init.params)))
  assert moved > 1e-3
  assert worst <= 1e-6, where
  spec = run.state.params["text_embed"]["token_embedding"].sharding.spec
  assert spec[0] == "model"  # the vocab axis is split over the model axis


# ---------------------------------------------------------------- configs

def test_probe_and_finetune_configs_load_the_image_side_of_an_m3ae_checkpoint(monkeypatch):
  m3ae = m3ae_tasks.M3aeTask(config_lib.load_config(M3AE_SMOKE))
  rng = jax.random.PRNGKey(0)
  params = flax.core.unfreeze(jax.device_get(jax.jit(m3ae.init_variables)(rng)["params"]))
  monkeypatch.setattr(checkpoints, "find_checkpoint_dir", lambda path: path)
  monkeypatch.setattr(checkpoints, "load_params_tree", lambda path: params)
  encoder = params["img_encoder"]
  for name in ("configs/cfg_linprobe_m3ae.py:smoke", "configs/cfg_finetune_m3ae.py:smoke"):
    config = config_lib.load_config(name)
    task = registry.get_task(config, config.task)
    assert task.model.img["pixel_mean"] == normalization.stats_by_name("cc12m")[0]
    shapes = jax.eval_shape(task.init_variables, rng)["params"]
    loaded = task.load_pretrained_params("m3ae_run", shapes)
    np.testing.assert_allclose(
        loaded["img_encoder"]["embedding"]["bias"],
        encoder["embedding"]["bias"] + encoder["type_embedding"].reshape(-1), rtol=1e-6)
    np.testing.assert_array_equal(loaded["img_encoder"]["cls"], encoder["cls"])


def test_recipe_numbers_of_the_m3ae_configs():
  pretrain = config_lib.load_config("configs/cfg_m3ae_base.py")
  assert optim.peak_learning_rate(pretrain) == pytest.approx(1.5e-4)
  assert (pretrain.batch_size, pretrain.num_epochs, pretrain.warmup_epochs) == (4096, 100, 5)
  assert (pretrain.opt.b2, pretrain.opt.weight_decay) == (0.95, 0.05)
  weights = pretrain.model.m3ae
  assert (weights.image_loss_weight, weights.text_loss_weight,
          weights.unpaired_text_loss_weight) == (1.0, 0.5, 0.0)
  probe = config_lib.load_config("configs/cfg_linprobe_m3ae.py")
  assert optim.peak_learning_rate(probe) == pytest.approx(0.1) and probe.batch_size == 2048
  assert (probe.opt_type, probe.opt.momentum, probe.opt.weight_decay) == ("sgd", 0.9, 0.0)
  tune = config_lib.load_config("configs/cfg_finetune_m3ae.py")
  assert optim.peak_learning_rate(tune) == pytest.approx(1e-3) and tune.batch_size == 1024
  assert tune.classifier.layer_decay == 0.60
  for size in ("small", "large"):
    width = cfg_m3ae_base.M3AE_SIZES[size]["width"]
    config = config_lib.load_config(f"configs/cfg_m3ae_{size}.py")
    assert config.model.model_img.hidden_size == width
