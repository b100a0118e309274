"""ViT image encoder with FLIP's random patch dropping.

Pipeline: normalise pixels (the input pipeline keeps uint8 until the device) -> patch embedding (a
p x p convolution with stride p, computed as patchify + matmul) -> add the position embedding
(fixed 2-D sin-cos, or learned) -> drop a random `mask_ratio` of the tokens per example (after the
position embedding, so kept tokens carry their own positions) -> optional class token -> pre-norm
transformer -> final LayerNorm -> pooling.

Pooling: `pool="avg_all"` is FLIP's, the average of all encoded tokens, the class token included;
`pool="avg"` averages the patch tokens only (MAE's global pool); `pool="cls"` takes the class token
(needs `use_cls_token`). FLIP's image tower has a class token; it gets no position embedding and is
never dropped. With `mask_ratio == 0` no mask is drawn and no gather happens: the
unmasked path is the plain ViT.

Switches that host timm's and open_clip's ViTs exactly: `patch_bias=False` (open_clip's conv1 has
no bias); `cls_posemb=True` (a learned table whose row 0 is the class token's position, the
[1, 1 + N, D] layout of both); `ln_pre=True` (a LayerNorm on the whole sequence before the
transformer, open_clip's); `pooled_norm=True` (timm's `fc_norm`: no LayerNorm at the end of the
transformer, one on the pooled vector instead).
"""

from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flip import masking
from flip.models import layers
from flip.models import precision

Array = jax.Array

# ImageNet channel statistics in 0..255 pixel units (the normalisation FLIP and MAE use).
IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
POOLS = ("avg", "avg_all", "cls")
POSEMB_INIT_STDDEV = 0.02
# Optional `model.model_img` keys (absent: the field's default).
IMPORT_VARIANT_KEYS = ("patch_bias", "cls_posemb", "ln_pre", "pooled_norm")


def patchify(images: Array, patch_size: Tuple[int, int]) -> Array:
  """[B, H, W, C] -> [B, (H/ph)*(W/pw), ph*pw*C], patches in row-major order."""
  b, h, w, c = images.shape
  ph, pw = patch_size
  if h % ph or w % pw:
    raise ValueError(f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}")
  x = images.reshape(b, h // ph, ph, w // pw, pw, c)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
  return x.reshape(b, (h // ph) * (w // pw), ph * pw * c)


def unpatchify(patches: Array, patch_size: Tuple[int, int], grid: Tuple[int, int],
               channels: int) -> Array:
  """Inverse of `patchify`: [B, gh*gw, ph*pw*C] -> [B, gh*ph, gw*pw, C]."""
  b = patches.shape[0]
  (ph, pw), (gh, gw) = patch_size, grid
  x = patches.reshape(b, gh, gw, ph, pw, channels)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
  return x.reshape(b, gh * ph, gw * pw, channels)


class PatchEmbedding(nn.Module):
  """Conv(kernel=stride=patch) as patchify + matmul; the kernel keeps the conv layout [ph,pw,C,D]."""

  patch_size: Tuple[int, int]
  hidden_size: int
  dtype: Any = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, images: Array) -> Array:
    ph, pw = self.patch_size
    channels = images.shape[-1]
    kernel = layers.param_with_axes(
        "kernel", nn.initializers.lecun_normal(), (ph, pw, channels, self.hidden_size),
        jnp.float32, axes=("_null0", "_null1", "_null2", "embed"))
    patches = patchify(images.astype(self.dtype), self.patch_size)
    flat_kernel = kernel.reshape(ph * pw * channels, self.hidden_size)
    bias = None
    if self.use_bias:
      bias = layers.param_with_axes("bias", nn.initializers.zeros, (self.hidden_size,),
                                    jnp.float32, axes=("embed",))
    return precision.dense(patches, flat_kernel, self.dtype, bias).astype(self.dtype)


class VisionTransformer(layers.EncoderFields):
  """ViT encoder returning pooled features and the encoded tokens."""

  # The stack's fields come from layers.EncoderFields; these three with this tower's defaults.
  num_layers: int = 24
  num_heads: int = 16
  mlp_dim: int = 4096

  patch_size: Tuple[int, int] = (16, 16)
  hidden_size: int = 1024
  mask_ratio: float = 0.0
  sincos: bool = True
  use_cls_token: bool = False
  pool: str = "avg"
  patch_bias: bool = True
  cls_posemb: bool = False
  ln_pre: bool = False
  pooled_norm: bool = False
  pixel_mean: Tuple[float, ...] = IMAGENET_MEAN_RGB
  pixel_std: Tuple[float, ...] = IMAGENET_STD_RGB

  def grid(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
    return image_size[0] // self.patch_size[0], image_size[1] // self.patch_size[1]

  def normalize(self, images: Array) -> Array:
    """uint8 or float pixels in 0..255 -> (x - mean) / std per channel, float32."""
    mean = jnp.asarray(self.pixel_mean, jnp.float32)
    std = jnp.asarray(self.pixel_std, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std

  @nn.compact
  def __call__(self, images: Array, *, train: bool, mask_ratio: Optional[float] = None,
               mask_noise: Optional[Array] = None) -> Dict[str, Any]:
    """images: [B, H, W, C] in 0..255. `mask_ratio` overrides the field (0.0 for evaluation).

    `mask_noise` [B, N] (optional) fixes which tokens are kept (see masking.token_mask_from_noise);
    without it the noise is drawn from the "masking" rng stream.

    Returns {"pooled": [B, D], "tokens": [B, T, D] (class token first if any),
    "mask": masking.TokenMask or None}.
    """
    layers.check_choice("pool", self.pool, POOLS)
    if self.pool == "cls" and not self.use_cls_token:
      raise ValueError("pool='cls' needs use_cls_token=True")
    if self.cls_posemb and (self.sincos or not self.use_cls_token):
      raise ValueError("cls_posemb=True needs a learned table (sincos=False) and use_cls_token=True")
    ratio = self.mask_ratio if mask_ratio is None else mask_ratio
    batch, height, width = images.shape[:3]
    grid_h, grid_w = self.grid((height, width))

    x = PatchEmbedding(self.patch_size, self.hidden_size, self.dtype, use_bias=self.patch_bias,
                       name="embedding")(self.normalize(images))
    x = layers.with_sharding_constraint(x, ("batch", "length", "embed"))
    cls_posemb = None
    if self.sincos:
      posemb = layers.sincos_2d(grid_h, grid_w, self.hidden_size)[None].astype(self.dtype)
    else:
      prefix = 1 if self.cls_posemb else 0
      posemb = layers.param_with_axes(
          "pos_embedding", nn.initializers.normal(stddev=POSEMB_INIT_STDDEV),
          (1, prefix + grid_h * grid_w, self.hidden_size), jnp.float32,
          axes=("_null0", "length", "embed"))
      if prefix:
        cls_posemb, posemb = posemb[:, :prefix], posemb[:, prefix:]
    x = precision.add_param(x, posemb, self.dtype)

    token_mask = None
    if ratio > 0.0:
      if mask_noise is None:
        mask_noise = masking.mask_noise(self.make_rng("masking"), batch, grid_h * grid_w)
      token_mask = masking.token_mask_from_noise(mask_noise, ratio)
      x = masking.gather_tokens(x, token_mask.keep_indices)

    if self.use_cls_token:
      cls = layers.param_with_axes("cls", nn.initializers.zeros, (1, 1, self.hidden_size),
                                   jnp.float32, axes=("_null0", "_null1", "embed"))
      if cls_posemb is not None:
        cls = cls + cls_posemb
      x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.hidden_size)).astype(self.dtype),
                           x], axis=1)

    if self.ln_pre:
      x = layers.LayerNorm(self.layernorm_epsilon, self.dtype, name="ln_pre")(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    x = layers.encoder_of(self, final_norm=not self.pooled_norm)(x, None, train=train)

    if self.pool == "cls":
      pooled = x[:, 0]
    elif self.pool == "avg_all":
      pooled = jnp.mean(x.astype(jnp.float32), axis=1).astype(self.dtype)
    else:
      patch_tokens = x[:, 1:] if self.use_cls_token else x
      pooled = jnp.mean(patch_tokens.astype(jnp.float32), axis=1).astype(self.dtype)
    if self.pooled_norm:
      pooled = layers.LayerNorm(self.layernorm_epsilon, self.dtype, name="fc_norm")(pooled)
    return {"pooled": pooled, "tokens": x, "mask": token_mask}


def vit_kwargs_from_config(img_config: Any, dtype: Any = jnp.float32) -> Dict[str, Any]:
  """`config.model.model_img` (FLIP's key names) -> VisionTransformer fields."""
  return layers.checked_fields(VisionTransformer, dict(
      layers.config_fields(img_config.transformer, layers.ENCODER_CONFIG_KEYS),
      **layers.present_config_fields(img_config.transformer, layers.ENCODER_OPTIONAL_CONFIG_KEYS),
      patch_size=tuple(img_config.patches.size),
      **layers.config_fields(img_config, ("hidden_size", "mask_ratio", "sincos", "use_cls_token",
                                          "pool", "layernorm_epsilon")),
      **layers.present_config_fields(img_config, IMPORT_VARIANT_KEYS),
      dtype=dtype))
