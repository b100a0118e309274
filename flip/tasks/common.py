"""Pieces every task uses: named rng streams, micro-batch reshaping, and loading a checkpoint's
top-level modules (a task's pretrained subset).

An image encoder whose checkpoint has a `type_embedding` (M3AE's image type embedding, one vector
added to every patch token) loads into an encoder without one by adding it to the patch-embedding
bias, which adds the same vector to every patch token: the features are unchanged.
"""

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax
import jax
import numpy as np

from flip import checkpoints
from flip import config as config_lib
from flip.tasks import registry

Array = jax.Array

# The image encoder's sub-tree: the same name in the FLIP, MAE and classifier models.
ENCODER = "img_encoder"
IMAGE_AXES = ("batch", None, None, None)
# An encoder's per-patch-token additive vector [1, 1, D] (flip.models.m3ae), and the patch bias.
TYPE_EMBEDDING = "type_embedding"
PATCH_BIAS = ("embedding", "bias")

# Names of the rng streams every task's model may use.
RNG_STREAMS = ("dropout", "droppath", "masking")


def split_rngs(rng: Array) -> Dict[str, Array]:
  return dict(zip(RNG_STREAMS, jax.random.split(rng, len(RNG_STREAMS))))


def to_microbatches(tree: Any, num: int) -> Any:
  """Leading batch axis B -> [num, B / num, ...] on every leaf."""
  return jax.tree.map(lambda x: x.reshape((num, x.shape[0] // num) + x.shape[1:]), tree)


def load_modules(path: str, params_shapes: Mapping[str, Any], required: Sequence[str],
                 optional: Sequence[str] = (),
                 posemb_grid: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
  """The `required` (and present `optional`) top-level modules of a checkpoint's parameters,
  checked against `params_shapes` (one-line CheckpointError naming the path or keys)."""
  ckpt_dir = checkpoints.find_checkpoint_dir(path)
  loaded = checkpoints.load_params_tree(ckpt_dir)
  missing = [name for name in required if name not in loaded]
  if missing:
    raise checkpoints.CheckpointError(
        f"{ckpt_dir} has no {', '.join(missing)} parameters (top-level modules: "
        f"{', '.join(sorted(loaded))})")
  names = list(required) + [name for name in optional if name in loaded]
  if ENCODER in names:
    loaded = dict(loaded, **{ENCODER: fold_type_embedding(loaded[ENCODER],
                                                          params_shapes[ENCODER])})
  return checkpoints.match_params({name: loaded[name] for name in names},
                                  {name: params_shapes[name] for name in names},
                                  posemb_grid=posemb_grid, source=ckpt_dir)


def fold_type_embedding(encoder: Mapping[str, Any],
                        target_shapes: Mapping[str, Any]) -> Mapping[str, Any]:
  """A loaded encoder with its `type_embedding` added to the patch bias when the target encoder
  has none (see the module doc); otherwise unchanged."""
  if TYPE_EMBEDDING not in encoder or TYPE_EMBEDDING in target_shapes:
    return encoder
  folded = {k: v for k, v in encoder.items() if k != TYPE_EMBEDDING}
  module, leaf = PATCH_BIAS
  bias = encoder[module][leaf] + encoder[TYPE_EMBEDDING].reshape(-1)
  folded[module] = dict(encoder[module], **{leaf: bias})
  return folded


def refuse_zeroshot(config: Any, task_name: str) -> None:
  """Tasks without a text tower: a non-empty `config.eval_dataset` is refused in one line."""
  if config.get("eval_dataset"):
    raise config_lib.ConfigError(
        f"config.eval_dataset={config.eval_dataset!r} asks for zero-shot evaluation, which needs "
        f"a text tower; task {task_name!r} has none: set --config.eval_dataset=")


class ImageModelTask(registry.Task):
  """A task whose model takes uint8 images alone (MAE, the classifiers): the batch spec, a dummy
  batch and variable initialisation from one image."""

  model: Any

  def batch_spec(self, batch_size: int) -> Dict[str, jax.ShapeDtypeStruct]:
    image = jax.ShapeDtypeStruct((batch_size, self.image_size, self.image_size, 3), np.uint8)
    return {"image": image}

  def dummy_batch(self, batch_size: int) -> Dict[str, np.ndarray]:
    return {k: np.zeros(v.shape, v.dtype) for k, v in self.batch_spec(batch_size).items()}

  def init_variables(self, rng: Array) -> flax.core.FrozenDict:
    images = self.dummy_batch(1)["image"]
    variables = self.model.init(split_rngs(rng) | {"params": rng}, images, train=False)
    return flax.core.freeze(variables)
