"""MAE pretraining as a task of the one training loop (registered as "mae"; docs/MAE.md).

`MaeTask`: pixel reconstruction of the removed patches (`flip.models.mae`, `flip.losses.
mae_pixel_loss` with `config.model.norm_pix_loss`). Masks are per example: noise [B, N] is drawn
once per step for the whole global batch from the step's rng, so micro-batches (gradient
accumulation) see exactly the masks of the full batch. Every example has the same number of
removed patches, so the full-batch loss is the mean of equal-sized micro-batch losses and the
accumulated gradient (the mean of micro-batch gradients) is exactly the full-batch gradient.
Its evaluation is the reconstruction evaluator: a grid of fixed images with fixed masks and their
held-out reconstruction loss.

Pretrained weights (`config.pretrain_dir`): the `img_encoder` parameters of an MAE, FLIP, probe or
fine-tuned checkpoint (the same sub-tree name in every model), and the decoder when the checkpoint
has one, checked against the model and position-embedding-resized by
`flip.checkpoints.match_params`.
"""

from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from flip import config as config_lib
from flip import losses
from flip import masking
from flip.models import mae as mae_lib
from flip.models import normalization
from flip.tasks import common
from flip.tasks import registry

Array = jax.Array
Params = Mapping[str, Any]
Metrics = Dict[str, Array]

DECODER = "mae_decoder"


# --- MAE pretraining ----------------------------------------------------------------------------

@registry.register_task("mae")
class MaeTask(common.ImageModelTask):
  """Masked-autoencoder pretraining on the images of `config.data.train`."""

  name = "mae"
  capabilities = frozenset({registry.Capability.RECONSTRUCTS,
                            registry.Capability.LOADS_PRETRAINED_SUBSET})

  def __init__(self, config: Any):
    super().__init__(config)
    common.refuse_zeroshot(config, self.name)
    ratio = config.model.model_img.mask_ratio
    if not 0.0 < ratio < 1.0:
      raise config_lib.ConfigError(f"config.model.model_img.mask_ratio must be in (0, 1) for "
                                   f"MAE, got {ratio}")
    model = mae_lib.mae_from_config(config)
    self.model = model.clone(img=normalization.with_pixel_stats(model.img, config))
    self.patch_size = tuple(config.model.model_img.patches.size)
    self.num_patches = self.posemb_grid[0] * self.posemb_grid[1]
    self.mask_ratio = ratio
    self.norm_pix_loss = bool(config.model.norm_pix_loss)

  # --- batch layout ---------------------------------------------------------------------------
  def batch_logical_axes(self) -> Dict[str, Tuple[Any, ...]]:
    return {"image": common.IMAGE_AXES}

  def train_dataset(self, config: Any, shard_index: int, num_shards: int, seed: int):
    from flip.data import classification  # pylint: disable=g-import-not-at-top (tf)
    return classification.make_train_dataset(config, shard_index, num_shards, seed,
                                             with_labels=False)

  # --- variables ------------------------------------------------------------------------------
  def load_pretrained_params(self, path: str, params_shapes: Mapping[str, Any]) -> Dict[str, Any]:
    return common.load_modules(path, params_shapes, required=(common.ENCODER,),
                               optional=(DECODER,),
                        posemb_grid=self.posemb_grid)

  # --- forward and loss -----------------------------------------------------------------------
  def mask_noise(self, rng: Array, batch_size: int) -> Array:
    return masking.mask_noise(rng, batch_size, self.num_patches)

  def forward(self, params: Params, images: Array, mask_noise: Array, rng: Optional[Array] = None,
              train: bool = False) -> Dict[str, Array]:
    """{"pred", "target", "mask"} (flip.models.mae) for the masks given by `mask_noise`."""
    rngs = common.split_rngs(rng) if rng is not None else {}
    return self.model.apply({"params": params}, images, train=train, mask_noise=mask_noise,
                            rngs=rngs)

  def loss_from_outputs(self, outputs: Mapping[str, Array]) -> Array:
    return losses.mae_pixel_loss(outputs["pred"], outputs["target"], outputs["mask"],
                                 self.norm_pix_loss)

  def reconstruct(self, params: Params, images: Array,
                  mask_noise: Array) -> Tuple[Dict[str, Array], Array]:
    """Inference-mode outputs for the masks given by `mask_noise`, and their loss."""
    outputs = self.forward(params, images, mask_noise, train=False)
    return outputs, self.loss_from_outputs(outputs)

  def compute_grads(self, params: Params, batch: Mapping[str, Array], rng: Array,
                    accum_steps: int = 1) -> Tuple[Array, Metrics, Params]:
    """Loss, metrics and the gradient of the full-batch reconstruction loss."""
    batch_size = batch["image"].shape[0]
    noise_rng, model_rng = jax.random.split(rng)
    noise = self.mask_noise(noise_rng, batch_size)

    def loss_fn(p, images, mask_noise, step_rng):
      return self.loss_from_outputs(self.forward(p, images, mask_noise, step_rng, train=True))

    if accum_steps == 1:
      loss, grads = jax.value_and_grad(loss_fn)(params, batch["image"], noise, model_rng)
      return loss, {}, grads

    micro = common.to_microbatches({"image": batch["image"], "noise": noise}, accum_steps)
    micro_rngs = jax.random.split(model_rng, accum_steps)

    def accumulate(carry, xs):
      loss_sum, grad_sum = carry
      mb, step_rng = xs
      loss, grads = jax.value_and_grad(loss_fn)(params, mb["image"], mb["noise"], step_rng)
      return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros),
                                           (micro, micro_rngs))
    return (loss_sum / accum_steps, {},
            jax.tree.map(lambda g: g / accum_steps, grad_sum))
