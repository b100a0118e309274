"""Multimodal masked autoencoder (Geng et al. 2022, "Multimodal Masked Autoencoders Learn
Transferable Representations"): one encoder over the kept image patches and kept caption tokens,
one decoder that reconstructs both.

Parameters (top-level modules):
- `img_encoder` (`M3aeEncoder`): the patch embedding `embedding`, the class token `cls`, the image
  type embedding `type_embedding` (with `use_type_embedding`) and the shared transformer
  `Transformer`. Apart from `type_embedding` these are the names and shapes of
  `flip.models.vit.VisionTransformer` with a fixed sin-cos position embedding, so the linear-probe
  and fine-tuning tasks load the image side of an M3AE checkpoint as they load MAE's;
  `flip.tasks.common.load_modules` folds the type embedding into the patch-embedding bias (an exact
  rewrite: both are one vector added to every patch token).
- `text_embed` (`TextEmbed`): the token table (`flip.models.text.padded_vocab_rows` rows) and the
  text type embedding; positions are a fixed 1-D sin-cos table.
- `m3ae_decoder` (`M3aeDecoder`): `decoder_embed`, the image `mask_token`, `Transformer` and the
  pixel head `decoder_pred` carry the names of `flip.models.mae.MaeDecoder`; `text_mask_token`,
  `image_type_embedding`, `text_type_embedding` and the token head `decoder_text_pred` are M3AE's.

Masking is per example and independent per modality. Images: `flip.masking` on [B, N] noise.
Text: only real (non-padding, id != 0) tokens are content; of an example's n real tokens,
`round(n * (1 - text_mask_ratio))` (halves up) are kept, chosen by the smallest noise, the other
real tokens are masked, and padding is neither. The encoder gathers a fixed number of text slots,
`masking.num_kept(L, ratio)` (never fewer than any example keeps); slots beyond an example's kept
count are excluded from attention like padding. A row whose `paired` flag is 0 (a text-only
example) has its image tokens excluded from every attention in encoder and decoder, so its image
neither influences the text nor receives a gradient from it.

The decoder restores both sequences to full length with a learned mask token per modality (text:
masked real tokens and padding get the text mask token; padding stays out of attention), adds
2-D / 1-D sin-cos positions and, with `use_type_embedding`, per-modality type embeddings, and
predicts the pixels (or, with discretised targets, the code logits) of every patch and the token
logits of every text position. Losses are computed by the task (flip.tasks.m3ae).
"""

from typing import Any, Dict, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flip import masking
from flip.models import layers
from flip.models import mae as mae_lib
from flip.models import text as text_lib
from flip.models import vit as vit_lib

Array = jax.Array

TYPE_EMBEDDING = "type_embedding"  # the image type embedding's name inside `img_encoder`
TYPE_EMBEDDING_INIT_STDDEV = 0.02
TOKEN_EMBEDDING_INIT_STDDEV = 0.02
PAD_ID = text_lib.PAD_ID
_ROUND_DECIMALS = 6


class TextMask(NamedTuple):
  keep_indices: Array  # [B, K] int32: text positions gathered for the encoder
  kept_valid: Array  # [B, K] bool: slot holds a kept real token (else excluded from attention)
  restore_indices: Array  # [B, L] int32: slot of each position in the gathered order
  kept: Array  # [B, L] bool: real token shown to the encoder
  mask: Array  # [B, L] float32: 1 = real token masked (the text loss's positions)


def text_mask_from_noise(noise: Array, tokens: Array, mask_ratio: float) -> TextMask:
  """Per-example text mask that keeps round(n_real * (1 - ratio)) real tokens (see module doc)."""
  _, length = tokens.shape
  valid = tokens != PAD_ID
  num_real = jnp.sum(valid, axis=1).astype(jnp.float32)
  kept_count = jnp.floor(jnp.round(num_real * (1.0 - mask_ratio), _ROUND_DECIMALS) + 0.5)
  slots = masking.num_kept(length, mask_ratio) if length else 0
  kept_count = jnp.minimum(kept_count, slots).astype(jnp.int32)
  order = jnp.argsort(jnp.where(valid, noise, 2.0 + noise), axis=1).astype(jnp.int32)
  rank = jnp.argsort(order, axis=1).astype(jnp.int32)
  kept = valid & (rank < kept_count[:, None])
  kept_valid = jnp.arange(slots)[None, :] < kept_count[:, None]
  mask = (valid & ~kept).astype(jnp.float32)
  return TextMask(order[:, :slots], kept_valid, rank, kept, mask)


def _type_embedding(name: str, width: int) -> Array:
  return layers.param_with_axes(name, nn.initializers.normal(stddev=TYPE_EMBEDDING_INIT_STDDEV),
                                (1, 1, width), jnp.float32, axes=("_null0", "_null1", "embed"))


def text_positions(length: int, width: int) -> Array:
  return layers.sincos_1d(jnp.arange(length), width, 10000.0)


class TextEmbed(nn.Module):
  """Token table + fixed 1-D sin-cos positions (+ text type embedding): [B, L] -> [B, L, D]."""

  vocab_size: int
  hidden_size: int
  use_type_embedding: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array) -> Array:
    table = layers.param_with_axes(
        "token_embedding", nn.initializers.normal(stddev=TOKEN_EMBEDDING_INIT_STDDEV),
        (text_lib.padded_vocab_rows(self.vocab_size), self.hidden_size), jnp.float32,
        axes=("vocab", "embed"))
    x = jnp.take(table, tokens, axis=0).astype(self.dtype)
    x = x + text_positions(tokens.shape[1], self.hidden_size)[None].astype(self.dtype)
    if self.use_type_embedding:
      x = x + _type_embedding(TYPE_EMBEDDING, self.hidden_size).astype(self.dtype)
    return layers.with_sharding_constraint(x, ("batch", "length", "embed"))


class M3aeEncoder(layers.EncoderFields):
  """Kept image patches (+ type embedding) and given text tokens through one transformer."""

  # The stack's fields come from layers.EncoderFields; these three with this tower's defaults.
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072

  patch_size: Tuple[int, int] = (16, 16)
  hidden_size: int = 768
  use_cls_token: bool = True
  use_type_embedding: bool = True
  pixel_mean: Tuple[float, ...] = vit_lib.IMAGENET_MEAN_RGB
  pixel_std: Tuple[float, ...] = vit_lib.IMAGENET_STD_RGB

  def normalize(self, images: Array) -> Array:
    """uint8 or float pixels in 0..255 -> (x - mean) / std per channel, float32."""
    mean = jnp.asarray(self.pixel_mean, jnp.float32)
    std = jnp.asarray(self.pixel_std, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std

  @nn.compact
  def __call__(self, images: Array, image_noise: Array, image_mask_ratio: float, paired: Array,
               text_x: Array, text_valid: Array, *, train: bool) -> Dict[str, Any]:
    """images [B, H, W, C] 0..255; image_noise [B, N]; paired [B] (0: image left out of
    attention); text_x [B, K, D] embedded kept text; text_valid [B, K] bool.

    Returns {"tokens": [B, prefix + kept + K, D], "image_mask": masking.TokenMask}.
    """
    batch, height, width = images.shape[:3]
    grid_h, grid_w = height // self.patch_size[0], width // self.patch_size[1]
    x = vit_lib.PatchEmbedding(self.patch_size, self.hidden_size, self.dtype, name="embedding")(
        self.normalize(images))
    x = x + layers.sincos_2d(grid_h, grid_w, self.hidden_size)[None].astype(self.dtype)
    if self.use_type_embedding:
      x = x + _type_embedding(TYPE_EMBEDDING, self.hidden_size).astype(self.dtype)
    x = layers.with_sharding_constraint(x, ("batch", "length", "embed"))
    image_mask = masking.token_mask_from_noise(image_noise, image_mask_ratio)
    x = masking.gather_tokens(x, image_mask.keep_indices)
    image_valid = jnp.broadcast_to(paired.astype(bool)[:, None], x.shape[:2])
    parts, valid = [x, text_x.astype(self.dtype)], [image_valid, text_valid]
    if self.use_cls_token:
      cls = layers.param_with_axes("cls", nn.initializers.zeros, (1, 1, self.hidden_size),
                                   jnp.float32, axes=("_null0", "_null1", "embed"))
      parts.insert(0, jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, self.hidden_size)))
      valid.insert(0, jnp.ones((batch, 1), bool))
    x = jnp.concatenate(parts, axis=1)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    x = layers.encoder_of(self)(x, jnp.concatenate(valid, axis=1), train=train)
    return {"tokens": x, "image_mask": image_mask}


class M3aeDecoder(layers.EncoderFields):
  """Both modalities restored with their mask tokens, one transformer, pixel and token heads."""

  # The stack's fields come from layers.EncoderFields; these three with this tower's defaults.
  num_layers: int = 8
  num_heads: int = 16
  mlp_dim: int = 2048

  hidden_size: int = 512
  use_type_embedding: bool = True

  @nn.compact
  def __call__(self, tokens: Array, num_prefix: int, image_restore: Array, grid: Tuple[int, int],
               paired: Array, text_mask: TextMask, text_valid: Array, num_image_outputs: int,
               num_text_outputs: int, *, train: bool) -> Tuple[Array, Array]:
    """Returns image outputs [B, N, num_image_outputs] and text logits [B, L, num_text_outputs]
    (float32)."""
    batch, num_patches = image_restore.shape
    length = text_valid.shape[1]
    num_image_kept = tokens.shape[1] - num_prefix - text_mask.keep_indices.shape[1]
    x = layers.Dense(self.hidden_size, ("embed", "mlp"), dtype=self.dtype, name="decoder_embed")(
        tokens)
    prefix = x[:, :num_prefix]
    image_kept = x[:, num_prefix:num_prefix + num_image_kept]
    text_kept = x[:, num_prefix + num_image_kept:]

    def mask_token(name):
      token = layers.param_with_axes(
          name, nn.initializers.normal(stddev=mae_lib.MASK_TOKEN_INIT_STDDEV),
          (1, 1, self.hidden_size), jnp.float32, axes=("_null0", "_null1", "embed"))
      return token.astype(self.dtype)

    image_token = mask_token("mask_token")
    fill = jnp.broadcast_to(image_token, (batch, num_patches - num_image_kept, self.hidden_size))
    image = masking.gather_tokens(jnp.concatenate([image_kept, fill], axis=1), image_restore)
    image = image + layers.sincos_2d(grid[0], grid[1], self.hidden_size)[None].astype(self.dtype)
    text_token = mask_token("text_mask_token")
    fill = jnp.broadcast_to(text_token, (batch, length - text_kept.shape[1], self.hidden_size))
    text = masking.gather_tokens(jnp.concatenate([text_kept, fill], axis=1),
                                 text_mask.restore_indices)
    text = jnp.where(text_mask.kept[:, :, None], text, text_token)
    text = text + text_positions(length, self.hidden_size)[None].astype(self.dtype)
    if self.use_type_embedding:
      image = image + _type_embedding("image_type_embedding", self.hidden_size).astype(self.dtype)
      text = text + _type_embedding("text_type_embedding", self.hidden_size).astype(self.dtype)
    x = jnp.concatenate([prefix, image, text], axis=1)
    x = layers.with_sharding_constraint(x, ("batch", "length", "embed"))
    key_mask = jnp.concatenate([
        jnp.ones((batch, num_prefix), bool),
        jnp.broadcast_to(paired.astype(bool)[:, None], (batch, num_patches)), text_valid], axis=1)
    x = layers.encoder_of(self)(x, key_mask, train=train)
    image_out = layers.Dense(num_image_outputs, ("embed", "pixels"), dtype=self.dtype,
                             name="decoder_pred")(x[:, num_prefix:num_prefix + num_patches])
    text_out = layers.Dense(num_text_outputs, ("embed", "vocab"), dtype=self.dtype,
                            name="decoder_text_pred")(x[:, num_prefix + num_patches:])
    return image_out.astype(jnp.float32), text_out.astype(jnp.float32)


class MultimodalMaskedAutoencoder(nn.Module):
  """`img_encoder` + `text_embed` + `m3ae_decoder` (module doc); returns outputs and masks."""

  img: Dict[str, Any]
  decoder: Dict[str, Any]
  vocab_size: int
  use_type_embedding: bool = True
  # Outputs per patch of the image head: 0 = pixels (p * p * C); else a codebook size.
  num_image_codes: int = 0
  dtype: Any = jnp.float32

  def setup(self):
    self.img_encoder = M3aeEncoder(**{**self.img, "use_type_embedding": self.use_type_embedding,
                                      "dtype": self.dtype})
    self.text_embed = TextEmbed(self.vocab_size, self.img["hidden_size"], self.use_type_embedding,
                                self.dtype)
    self.m3ae_decoder = M3aeDecoder(**{**self.decoder,
                                       "use_type_embedding": self.use_type_embedding,
                                       "dtype": self.dtype})

  def target_patches(self, images: Array) -> Array:
    """Normalised pixels cut into patches [B, N, p*p*C] (float32), MAE's target layout."""
    return vit_lib.patchify(self.img_encoder.normalize(images), self.img_encoder.patch_size)

  def __call__(self, images: Array, text: Array, paired: Array, image_noise: Array,
               text_noise: Array, *, image_mask_ratio: float, text_mask_ratio: float,
               train: bool) -> Dict[str, Array]:
    """images [B, H, W, C] 0..255, text [B, L] int (0 = padding), paired [B] (1 = the image is
    real), noise [B, N] and [B, L] fixing the masks.

    Returns {"pred": [B, N, P], "target": [B, N, p*p*C], "mask": [B, N] (1 = removed),
    "text_logits": [B, L, V], "text_mask": [B, L] (1 = masked real token)}.
    """
    text_valid = text != PAD_ID
    text_mask = text_mask_from_noise(text_noise, text, text_mask_ratio)
    text_x = masking.gather_tokens(self.text_embed(text), text_mask.keep_indices)
    encoded = self.img_encoder(images, image_noise, image_mask_ratio, paired, text_x,
                               text_mask.kept_valid, train=train)
    patch = self.img_encoder.patch_size
    grid = (images.shape[1] // patch[0], images.shape[2] // patch[1])
    target = self.target_patches(images)
    image_outputs = self.num_image_codes or target.shape[-1]
    pred, text_logits = self.m3ae_decoder(
        encoded["tokens"], 1 if self.img_encoder.use_cls_token else 0,
        encoded["image_mask"].restore_indices, grid, paired, text_mask, text_valid, image_outputs,
        text_lib.padded_vocab_rows(self.vocab_size), train=train)
    rows = jnp.arange(text_logits.shape[-1]) < self.vocab_size
    text_logits = jnp.where(rows, text_logits, jnp.finfo(jnp.float32).min)
    return {"pred": pred, "target": target, "mask": encoded["image_mask"].mask,
            "text_logits": text_logits, "text_mask": text_mask.mask}


def encoder_kwargs_from_config(img_config: Any) -> Dict[str, Any]:
  """`config.model.model_img` -> M3aeEncoder fields (a fixed sin-cos position embedding)."""
  kwargs = vit_lib.vit_kwargs_from_config(img_config)
  if not kwargs.pop("sincos"):
    raise ValueError("M3AE uses fixed sin-cos position embeddings: set "
                     "config.model.model_img.sincos=True")
  for key in ("mask_ratio", "pool", "dtype"):
    kwargs.pop(key)
  for key in vit_lib.IMPORT_VARIANT_KEYS:
    default = vit_lib.VisionTransformer.__dataclass_fields__[key].default
    if key in kwargs and kwargs.pop(key) != default:
      raise ValueError(f"config.model.model_img.{key} is not supported by M3AE's encoder "
                       f"(leave it at {default!r})")
  return layers.checked_fields(M3aeEncoder, kwargs)


def m3ae_from_config(config: Any, num_image_codes: int = 0,
                     pixel_stats: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]] = None
                     ) -> MultimodalMaskedAutoencoder:
  """The model of an M3AE config (`config.model.model_img`, `.decoder`, `.m3ae`)."""
  img = encoder_kwargs_from_config(config.model.model_img)
  if pixel_stats is not None:
    img["pixel_mean"], img["pixel_std"] = pixel_stats
  return MultimodalMaskedAutoencoder(
      img=img, decoder=mae_lib.decoder_kwargs_from_config(config.model.decoder),
      vocab_size=int(config.model.m3ae.vocab_size),
      use_type_embedding=bool(config.model.m3ae.use_type_embedding),
      num_image_codes=num_image_codes, dtype=layers.as_dtype(config.dtype))
