"""MAE reconstruction grids and held-out reconstruction loss (evaluator type "reconstruction").

One row per image, four panels: the original, the encoder's input (removed patches shown in the
mean pixel colour, i.e. zero after normalisation), the reconstruction of every patch, and the
reconstruction with the visible patches pasted back. Images are the first `num_images` of the
entry's `dataset` (a form `flip.data.classification` accepts; its held-out split) with the
evaluation resize + centre crop, and the masks come from fixed noise (`seed`), so successive
grids of a run show the same images with the same masks. Small images are enlarged (nearest
neighbour) so each panel is at least MIN_PANEL_PIXELS wide.

With `norm_pix_loss` the model predicts each patch normalised by its own mean and standard
deviation, which a reconstruction cannot know for a removed patch; the grid maps predictions
back with the *target* patch's statistics (the display every MAE visualisation uses). It shows
the structure the model predicts, not its estimate of patch brightness and contrast.

The evaluator writes the grid to the context's writer (tensorboard `mae/reconstructions`, clu's
`write_images`) and reports the held-out reconstruction loss of the same images and masks
(`mae/heldout_loss`), during training and in eval_only. `python -m flip.visualize` writes the
grid of a checkpoint to a PNG file with the same pieces.
"""

import math
from typing import Any, Dict, Mapping, Sequence, Tuple

import flax
import jax
import ml_collections
import numpy as np

from flip import paths
from flip import losses
from flip.evals import core
from flip.evals import registry
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
  paths.makedirs(paths.dirname(path))
  with paths.open_file(path, "wb") as f:
    Image.fromarray(image).save(f, format="PNG")


def load_images(config: ml_collections.ConfigDict, spec: str, num_images: int,
                split: str = "eval") -> np.ndarray:
  """The first `num_images` images of a split of `spec` with the evaluation crop (host uint8)."""
  from flip.data import classification  # pylint: disable=g-import-not-at-top (tf)
  crop = config.aug.get("eval_crop_fraction") or 1.0
  try:
    return np.stack(classification.eval_images(spec, config.image_size, num_images, crop,
                                               split=split))
  except classification.ClassificationDataError as err:
    raise core.EvalError(str(err)) from None


class Reconstructor:
  """A RECONSTRUCTS task's partitioned forward pass on fixed images and masks -> (grid, loss)."""

  def __init__(self, task: Any, partitioner: Any, params_axes: Any, images: np.ndarray,
               seed: int = 0):
    self.task = task
    self.partitioner = partitioner
    self.images = np.asarray(images)
    self.seed = seed
    replicated = jax.sharding.PartitionSpec()
    self._forward = partitioner.partition(
        task.reconstruct, in_axis_resources=(params_axes, replicated, replicated),
        out_axis_resources=replicated)

  def mask_noise(self) -> np.ndarray:
    return np.asarray(self.task.mask_noise(jax.random.PRNGKey(self.seed), len(self.images)))

  def __call__(self, params: Any) -> Tuple[np.ndarray, float]:
    replicated = jax.sharding.NamedSharding(self.partitioner.mesh, jax.sharding.PartitionSpec())
    place = lambda x: jax.make_array_from_callback(x.shape, replicated, lambda index: x[index])
    outputs, loss = self._forward(flax.core.unfreeze(params), place(self.images),
                                  place(self.mask_noise()))
    outputs = jax.tree.map(np.asarray, jax.device_get(outputs))
    panels = panels_from_outputs(self.images, outputs, self.task.patch_size,
                                 self.task.norm_pix_loss)
    return grid_image(panels), float(jax.device_get(loss))


@registry.register_evaluator("reconstruction")
class ReconstructionEvaluator(registry.Evaluator):
  """Reconstruction grid to the writer, held-out reconstruction loss to the metrics."""

  requires = frozenset({registry.Capability.RECONSTRUCTS})
  defaults = {
      "num_images": DEFAULT_NUM_IMAGES,  # grid rows (one forward pass; batch_size is not used)
      "seed": 0,  # seed of the grid's masks
  }

  def __init__(self, name: str, settings: Mapping[str, Any], context: registry.EvalContext):
    super().__init__(name, settings, context)
    num_images = int(self.settings["num_images"])
    if num_images <= 0:
      raise core.EvalConfigError(f"{self.key}.num_images must be > 0, got {num_images}")
    images = load_images(context.config, self.settings["dataset"], num_images)
    self.reconstructor = Reconstructor(context.task, context.partitioner, context.params_axes,
                                       images, int(self.settings["seed"]))

  def evaluate(self, params: Any, flax_mutables: Any, step: int) -> Dict[str, float]:
    del flax_mutables
    grid, loss = self.reconstructor(params)
    writer = self.context.writer
    if writer is not None:
      writer.write_images(step, {TENSORBOARD_TAG: grid[None]})
      writer.flush()
    return {LOSS_TAG: loss}

  def summary(self, metrics: Mapping[str, float]) -> str:
    return f"{LOSS_TAG} {metrics[LOSS_TAG]:.4f}"
