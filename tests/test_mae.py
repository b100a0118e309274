"""MAE pretraining: flip.models.mae, flip.tasks.mae.MaeTask, the reconstruction evaluator
(flip.evals.reconstruction) during training and in eval_only, and the grid command (flip.visualize).

References are independent of the code under test: patches cut by explicit numpy slicing, the
reconstruction target and mask rebuilt in float64 numpy from the image and the mask noise (ImageNet
statistics written out, kept patches = the smallest noise values), the norm-pix loss evaluated in
float64, the full-batch gradient as the second code path for gradient accumulation, and the grid
geometry written out from the panel size and separators. The training-loop test runs the real loop
(`flip.train.train_and_evaluate`) on in-memory images whose patches are predictable from their
neighbours (smooth colour ramps), so the reconstruction loss has something to learn.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from flip import checkpoints
from flip import config as config_lib
from flip.tasks import common
from flip.tasks import mae as mae_tasks
from flip import train
from flip import visualize
from flip.evals import core as evals_core
from flip.evals import eval_only
from flip.evals import reconstruction
from flip.models import vit as vit_lib
import train_utils

MAE_SMOKE = "configs/cfg_mae_base.py:smoke"
IMAGE_SIZE = 16
PATCH = 4
GRID = IMAGE_SIZE // PATCH
NUM_PATCHES = GRID * GRID
NUM_KEPT = 4  # round(16 * (1 - 0.75))
BATCH = 4  # every forward-pass test uses this batch size: one compilation
# ImageNet channel statistics in 0..255 units (torchvision/MAE).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float64) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float64) * 255
TINY = ("image_size=16", "model.model_img.patches.size=(4, 4)", "model.model_img.hidden_size=32",
        "model.model_img.transformer.mlp_dim=64", "model.model_img.transformer.num_heads=2",
        "model.model_img.transformer.num_layers=1", "model.decoder.hidden_size=16",
        "model.decoder.mlp_dim=32", "model.decoder.num_heads=2", "model.decoder.num_layers=1",
        "data.train=", "evals.reconstruction.dataset=")
NUM_TRAIN_STEPS = 30
# Tests compile small models without LLVM's optimisation passes (as tests/test_models.py does):
# compiling, not running, is what costs time on a 2-core machine.
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}
NUM_GRID_IMAGES = 3


def mae_config(*overrides):
  return config_lib.load_config(MAE_SMOKE, list(TINY) + list(overrides))


def ramp_images(seed, batch, size=IMAGE_SIZE):
  """uint8 images of smooth colour ramps (random direction and colours per image)."""
  rng = np.random.default_rng(seed)
  coords = np.linspace(0.0, 1.0, size)
  rows, cols = np.meshgrid(coords, coords, indexing="ij")
  angle = rng.uniform(0, 2 * np.pi, batch)[:, None, None]
  ramp = 0.5 + 0.5 * np.sin(np.pi * (np.cos(angle) * rows + np.sin(angle) * cols))
  low = rng.uniform(0, 120, (batch, 1, 1, 3))
  high = rng.uniform(135, 255, (batch, 1, 1, 3))
  return np.round(low + (high - low) * ramp[..., None]).astype(np.uint8)


def np_patchify(images, patch):
  """Explicit slicing: patch (i, j) in row-major order, each flattened as [row, col, channel]."""
  b, h, w, c = images.shape
  ph, pw = patch
  out = []
  for i in range(h // ph):
    for j in range(w // pw):
      out.append(images[:, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw, :].reshape(b, -1))
  return np.stack(out, axis=1)


def np_removed(noise, num_kept):
  """1 where a patch is removed: every patch but the `num_kept` smallest noise values per row."""
  removed = np.ones(noise.shape, np.float64)
  for row, values in enumerate(noise):
    removed[row, np.argsort(values)[:num_kept]] = 0.0
  return removed


def np_mae_loss(pred, images, removed, norm_pix_loss, eps=1e-6):
  target = np_patchify((images.astype(np.float64) - IMAGENET_MEAN) / IMAGENET_STD, (PATCH, PATCH))
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, ddof=1, keepdims=True)
    target = (target - mean) / np.sqrt(var + eps)
  per_patch = np.mean((np.float64(pred) - target) ** 2, axis=-1)
  return np.sum(per_patch * removed) / np.sum(removed)


def compile_fast(fn, *example_args, static_argnums=()):
  """jit + compile `fn` for the shapes of `example_args` with FAST_COMPILE_OPTIONS."""
  return jax.jit(fn, static_argnums=static_argnums).lower(*example_args).compile(
      FAST_COMPILE_OPTIONS)


@pytest.fixture(scope="module")
def task_and_params():
  task = mae_tasks.MaeTask(mae_config())
  rng = jax.random.PRNGKey(0)
  params = compile_fast(task.init_variables, rng)(rng)["params"]
  return task, params


@pytest.fixture(scope="module")
def forward(task_and_params):
  """The task's forward pass (compiled once per batch size)."""
  task, _ = task_and_params
  compiled = {}

  def run(params, images, noise):
    batch = images.shape[0]
    if batch not in compiled:
      compiled[batch] = compile_fast(task.forward, params, images, noise)
    return compiled[batch](params, images, noise)

  return run


# ---------------------------------------------------------------- patches

@pytest.mark.parametrize("shape, patch", [((2, 8, 12, 3), (4, 4)), ((1, 6, 8, 1), (3, 2))])
def test_patchify_layout_matches_numpy_slicing_and_unpatchify_inverts_it(shape, patch):
  images = np.random.default_rng(0).integers(0, 256, shape).astype(np.float32)
  patches = np.asarray(vit_lib.patchify(jnp.asarray(images), patch))
  np.testing.assert_array_equal(patches, np_patchify(images, patch))
  grid = (shape[1] // patch[0], shape[2] // patch[1])
  back = np.asarray(vit_lib.unpatchify(jnp.asarray(patches), patch, grid, shape[3]))
  np.testing.assert_array_equal(back, images)


# ---------------------------------------------------------------- target, mask, loss

@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_task_loss_matches_float64_reference_on_target_and_mask_rebuilt_from_the_image(
    task_and_params, forward, norm_pix_loss):
  _, params = task_and_params
  # The flag only enters the loss: the same parameters serve both settings.
  task = mae_tasks.MaeTask(mae_config(f"model.norm_pix_loss={norm_pix_loss}"))
  images = ramp_images(1, BATCH)
  noise = np.asarray(task.mask_noise(jax.random.PRNGKey(3), BATCH))
  outputs = jax.device_get(forward(params, images, noise))
  removed = np_removed(noise, NUM_KEPT)
  np.testing.assert_array_equal(outputs["mask"], removed)
  target = np_patchify((images - IMAGENET_MEAN) / IMAGENET_STD, (PATCH, PATCH))
  np.testing.assert_allclose(outputs["target"], target, rtol=1e-5, atol=1e-5)
  loss = float(task.loss_from_outputs(outputs))
  expected = np_mae_loss(outputs["pred"], images, removed, norm_pix_loss)
  assert loss == pytest.approx(expected, rel=1e-5)


def test_loss_ignores_predictions_of_visible_patches(task_and_params, forward):
  task, params = task_and_params
  images = ramp_images(2, BATCH)
  noise = task.mask_noise(jax.random.PRNGKey(4), BATCH)
  outputs = jax.device_get(forward(params, images, noise))
  loss = float(task.loss_from_outputs(outputs))
  visible = outputs["mask"] == 0
  changed_visible = dict(outputs, pred=np.where(visible[..., None], 1e3, outputs["pred"]))
  changed_removed = dict(outputs, pred=np.where(visible[..., None], outputs["pred"], 1e3))
  assert float(task.loss_from_outputs(changed_visible)) == loss
  assert float(task.loss_from_outputs(changed_removed)) > loss + 1e3


def test_predictions_do_not_depend_on_the_pixels_of_removed_patches(task_and_params, forward):
  task, params = task_and_params
  images = ramp_images(3, BATCH)
  noise = np.asarray(task.mask_noise(jax.random.PRNGKey(5), BATCH))
  removed = np_removed(noise, NUM_KEPT).reshape(BATCH, GRID, GRID) > 0
  pixel_removed = removed.repeat(PATCH, axis=1).repeat(PATCH, axis=2)[..., None]
  scrambled = np.where(pixel_removed, 255 - images, images).astype(np.uint8)
  base = jax.device_get(forward(params, images, noise))
  other = jax.device_get(forward(params, scrambled, noise))
  np.testing.assert_allclose(other["pred"], base["pred"], rtol=1e-5, atol=1e-5)
  assert np.abs(other["target"] - base["target"]).max() > 1.0  # the images did differ


def test_masks_differ_per_example_with_the_same_count_removed(task_and_params, forward):
  task, params = task_and_params
  images = np.repeat(ramp_images(4, 1), BATCH, axis=0)  # identical images
  outputs = jax.device_get(forward(params, images, task.mask_noise(jax.random.PRNGKey(6), BATCH)))
  masks = outputs["mask"]
  assert len({row.tobytes() for row in masks}) == BATCH
  np.testing.assert_array_equal(masks.sum(axis=1), NUM_PATCHES - NUM_KEPT)
  # Different masks of the same image give different reconstructions.
  assert len({np.round(row, 4).tobytes() for row in outputs["pred"]}) == BATCH


def test_gradient_accumulation_gives_the_full_batch_loss_and_gradient(task_and_params):
  task, params = task_and_params
  batch = {"image": ramp_images(5, 8)}
  rng = jax.random.PRNGKey(7)
  grads = lambda steps: compile_fast(task.compute_grads, params, batch, rng, steps,
                                     static_argnums=(3,))(params, batch, rng)
  full_loss, _, full_grads = grads(1)
  accum_loss, _, accum_grads = grads(2)
  assert float(accum_loss) == pytest.approx(float(full_loss), rel=1e-5)
  full, accum = train_utils.flat_tree(full_grads), train_utils.flat_tree(accum_grads)
  assert set(full) == set(accum)
  for key in full:
    np.testing.assert_allclose(accum[key], full[key], rtol=2e-4, atol=1e-6, err_msg=key)
  assert any("mae_decoder" in key for key in full) and any("img_encoder" in key for key in full)


def test_mask_ratio_outside_the_open_unit_interval_is_refused_naming_the_key():
  with pytest.raises(config_lib.ConfigError, match="config.model.model_img.mask_ratio"):
    mae_tasks.MaeTask(mae_config("model.model_img.mask_ratio=0.0"))


# ---------------------------------------------------------------- loop, checkpoint, grid

def write_image_folder(root, images, num_classes=2):
  """`folder:` layout (one sub-folder per class) holding PNGs of `images`."""
  for index, image in enumerate(images):
    folder = os.path.join(root, f"class_{index % num_classes}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(image).save(os.path.join(folder, f"{index:03d}.png"))


def ramp_dataset(config, shard_index, num_shards, seed):
  images = ramp_images(100 + seed, 64)
  ds = tf.data.Dataset.from_tensor_slices({"image": images}).shard(num_shards, shard_index)
  ds = ds.shuffle(64, seed=seed, reshuffle_each_iteration=True).repeat()
  return ds.batch(config.batch_size // num_shards, drop_remainder=True)


@pytest.fixture(scope="module")
def trained_mae(tmp_path_factory):
  """A tiny MAE trained through the loop, with the reconstruction evaluator on held-out PNGs."""
  root = tmp_path_factory.mktemp("mae")
  write_image_folder(str(root / "heldout"), ramp_images(999, NUM_GRID_IMAGES))
  config = mae_config(f"num_train_steps={NUM_TRAIN_STEPS}", "log_every_steps=1",
                      "learning_rate=0.05", "warmup_epochs=0.05", "checkpoint_every_steps=0",
                      f"evals.reconstruction.dataset=folder:{root / 'heldout'}",
                      "aug.eval_crop_fraction=1.0",
                      f"evals.reconstruction.num_images={NUM_GRID_IMAGES}")
  workdir = str(root / "workdir")
  result = train.train_and_evaluate(config, workdir, make_dataset=ramp_dataset)
  return config, workdir, result


def test_mae_trains_through_the_loop_and_checkpoints_encoder_and_decoder(trained_mae):
  config, workdir, result = trained_mae
  assert result["step"] == NUM_TRAIN_STEPS
  logged = train_utils.logged_scalars(workdir, "loss")
  assert sorted(logged) == list(range(1, NUM_TRAIN_STEPS + 1))
  first = np.mean([logged[s] for s in (1, 2, 3)])
  last = np.mean([logged[s] for s in range(NUM_TRAIN_STEPS - 2, NUM_TRAIN_STEPS + 1)])
  assert last < 0.8 * first, (first, last)
  assert checkpoints.latest_complete_step(workdir) == NUM_TRAIN_STEPS
  saved = checkpoints.load_params_tree(workdir)
  assert set(saved) == {common.ENCODER, mae_tasks.DECODER}
  final = train_utils.flat_tree(result["state"].params)
  on_disk = train_utils.flat_tree(saved)
  assert train_utils.unequal_leaves(final, on_disk) == []
  del config


def image_tags_by_step(workdir):
  """{step: set of image summary tags} over the event files of `workdir`."""
  tags = {}
  for events in train_utils.event_files(workdir):
    for event in tf.compat.v1.train.summary_iterator(events):
      for value in event.summary.value:
        if value.HasField("image") or value.metadata.plugin_data.plugin_name == "images":
          tags.setdefault(event.step, set()).add(value.tag)
  return tags


def test_reconstruction_hook_logs_the_grid_and_heldout_loss_to_tensorboard(trained_mae):
  _, workdir, result = trained_mae
  heldout = train_utils.logged_scalars(workdir, reconstruction.LOSS_TAG)
  assert list(heldout) == [NUM_TRAIN_STEPS]
  assert heldout[NUM_TRAIN_STEPS] == pytest.approx(result["metrics"][reconstruction.LOSS_TAG])
  tags = set()
  for events in train_utils.event_files(workdir):
    for event in tf.compat.v1.train.summary_iterator(events):
      tags.update(value.tag for value in event.summary.value)
  assert reconstruction.TENSORBOARD_TAG in tags


def test_visualisation_writes_a_png_grid_of_the_checkpoint(trained_mae, tmp_path):
  config, workdir, result = trained_mae
  out = str(tmp_path / "grid.png")
  loss = visualize.run(config, workdir, out, NUM_GRID_IMAGES)
  # Same images, masks (seed 0) and parameters as the hook at the last step.
  assert loss == pytest.approx(result["metrics"][reconstruction.LOSS_TAG], rel=1e-5)
  grid = np.asarray(Image.open(out).convert("RGB"))
  scale = math.ceil(reconstruction.MIN_PANEL_PIXELS / IMAGE_SIZE)
  panel, sep = IMAGE_SIZE * scale, reconstruction.SEPARATOR_PIXELS
  assert grid.shape == (NUM_GRID_IMAGES * panel + (NUM_GRID_IMAGES + 1) * sep,
                        4 * panel + 5 * sep, 3)

  def cell(row, col):  # one panel, back at image resolution (nearest-neighbour enlargement)
    top, left = sep + row * (panel + sep), sep + col * (panel + sep)
    return grid[top:top + panel:scale, left:left + panel:scale]

  originals = visualize.sample_images(config, NUM_GRID_IMAGES)
  noise = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (NUM_GRID_IMAGES, NUM_PATCHES)))
  removed = np_removed(noise, NUM_KEPT).reshape(-1, GRID, GRID) > 0
  removed = removed.repeat(PATCH, axis=1).repeat(PATCH, axis=2)
  for row in range(NUM_GRID_IMAGES):
    np.testing.assert_array_equal(cell(row, 0), originals[row])
    masked, pasted = cell(row, 1).astype(int), cell(row, 3).astype(int)
    original = originals[row].astype(int)
    # Visible patches are the original (up to the normalise/denormalise round trip); removed
    # ones are the mean colour in the masked panel.
    assert np.abs(masked - original)[~removed[row]].max() <= 1
    assert np.abs(pasted - original)[~removed[row]].max() <= 1
    mean_colour = np.round(IMAGENET_MEAN).astype(int)
    assert np.abs(masked[removed[row]] - mean_colour).max() <= 1


def test_eval_only_of_an_mae_checkpoint_writes_the_grid_and_reports_the_heldout_loss(
    trained_mae, tmp_path, capsys):
  config, workdir, result = trained_mae
  ckpt_dir = checkpoints.checkpoint_dir(workdir, NUM_TRAIN_STEPS)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.eval_only = True
    config.pretrain_dir = ckpt_dir
  eval_dir = str(tmp_path / "eval")
  metrics = eval_only.run_eval_only(config, eval_dir)
  # The parameters of the last step, the same images and masks: the loss of the training run's
  # evaluation at that step.
  assert list(metrics) == [reconstruction.LOSS_TAG]
  assert metrics[reconstruction.LOSS_TAG] == pytest.approx(
      result["metrics"][reconstruction.LOSS_TAG], rel=1e-5)
  assert capsys.readouterr().out.strip().splitlines()[-1] == (
      f"eval_only {ckpt_dir}: {reconstruction.LOSS_TAG} {metrics[reconstruction.LOSS_TAG]:.4f}")
  assert evals_core.format_metrics(metrics) == (
      f"{reconstruction.LOSS_TAG} {metrics[reconstruction.LOSS_TAG]:.4f}")
  assert train_utils.logged_scalars(eval_dir, reconstruction.LOSS_TAG) == {
      NUM_TRAIN_STEPS: pytest.approx(metrics[reconstruction.LOSS_TAG])}
  assert image_tags_by_step(eval_dir) == {NUM_TRAIN_STEPS: {reconstruction.TENSORBOARD_TAG}}
