"""The two-tower FLIP model: ViT image tower, text tower, linear projections, temperature.

Returns L2-normalised image and text embeddings and the log logit scale. The scale is learnable
(`tau_learnable`), initialised to ln(1 / tau_init) and clipped to [0, ln(max_logit_scale)] in the
forward pass (CLIP's recipe; FLIP's defaults are tau_init 0.07 and max scale 100), or fixed at
ln(1 / tau). For the sigmoid (SigLIP) loss the scale starts at ln(sigmoid_init_scale) and a learnable
bias at sigmoid_init_bias. Projections have no bias unless `proj_out_bias`. The logit scale is
stored as FLIP stores it, shape (1,); the forward pass reads it as a scalar.
"""

from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flip.models import layers
from flip.models import text as text_lib
from flip.models import vit as vit_lib

Array = jax.Array
LOSSES = ("softmax", "sigmoid")


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


class FlipModel(nn.Module):
  """Image and text towers projected into a shared space with a learnable temperature."""

  img: Dict[str, Any]
  txt: Dict[str, Any]
  proj_dim_out: int = 768
  proj_out_bias: bool = False
  loss: str = "softmax"
  tau: float = 0.01
  tau_learnable: bool = True
  tau_init: float = 0.07
  max_logit_scale: float = 100.0
  sigmoid_init_scale: float = 10.0
  sigmoid_init_bias: float = -10.0
  dtype: Any = jnp.float32

  def setup(self):
    layers.check_choice("model.clr.loss", self.loss, LOSSES)
    self.img_encoder = vit_lib.VisionTransformer(**{**self.img, "dtype": self.dtype})
    self.txt_encoder = text_lib.TextTransformer(**{**self.txt, "dtype": self.dtype})
    self.img_proj = layers.Dense(self.proj_dim_out, ("embed", "proj"), use_bias=self.proj_out_bias,
                                 dtype=self.dtype)
    self.txt_proj = layers.Dense(self.proj_dim_out, ("embed", "proj"), use_bias=self.proj_out_bias,
                                 dtype=self.dtype)
    if self.loss == "sigmoid":
      init_log_scale = jnp.log(self.sigmoid_init_scale)
    elif self.tau_learnable:
      init_log_scale = jnp.log(1.0 / self.tau_init)
    else:
      init_log_scale = None
    if init_log_scale is not None:
      self.logit_scale = layers.param_with_axes(
          "logit_scale", nn.initializers.constant(init_log_scale), (1,), jnp.float32,
          axes=("_null0",), module=self)
    if self.loss == "sigmoid":
      self.logit_bias = layers.param_with_axes(
          "logit_bias", nn.initializers.constant(self.sigmoid_init_bias), (), jnp.float32,
          axes=(), module=self)

  def encode_image(self, images: Array, *, train: bool = False,
                   mask_ratio: Optional[float] = 0.0, mask_noise: Optional[Array] = None) -> Array:
    """Normalised image embeddings [B, proj]; unmasked unless a ratio is given (None: config)."""
    out = self.img_encoder(images, train=train, mask_ratio=mask_ratio, mask_noise=mask_noise)
    return l2_normalize(self.img_proj(out["pooled"]))

  def encode_text(self, tokens: Array, *, train: bool = False) -> Array:
    """Normalised text embeddings [B, proj]."""
    out = self.txt_encoder(tokens, train=train)
    return l2_normalize(self.txt_proj(out["pooled"]))

  def log_logit_scale(self) -> Array:
    if self.loss == "sigmoid" or self.tau_learnable:
      return jnp.clip(self.logit_scale[0], 0.0, jnp.log(self.max_logit_scale))
    return jnp.log(1.0 / jnp.asarray(self.tau, jnp.float32))

  def embed(self, images: Array, tokens: Array, *, train: bool,
            mask_ratio: Optional[float] = None,
            mask_noise: Optional[Array] = None) -> Tuple[Array, Array]:
    """Both towers' normalised embeddings; images masked with the configured ratio by default."""
    return (self.encode_image(images, train=train, mask_ratio=mask_ratio, mask_noise=mask_noise),
            self.encode_text(tokens, train=train))

  def __call__(self, images: Array, tokens: Array, *, train: bool,
               mask_ratio: Optional[float] = None,
               mask_noise: Optional[Array] = None) -> Dict[str, Array]:
    """Training forward pass: embeddings, log logit scale (and the sigmoid loss's bias)."""
    img_emb, txt_emb = self.embed(images, tokens, train=train, mask_ratio=mask_ratio,
                                  mask_noise=mask_noise)
    outputs = {"img_emb": img_emb, "txt_emb": txt_emb, "logit_scale_log": self.log_logit_scale()}
    if self.loss == "sigmoid":
      outputs["logit_bias"] = self.logit_bias
    return outputs


def flip_model_from_config(config: Any) -> FlipModel:
  """Builds the FLIP model from the full experiment config (FLIP's key names)."""
  dtype = layers.as_dtype(config.dtype)
  clr = config.model.clr
  return FlipModel(
      img=vit_lib.vit_kwargs_from_config(config.model.model_img),
      txt=text_lib.text_kwargs_from_config(config.model.model_txt, config.aug.txt.max_len),
      **layers.config_fields(clr, ("proj_dim_out", "proj_out_bias", "loss", "tau", "tau_learnable",
                                   "tau_init", "max_logit_scale", "sigmoid_init_scale",
                                   "sigmoid_init_bias")),
      dtype=dtype,
  )
