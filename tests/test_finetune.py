"""Fine-tuning: layer-wise lr decay multipliers per parameter, mixup/cutmix, random erasing,
RandAugment ops against PIL (the library timm's RandAugment is built on). MAE and FLIP
checkpoints loading into the fine-tuning and probe models are tested in tests/test_linprobe.py.

References: the layer id of every parameter is written out by hand from MAE's rule (embeddings 0,
block i -> i + 1, the rest num_layers + 1); mixup and cutmix against numpy with the lambda and box
the function used; RandAugment's pixel ops against PIL.ImageOps / PIL.ImageEnhance.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from flip import augment
from flip import config as config_lib
from flip.tasks import classifier as classifier_tasks
from flip import optim

FINETUNE_SMOKE = "configs/cfg_finetune_base.py:smoke"
TINY = ("image_size=16", "model.model_img.patches.size=(4, 4)", "model.model_img.hidden_size=32",
        "model.model_img.transformer.mlp_dim=64", "model.model_img.transformer.num_heads=2",
        "model.model_img.transformer.num_layers=3", "data.num_classes=10",
        "data.train=", "evals.classification.dataset=")


def finetune_config(*overrides):
  return config_lib.load_config(FINETUNE_SMOKE, list(TINY) + list(overrides))


# ---------------------------------------------------------------- layer-wise lr decay

def expected_layer(path: str, num_layers: int) -> int:
  """MAE's param_groups_lrd, written for our parameter names."""
  if path.startswith("img_encoder/embedding/") or path in ("img_encoder/cls",):
    return 0
  if path.startswith("img_encoder/Transformer/encoderblock_"):
    return int(path.split("/")[2].split("_")[1]) + 1
  assert path.startswith(("img_encoder/Transformer/encoder_norm/", "head/")), path
  return num_layers + 1


def test_layer_decay_multipliers_of_every_parameter_equal_the_formula():
  config = finetune_config("classifier.layer_decay=0.65")
  task = classifier_tasks.FinetuneTask(config)
  params = jax.eval_shape(task.init_variables, jax.random.PRNGKey(0))["params"]
  multipliers = task.layer_decay_multipliers(params)
  flat = jax.tree_util.tree_flatten_with_path(multipliers)[0]
  assert len(flat) > 20
  seen_layers = set()
  for path, value in flat:
    name = "/".join(optim.param_path_names(path))
    layer = expected_layer(name, num_layers=3)
    seen_layers.add(layer)
    assert value == pytest.approx(0.65 ** (3 + 1 - layer), rel=1e-12), name
  assert seen_layers == {0, 1, 2, 3, 4}


def test_finetune_optimizer_scales_each_update_by_its_multiplier():
  config = finetune_config("opt_type=sgd", "opt.momentum=0.0", "opt.weight_decay=0.0",
                           "classifier.layer_decay=0.5", "warmup_epochs=0.0",
                           "learning_rate=0.256", "batch_size=256")
  task = classifier_tasks.FinetuneTask(config)
  params = task.init_variables(jax.random.PRNGKey(0))["params"]
  optimizer = task.make_optimizer(config)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  lr = 0.256  # peak = base * 256 / 256, no warmup
  for path, update in jax.tree_util.tree_flatten_with_path(updates)[0]:
    name = "/".join(optim.param_path_names(path))
    expected = -lr * 0.5 ** (4 - expected_layer(name, 3))
    np.testing.assert_allclose(np.asarray(update), expected, rtol=1e-6, err_msg=name)


def test_layer_decay_out_of_range_is_refused_naming_the_key():
  with pytest.raises(config_lib.ConfigError, match="config.classifier.layer_decay"):
    classifier_tasks.FinetuneTask(finetune_config("classifier.layer_decay=1.5"))


def test_finetune_task_refuses_a_frozen_encoder_and_zero_shot():
  with pytest.raises(config_lib.ConfigError, match="frozen_encoder"):
    classifier_tasks.FinetuneTask(finetune_config("classifier.frozen_encoder=True"))
  with pytest.raises(config_lib.ConfigError, match="config.eval_dataset"):
    classifier_tasks.FinetuneTask(finetune_config("eval_dataset=imagenet2012"))


# ---------------------------------------------------------------- mixup / cutmix / smoothing

def test_smoothed_labels_match_timm_values():
  targets = np.asarray(augment.smooth_labels(jnp.array([2, 0]), 4, 0.1))
  np.testing.assert_allclose(targets[0], [0.025, 0.025, 0.925, 0.025], rtol=1e-6)
  np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("mixup_alpha, cutmix_alpha", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_cutmix_mix_labels_with_the_image_share_and_rows_sum_to_one(mixup_alpha,
                                                                          cutmix_alpha):
  rng = np.random.default_rng(0)
  batch, size, classes = 6, 12, 5
  images = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
  labels = rng.integers(0, classes, batch)
  targets = augment.smooth_labels(jnp.asarray(labels), classes, 0.1)
  settings = augment.MixSettings(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha)
  kinds = set()
  for seed in range(8):
    mixed, mixed_targets, lam = jax.device_get(
        augment.mixup_cutmix(jax.random.PRNGKey(seed), jnp.asarray(images), targets, settings))
    lam = float(lam)
    np.testing.assert_allclose(mixed_targets.sum(axis=1), 1.0, rtol=1e-5)
    expected_targets = lam * np.asarray(targets) + (1 - lam) * np.asarray(targets)[::-1]
    np.testing.assert_allclose(mixed_targets, expected_targets, rtol=1e-5, atol=1e-7)
    as_mixup = lam * images + (1 - lam) * images[::-1]
    if np.allclose(mixed, as_mixup, rtol=1e-5, atol=1e-3):
      kinds.add("mixup")
      continue
    # Cutmix: every pixel is either the image's own or the reversed image's, and the share of
    # own pixels is lambda.
    own = np.all(mixed == images, axis=-1)
    other = np.all(mixed == images[::-1], axis=-1)
    assert np.all(own | other)
    pasted = ~own[0]
    assert lam == pytest.approx(1.0 - pasted.mean(), abs=1e-6)
    rows, cols = np.nonzero(pasted)
    if rows.size:  # the pasted region is one rectangle, the same in every example
      assert pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    assert all(np.array_equal(~own[i], pasted) for i in range(batch) if i != batch - 1 - i)
    kinds.add("cutmix")
  expected_kinds = {"mixup"} if cutmix_alpha == 0 else {"cutmix"} if mixup_alpha == 0 else {
      "mixup", "cutmix"}
  assert kinds == expected_kinds


def test_mixing_off_and_probability_zero_leave_the_batch_alone():
  images = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  targets = augment.smooth_labels(jnp.array([0, 1]), 3, 0.0)
  for settings in (augment.MixSettings(), augment.MixSettings(0.8, 1.0, prob=0.0)):
    out, out_targets, lam = augment.mixup_cutmix(jax.random.PRNGKey(1), images, targets, settings)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(out_targets, targets)
    assert float(lam) == 1.0


# ---------------------------------------------------------------- random erasing

def test_random_erasing_replaces_one_rectangle_of_allowed_area_with_noise():
  batch, size = 64, 20
  images = jnp.full((batch, size, size, 3), 7.0, jnp.float32)
  out = np.asarray(augment.random_erasing(jax.random.PRNGKey(3), images, 0.5, (0.0, 0.0, 0.0),
                                          (1.0, 1.0, 1.0)))
  erased = np.any(out != 7.0, axis=-1)
  num_erased = 0
  for i in range(batch):
    if not erased[i].any():
      continue
    num_erased += 1
    rows, cols = np.nonzero(erased[i])
    box = erased[i, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.mean() > 0.95  # one rectangle (a noise value can equal 7.0 only by chance)
    area = box.size / size ** 2
    assert augment.ERASE_AREA_RANGE[0] * 0.5 <= area <= augment.ERASE_AREA_RANGE[1] * 1.3
  assert 16 <= num_erased <= 48  # probability 0.5 of 64
  noise = out[erased]
  assert abs(noise.mean()) < 0.2 and 0.8 < noise.std() < 1.2  # N(mean 0, std 1) pixels here


# ---------------------------------------------------------------- RandAugment against PIL

def pil_reference(name, image, factor=None, bits=None, threshold=None):
  pil = Image.fromarray(image)
  if name == "AutoContrast":
    return np.asarray(ImageOps.autocontrast(pil))
  if name == "Equalize":
    return np.asarray(ImageOps.equalize(pil))
  if name == "Invert":
    return np.asarray(ImageOps.invert(pil))
  if name == "PosterizeIncreasing":
    return np.asarray(ImageOps.posterize(pil, bits))
  if name == "SolarizeIncreasing":
    return np.asarray(ImageOps.solarize(pil, threshold))
  enhancers = {"ColorIncreasing": ImageEnhance.Color, "ContrastIncreasing": ImageEnhance.Contrast,
               "BrightnessIncreasing": ImageEnhance.Brightness,
               "SharpnessIncreasing": ImageEnhance.Sharpness}
  return np.asarray(enhancers[name](pil).enhance(factor))


@pytest.mark.parametrize("name", ["AutoContrast", "Equalize", "Invert", "PosterizeIncreasing",
                                  "SolarizeIncreasing", "ColorIncreasing", "ContrastIncreasing",
                                  "BrightnessIncreasing", "SharpnessIncreasing"])
def test_rand_augment_pixel_ops_match_pil(name):
  rng = np.random.default_rng(5)
  image = np.clip(rng.normal(110, 40, (16, 16, 3)), 30, 200).astype(np.uint8)
  level, sign = 6.0, 1.0
  got = augment.apply_op(name, tf.constant(image, tf.float32), tf.constant(level),
                         tf.constant(sign)).numpy()
  fraction = level / augment.MAX_LEVEL
  expected = pil_reference(name, image, factor=1 + 0.9 * fraction,
                           bits=4 - int(fraction * 4), threshold=256 - int(fraction * 256))
  # PIL rounds its blends in 8-bit arithmetic: allow one grey level.
  assert np.abs(got.astype(np.int32) - expected.astype(np.int32)).max() <= 1, name


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateXRel",
                                  "TranslateYRel"])
def test_rand_augment_geometric_ops_move_pixels_and_fill_with_the_mean(name):
  image = np.zeros((20, 20, 3), np.uint8)
  image[8:12, 2:18] = 255  # a horizontal bar
  got = augment.apply_op(name, tf.constant(image, tf.float32), tf.constant(10.0),
                         tf.constant(1.0)).numpy()
  assert got.shape == image.shape
  assert not np.array_equal(got, image)
  filled = np.all(got == np.asarray(augment.FILL_RGB), axis=-1)
  assert filled.any()  # pixels from outside the image get timm's fill colour


def test_rand_augment_is_deterministic_per_seed_and_varies_across_seeds():
  rng = np.random.default_rng(2)
  image = tf.constant(rng.integers(0, 256, (16, 16, 3)), tf.uint8)
  run = lambda seed: augment.rand_augment(image, tf.constant(seed, tf.int64), 2, 9.0, 0.5).numpy()
  np.testing.assert_array_equal(run([1, 2]), run([1, 2]))
  outputs = [run([1, s]) for s in range(12)]
  assert len({o.tobytes() for o in outputs}) > 6
  assert all(o.dtype == np.uint8 and o.shape == (16, 16, 3) for o in outputs)
