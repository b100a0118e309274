"""MAE reconstruction grids: the `python -m flip.visualize` command and the training eval hook.

    python -m flip.visualize --workdir=$WD --config=configs/cfg_mae_demo.py --num_images=8 \
        --out=/tmp/grid.png [--checkpoint=$WD/checkpoint_N] [--split=eval|train] [--seed=0]

One row per image, four panels: the original, the encoder's input (removed patches shown in the
mean pixel colour, i.e. zero after normalisation), the reconstruction of every patch, and the
reconstruction with the visible patches pasted back. Images are the first `num_images` of
`config.data.eval` (else `config.data.train`) with the evaluation resize + centre crop, and the
masks come from fixed noise (`seed`), so successive grids of a run show the same images with the
same masks. Small images are enlarged (nearest neighbour) so each panel is at least
MIN_PANEL_PIXELS wide.

With `norm_pix_loss` the model predicts each patch normalised by its own mean and standard
deviation, which a reconstruction cannot know for a removed patch; the grid maps predictions
back with the *target* patch's statistics (the display every MAE visualisation uses). It shows
the structure the model predicts, not its estimate of patch brightness and contrast.

The checkpoint is `--checkpoint`, else `config.pretrain_dir`, else the newest in `--workdir`. During
training `ReconstructionHook` (the MAE task's eval hook, on when `config.visualize.num_images > 0`)
writes the grid to tensorboard (`mae/reconstructions`, clu's `write_images`) and logs the
held-out reconstruction loss of the same images and masks (`mae/heldout_loss`).
"""

import math
import os
import sys
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import flax
import jax
import ml_collections
import numpy as np

from flip import checkpoints
from flip import classification_eval
from flip import evaluate
from flip import losses
from flip import masking
from flip.models import vit as vit_lib

MIN_PANEL_PIXELS = 112  # panels of tiny images (28 px demo) are enlarged to at least this
SEPARATOR_PIXELS = 2
SEPARATOR_VALUE = 255
PANELS = ("original", "masked", "reconstruction", "reconstruction + visible")
DEFAULT_NUM_IMAGES = 8
TENSORBOARD_TAG = "mae/reconstructions"
LOSS_TAG = "mae/heldout_loss"


def _patch_statistics(target: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  mean = target.mean(axis=-1, keepdims=True)
  var = target.var(axis=-1, keepdims=True, ddof=losses.MAE_NORM_PIX_VARIANCE_DDOF)
  return mean, np.sqrt(var + losses.MAE_NORM_PIX_EPS)


def panels_from_outputs(images: np.ndarray, outputs: Mapping[str, np.ndarray],
                        patch_size: Tuple[int, int], norm_pix_loss: bool,
                        pixel_mean: Sequence[float] = vit_lib.IMAGENET_MEAN_RGB,
                        pixel_std: Sequence[float] = vit_lib.IMAGENET_STD_RGB) -> np.ndarray:
  """uint8 [n, 4, H, W, C] panels (PANELS order) from the model's pred/target/mask (host)."""
  images = np.asarray(images)
  n, height, width, channels = images.shape
  grid = (height // patch_size[0], width // patch_size[1])
  target = np.asarray(outputs["target"], np.float64)
  pred = np.asarray(outputs["pred"], np.float64)
  removed = np.asarray(outputs["mask"], np.float64)[..., None] > 0.5
  if norm_pix_loss:
    mean, std = _patch_statistics(target)
    pred = pred * std + mean

  def to_pixels(normalised_patches):
    x = normalised_patches.reshape(n, grid[0] * grid[1], -1, channels)
    x = x * np.asarray(pixel_std) + np.asarray(pixel_mean)
    image = np.asarray(vit_lib.unpatchify(x.reshape(n, grid[0] * grid[1], -1), patch_size, grid,
                                          channels))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)

  masked = np.where(removed, 0.0, target)
  pasted = np.where(removed, pred, target)
  return np.stack([images.astype(np.uint8), to_pixels(masked), to_pixels(pred),
                   to_pixels(pasted)], axis=1)


def grid_image(panels: np.ndarray, min_panel_pixels: int = MIN_PANEL_PIXELS) -> np.ndarray:
  """uint8 [n, k, H, W, C] -> one uint8 [rows, cols, 3] picture, n rows of k panels."""
  n, k, height, width, channels = panels.shape
  scale = max(1, math.ceil(min_panel_pixels / max(height, width)))
  panels = panels.repeat(scale, axis=2).repeat(scale, axis=3)
  height, width = height * scale, width * scale
  if channels == 1:
    panels = panels.repeat(3, axis=-1)
  sep = SEPARATOR_PIXELS
  out = np.full((n * height + (n + 1) * sep, k * width + (k + 1) * sep, 3), SEPARATOR_VALUE,
                np.uint8)
  for row in range(n):
    for col in range(k):
      top, left = sep + row * (height + sep), sep + col * (width + sep)
      out[top:top + height, left:left + width] = panels[row, col]
  return out


def write_png(image: np.ndarray, path: str) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  Image.fromarray(image).save(path, format="PNG")


class Reconstructor:
  """Partitioned MAE forward pass on fixed images and masks -> (grid, held-out loss)."""

  def __init__(self, config: ml_collections.ConfigDict, images: np.ndarray, seed: int = 0,
               partitioner: Any = None):
    self.config = config
    self.images = np.asarray(images)
    self.seed = seed
    self._partitioner = partitioner
    self._forward = None
    self._task_id: Optional[int] = None

  @property
  def partitioner(self):
    if self._partitioner is None:
      from flip import train  # pylint: disable=g-import-not-at-top (train imports the loop)
      self._partitioner = train.build_partitioner(self.config.partitioning)
    return self._partitioner

  def _compiled(self, task: Any):
    if self._forward is None or self._task_id != id(task):
      replicated = jax.sharding.PartitionSpec()

      def forward(params, images, noise):
        outputs = task.forward(params, images, noise, train=False)
        return outputs, task.loss_from_outputs(outputs)

      self._forward = self.partitioner.partition(
          forward, in_axis_resources=(evaluate.params_mesh_axes(task, self.partitioner),
                                      replicated, replicated),
          out_axis_resources=replicated)
      self._task_id = id(task)
    return self._forward

  def mask_noise(self, task: Any) -> np.ndarray:
    rng = jax.random.PRNGKey(self.seed)
    return np.asarray(masking.mask_noise(rng, len(self.images), task.num_patches))

  def __call__(self, task: Any, params: Any) -> Tuple[np.ndarray, float]:
    mesh = self.partitioner.mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    place = lambda x: jax.make_array_from_callback(x.shape, replicated, lambda index: x[index])
    outputs, loss = self._compiled(task)(flax.core.unfreeze(params), place(self.images),
                                         place(self.mask_noise(task)))
    outputs = jax.tree.map(np.asarray, jax.device_get(outputs))
    panels = panels_from_outputs(self.images, outputs, task.model.img["patch_size"],
                                 task.norm_pix_loss)
    return grid_image(panels), float(jax.device_get(loss))


def sample_images(config: ml_collections.ConfigDict, num_images: int,
                  split: Optional[str] = None) -> np.ndarray:
  """The first images of `config.data.eval` (or `.train`, or the given split) for the grid."""
  from flip.data import classification  # pylint: disable=g-import-not-at-top (tf)
  if split is None:
    split = classification.EVAL if config.data.get("eval") else classification.TRAIN
  spec = config.data.eval if split == classification.EVAL else config.data.train
  crop = config.aug.get("eval_crop_fraction") or 1.0
  try:
    return np.stack(classification.eval_images(spec, config.image_size, num_images, crop,
                                               split=split))
  except classification.ClassificationDataError as err:
    raise evaluate.EvalError(str(err)) from None


class ReconstructionHook:
  """Training eval hook: reconstruction grid to tensorboard, held-out loss to the metrics."""

  def __init__(self, reconstructor: Reconstructor, workdir: str):
    self.reconstructor = reconstructor
    self.workdir = workdir
    self._writer = None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  workdir: str) -> Optional["ReconstructionHook"]:
    num_images = int(config.visualize.num_images)
    if num_images <= 0:
      return None
    images = sample_images(config, num_images)
    return cls(Reconstructor(config, images, int(config.visualize.seed)), workdir)

  def __call__(self, task: Any, state: Any, step: int) -> Dict[str, float]:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    grid, loss = self.reconstructor(task, state.params)
    if self._writer is None:
      self._writer = metric_writers.create_default_writer(
          self.workdir, just_logging=jax.process_index() > 0, asynchronous=False)
    self._writer.write_images(step, {TENSORBOARD_TAG: grid[None]})
    self._writer.flush()
    if jax.process_index() == 0:
      print(f"eval at step {step}: {LOSS_TAG} {loss:.4f}", flush=True)
    return {LOSS_TAG: loss}


# --- command line -------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags (defined only when run as a program)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Run directory holding checkpoint_<step> directories.")
  config_flags.DEFINE_config_file("config", None, "The MAE experiment config.", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "A checkpoint_<step> directory (default: newest).")
  flags.DEFINE_integer("num_images", DEFAULT_NUM_IMAGES, "Rows of the grid.")
  flags.DEFINE_string("out", None, "PNG file to write.")
  flags.DEFINE_enum("split", None, ["eval", "train"], "Images from config.data.eval or .train.")
  flags.DEFINE_integer("seed", 0, "Seed of the masks.")


def run(config: ml_collections.ConfigDict, workdir: str, out: str, num_images: int,
        checkpoint: Optional[str] = None, split: Optional[str] = None, seed: int = 0) -> float:
  """Writes the grid of a checkpoint to `out`; returns the loss on those images and masks."""
  from flip import train  # pylint: disable=g-import-not-at-top
  if num_images <= 0:
    raise evaluate.EvalError(f"--num_images must be > 0, got {num_images}")
  ckpt_dir = (checkpoints.find_checkpoint_dir(checkpoint) if checkpoint
              else evaluate.eval_checkpoint_dir(config, workdir))
  task = train.build_task(config)
  if not hasattr(task, "forward") or not hasattr(task, "norm_pix_loss"):
    raise evaluate.EvalError(f"config.task={config.get('task')!r} is not an MAE task")
  params = checkpoints.load_pretrained_params(ckpt_dir, evaluate.params_shapes(task),
                                              posemb_grid=task.grid)
  reconstructor = Reconstructor(config, sample_images(config, num_images, split), seed)
  partitioner = reconstructor.partitioner
  placed = classification_eval.place_host_tree(
      params, evaluate.params_mesh_axes(task, partitioner), partitioner)
  grid, loss = reconstructor(task, placed)
  write_png(grid, out)
  print(f"wrote {out}: {num_images} images from {ckpt_dir}, {LOSS_TAG} {loss:.4f}", flush=True)
  return loss


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("config", "out"):
    if FLAGS[name].value is None:
      raise app.UsageError(f"--{name} is required")
  if FLAGS.workdir is None and FLAGS.checkpoint is None and not FLAGS.config.get("pretrain_dir"):
    raise app.UsageError("--workdir (or --checkpoint) is required")
  try:
    run(FLAGS.config, FLAGS.workdir or "", FLAGS.out, FLAGS.num_images, FLAGS.checkpoint,
        FLAGS.split, FLAGS.seed)
  except (checkpoints.CheckpointError, evaluate.EvalError) as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)


def parse_flags(argv):
  from flip import config as config_lib  # pylint: disable=g-import-not-at-top
  try:
    return config_lib.parse_config_flags(argv, flags.FLAGS)
  except config_lib.ConfigError as err:
    config_lib.exit_on_config_error(err)


if __name__ == "__main__":
  from flip import process_setup  # pylint: disable=g-import-not-at-top
  process_setup.configure_process()
  logging.set_verbosity(logging.WARNING)
  define_flags()
  app.run(main, flags_parser=parse_flags)
