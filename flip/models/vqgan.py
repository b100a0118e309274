"""A frozen VQGAN image tokenizer (the encoder and vector quantizer of MaskGIT's VQGAN), whose
codes are M3AE's discretised image targets.

Architecture (MaskGIT, Chang et al. 2022, `maskgit/nets/vqgan_tokenizer.py`): a 3 x 3 convolution
to `filters` channels; per stage i a stack of `num_res_blocks` residual blocks of
`filters * channel_multipliers[i]` channels (GroupNorm, swish, 3 x 3 convolution without bias,
twice; a 1 x 1 convolution on the shortcut when the width changes), then 2 x 2 average pooling
except after the last stage; `num_res_blocks` more residual blocks; GroupNorm, swish and a 1 x 1
convolution to `embedding_dim`; each position's code is the nearest codebook entry (squared
Euclidean distance). Input pixels are scaled to [0, 1]. `MASKGIT_IMAGENET256` (the module's
defaults and the config's) is MaskGIT's ImageNet-256 tokenizer: codebook 1024 x 256, 128 filters,
multipliers (1, 1, 2, 2, 4), so a 256 px image becomes a 16 x 16 grid of codes.

Weights come only from a user's file (`load_params`): a flax msgpack (`flax.serialization.to_bytes`
of the params dict) or an .npz whose keys are the "/"-joined parameter paths; they are checked
against the module's shapes. Nothing is downloaded. Parameter names: `conv_in`,
`stage_{i}_block_{j}` (`norm_0`, `conv_0`, `norm_1`, `conv_1`, `shortcut`), `mid_block_{j}`,
`norm_out`, `conv_out`, `codebook`.
"""

from typing import Any, Dict, Mapping, Tuple

import flax
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flip import checkpoints

Array = jax.Array

GROUPS = 32
MASKGIT_IMAGENET256 = dict(filters=128, num_res_blocks=2, channel_multipliers=(1, 1, 2, 2, 4),
                          embedding_dim=256, codebook_size=1024)


def _groups(channels: int) -> int:
  return min(GROUPS, channels)


class ResBlock(nn.Module):
  filters: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    residual = x
    x = nn.GroupNorm(num_groups=_groups(x.shape[-1]), name="norm_0")(x)
    x = nn.Conv(self.filters, (3, 3), use_bias=False, name="conv_0")(nn.swish(x))
    x = nn.GroupNorm(num_groups=_groups(self.filters), name="norm_1")(x)
    x = nn.Conv(self.filters, (3, 3), use_bias=False, name="conv_1")(nn.swish(x))
    if residual.shape[-1] != self.filters:
      residual = nn.Conv(self.filters, (1, 1), use_bias=False, name="shortcut")(residual)
    return x + residual


class VqganTokenizer(nn.Module):
  """uint8 images [B, H, W, 3] -> int32 codes [B, H / 2**(stages-1), W / 2**(stages-1)]."""

  filters: int = 128
  num_res_blocks: int = 2
  channel_multipliers: Tuple[int, ...] = (1, 1, 2, 2, 4)
  embedding_dim: int = 256
  codebook_size: int = 1024

  @property
  def downsampling(self) -> int:
    return 2 ** (len(self.channel_multipliers) - 1)

  def grid(self, image_size: int) -> Tuple[int, int]:
    side = image_size // self.downsampling
    return side, side

  @nn.compact
  def __call__(self, images: Array) -> Array:
    x = images.astype(jnp.float32) / 255.0
    x = nn.Conv(self.filters, (3, 3), use_bias=False, name="conv_in")(x)
    filters = self.filters
    for stage, multiplier in enumerate(self.channel_multipliers):
      filters = self.filters * multiplier
      for block in range(self.num_res_blocks):
        x = ResBlock(filters, name=f"stage_{stage}_block_{block}")(x)
      if stage < len(self.channel_multipliers) - 1:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    for block in range(self.num_res_blocks):
      x = ResBlock(filters, name=f"mid_block_{block}")(x)
    x = nn.swish(nn.GroupNorm(num_groups=_groups(filters), name="norm_out")(x))
    x = nn.Conv(self.embedding_dim, (1, 1), name="conv_out")(x)
    codebook = self.param("codebook", nn.initializers.variance_scaling(
        1.0, "fan_in", "uniform"), (self.codebook_size, self.embedding_dim), jnp.float32)
    distances = (jnp.sum(x ** 2, axis=-1, keepdims=True) - 2.0 * x @ codebook.T
                 + jnp.sum(codebook ** 2, axis=-1))
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def tokenizer_from_config(vqgan_config: Any) -> VqganTokenizer:
  """`config.model.m3ae.vqgan` (architecture keys; defaults: MaskGIT's ImageNet-256) -> module."""
  return VqganTokenizer(filters=int(vqgan_config.filters),
                        num_res_blocks=int(vqgan_config.num_res_blocks),
                        channel_multipliers=tuple(vqgan_config.channel_multipliers),
                        embedding_dim=int(vqgan_config.embedding_dim),
                        codebook_size=int(vqgan_config.codebook_size))


def param_shapes(tokenizer: VqganTokenizer, image_size: int) -> Dict[str, Any]:
  images = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
  return jax.eval_shape(lambda r: tokenizer.init(r, images), jax.random.PRNGKey(0))["params"]


def load_params(path: str, tokenizer: VqganTokenizer, image_size: int) -> Dict[str, Any]:
  """The tokenizer's parameters from a user's .msgpack or .npz file, checked against its shapes."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top (gfile)
  if not path:
    raise ValueError("config.model.m3ae.vqgan.weights is empty: discretized_image needs the "
                     "tokenizer's weights file (.msgpack or .npz; never downloaded)")
  if not tf.io.gfile.exists(path):
    raise ValueError(f"config.model.m3ae.vqgan.weights: no file at {path}")
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  if path.endswith(".npz"):
    import io  # pylint: disable=g-import-not-at-top
    with np.load(io.BytesIO(data)) as arrays:
      loaded = traverse_util.unflatten_dict({k: arrays[k] for k in arrays.files}, sep="/")
  else:
    loaded = flax.serialization.msgpack_restore(data)
  return checkpoints.match_params(loaded, flax.core.unfreeze(param_shapes(tokenizer, image_size)),
                                  source=path)


def save_npz(path: str, params: Mapping[str, Any]) -> None:
  """Writes parameters in load_params' .npz layout (tests, conversions)."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})
