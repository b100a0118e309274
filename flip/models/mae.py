"""Masked autoencoder (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).

`MaskedAutoencoder` = the project's ViT (`flip.models.vit.VisionTransformer`, registered as
`img_encoder`, the same name the FLIP model and the classifiers use, so one checkpoint layout
serves pretraining, probing and fine-tuning) run on the kept patches only, plus `MaeDecoder`, a
lighter transformer that sees every position and predicts the pixels of every patch.

Pipeline: the encoder normalises the pixels, embeds the patches, adds its fixed 2-D sin-cos
position embedding, keeps an independent random `1 - mask_ratio` of the patches per example
(`flip.masking`, argsort of per-example noise), prepends the class token when configured, and
encodes (ending with its LayerNorm). The decoder projects the encoded tokens to its own width,
appends one shared learned mask token per removed patch, puts the sequence back into patch order
with the mask's restore indices, adds its own sin-cos table (the class token, when present, gets
none: MAE's table is zero there), runs its transformer and predicts `patch * patch * channels`
values per patch. The reconstruction target is the normalised image (ImageNet statistics, the
encoder's own normalisation) cut into patches in the order of `flip.models.vit.patchify`
(row-major patches, each flattened as [row, column, channel], MAE's layout); the loss
(`flip.losses.mae_pixel_loss`) is computed by the task.

Decisions where MAE's code differs from ours or is silent:
- Parameter initialisation follows the project's layers (xavier-uniform linear kernels, LeCun
  normal patch kernel, zero class token) rather than MAE's (the class and mask tokens drawn from
  N(0, 0.02)); the mask token keeps MAE's N(0, 0.02).
- Logical axes: the decoder's input projection is [embed, mlp] (its output is sharded like an MLP
  hidden layer), its blocks use the shared names, and the pixel head's output axis is `pixels`,
  which no rule shards (replicated).
"""

from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flip import masking
from flip.models import layers
from flip.models import vit as vit_lib

Array = jax.Array

MASK_TOKEN_INIT_STDDEV = 0.02  # MAE: torch.nn.init.normal_(self.mask_token, std=.02)


class MaeDecoder(layers.EncoderFields):
  """Mask tokens, patch-order restore, sin-cos positions, transformer, per-patch pixel head."""

  # The stack's fields come from layers.EncoderFields; these three with this tower's defaults.
  num_layers: int = 8
  num_heads: int = 16
  mlp_dim: int = 2048

  hidden_size: int = 512

  @nn.compact
  def __call__(self, tokens: Array, restore_indices: Array, grid: Tuple[int, int],
               num_prefix_tokens: int, num_pixels: int, *, train: bool) -> Array:
    """tokens: [B, prefix + kept, D_enc] encoder output; restore_indices: [B, N] (flip.masking).

    Returns the predicted pixels [B, N, num_pixels] (float32) in patch order.
    """
    batch, num_patches = restore_indices.shape
    if num_patches != grid[0] * grid[1]:
      raise ValueError(f"restore_indices cover {num_patches} patches, the grid {grid} has "
                       f"{grid[0] * grid[1]}")
    x = layers.Dense(self.hidden_size, ("embed", "mlp"), dtype=self.dtype, name="decoder_embed")(
        tokens)
    prefix, kept = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    mask_token = layers.param_with_axes(
        "mask_token", nn.initializers.normal(stddev=MASK_TOKEN_INIT_STDDEV),
        (1, 1, self.hidden_size), jnp.float32, axes=("_null0", "_null1", "embed"))
    num_removed = num_patches - kept.shape[1]
    fill = jnp.broadcast_to(mask_token.astype(self.dtype), (batch, num_removed, self.hidden_size))
    # Kept tokens come first in the mask's shuffled order; the restore indices undo the shuffle.
    x = masking.gather_tokens(jnp.concatenate([kept, fill], axis=1), restore_indices)
    x = x + layers.sincos_2d(grid[0], grid[1], self.hidden_size)[None].astype(self.dtype)
    x = jnp.concatenate([prefix, x], axis=1)
    x = layers.with_sharding_constraint(x, ("batch", "length", "embed"))
    x = layers.encoder_of(self)(x, None, train=train)
    pred = layers.Dense(num_pixels, ("embed", "pixels"), dtype=self.dtype, name="decoder_pred")(
        x[:, num_prefix_tokens:])
    return pred.astype(jnp.float32)


class MaskedAutoencoder(nn.Module):
  """ViT encoder on the kept patches + MAE decoder; returns predictions, mask and target."""

  img: Dict[str, Any]
  decoder: Dict[str, Any]
  dtype: Any = jnp.float32

  def setup(self):
    self.img_encoder = vit_lib.VisionTransformer(**{**self.img, "dtype": self.dtype})
    self.mae_decoder = MaeDecoder(**{**self.decoder, "dtype": self.dtype})

  def target_patches(self, images: Array) -> Array:
    """The reconstruction target: normalised pixels cut into patches [B, N, p*p*C] (float32)."""
    return vit_lib.patchify(self.img_encoder.normalize(images), self.img_encoder.patch_size)

  def __call__(self, images: Array, *, train: bool, mask_noise: Optional[Array] = None,
               mask_ratio: Optional[float] = None) -> Dict[str, Array]:
    """images: [B, H, W, C] in 0..255; `mask_noise` [B, N] fixes the masks (else rng "masking").

    Returns {"pred": [B, N, P] float32, "target": [B, N, P] float32, "mask": [B, N] float32 with
    1 = removed}.
    """
    ratio = self.img_encoder.mask_ratio if mask_ratio is None else mask_ratio
    if not 0.0 < ratio < 1.0:
      raise ValueError(f"MAE needs a mask ratio in (0, 1) (config.model.model_img.mask_ratio), "
                       f"got {ratio}")
    encoded = self.img_encoder(images, train=train, mask_ratio=ratio, mask_noise=mask_noise)
    token_mask = encoded["mask"]
    grid = self.img_encoder.grid(images.shape[1:3])
    target = self.target_patches(images)
    pred = self.mae_decoder(encoded["tokens"], token_mask.restore_indices, grid,
                            1 if self.img_encoder.use_cls_token else 0, target.shape[-1],
                            train=train)
    return {"pred": pred, "target": target, "mask": token_mask.mask}


def decoder_kwargs_from_config(decoder_config: Any) -> Dict[str, Any]:
  """`config.model.decoder` -> MaeDecoder fields."""
  return layers.checked_fields(MaeDecoder, dict(
      layers.config_fields(decoder_config,
                           ("hidden_size", "layernorm_epsilon") + layers.ENCODER_CONFIG_KEYS),
      **layers.present_config_fields(decoder_config, layers.ENCODER_OPTIONAL_CONFIG_KEYS)))


def mae_from_config(config: Any) -> MaskedAutoencoder:
  """The MAE model of an experiment config (`config.model.model_img`, `config.model.decoder`)."""
  return MaskedAutoencoder(img=vit_lib.vit_kwargs_from_config(config.model.model_img),
                           decoder=decoder_kwargs_from_config(config.model.decoder),
                           dtype=layers.as_dtype(config.dtype))
