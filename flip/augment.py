"""Fine-tuning augmentations: RandAugment (host, tf), random erasing, mixup/cutmix, label smoothing
(device, jax). The numbers and their meanings are MAE's fine-tuning recipe, which uses timm's
implementations (`rand-m9-mstd0.5-inc1`, `reprob 0.25`, `mixup 0.8`, `cutmix 1.0`, `smoothing 0.1`).

Host side (tf ops inside the input pipeline, after the random-resized crop and flip of
`flip.data.transforms`): `rand_augment(image, seed, num_layers, magnitude, magnitude_std)`
applies `num_layers` operations drawn uniformly with replacement from `RAND_AUGMENT_OPS` (timm's
"increasing" set), each with probability 1/2, at a magnitude drawn per operation from
N(magnitude, magnitude_std) and clipped to [0, MAX_LEVEL]. Randomness is stateless (seeded per
example), so the same seed always gives the same image and the pipeline's saved state resumes
exactly. Magnitude -> argument mappings are timm's: rotate up to 30 degrees, shear up to 0.3,
translate up to 0.45 of the image side, all with a random sign; posterize keeps 4 - int(4 m/10)
bits; solarize above 256 - int(256 m/10); solarize-add adds int(110 m/10) below 128; colour,
contrast, brightness and sharpness blend factors 1 +- 0.9 m/10. Geometric operations fill with
timm's mean pixel (124, 116, 104) and interpolate bilinearly (timm: bicubic in MAE's setting; the
tf op has no bicubic mode).

Device side (jax, inside the train step, on the whole global batch, after the pixels are floats
in 0..255 units):
- `random_erasing`: per example with probability `prob`, one rectangle of area in `area_range` of
  the image and aspect ratio log-uniform in `aspect_range` (first of `attempts` draws that fits) is
  replaced by per-pixel noise that is N(0, 1) after the model's normalisation (mean + std * N(0,1)
  in pixel units: timm's mode "pixel"). Applied before mixup, as timm's per-image transform is.
- `smooth_labels`: one-hot targets with mass `smoothing` spread evenly over all classes.
- `mixup_cutmix`: timm's "batch" mode. With probability `prob` the batch is mixed with itself
  reversed (example i with example B-1-i); when both alphas are positive, cutmix is chosen with
  probability `switch_prob`, else mixup. Mixup: lambda ~ Beta(a, a), x = lambda x + (1 - lambda)
  x_reversed. Cutmix: lambda ~ Beta(a, a), a box of side fraction sqrt(1 - lambda) centred
  uniformly (clipped at the border) is pasted from the reversed batch and lambda is corrected to
  the kept area. Targets are mixed with the same lambda, so every row still sums to one.
"""

import dataclasses
import math
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import tensorflow as tf

Array = jax.Array

# --- RandAugment (timm's `rand_augment_transform`, "increasing" op set) ----------------------------
MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitudes live in [0, 10]
OP_PROBABILITY = 0.5  # timm: each chosen op is applied with probability 0.5
FILL_RGB = (124, 116, 104)  # timm's _FILL / img_mean for geometric ops
ROTATE_MAX_DEGREES = 30.0
SHEAR_MAX = 0.3
TRANSLATE_MAX_FRACTION = 0.45
POSTERIZE_MAX_BITS = 4
SOLARIZE_LEVELS = 256
SOLARIZE_ADD_MAX = 110
SOLARIZE_ADD_THRESHOLD = 128
ENHANCE_MAX_DELTA = 0.9
# PIL's grey conversion (ITU-R 601-2 luma) and ImageFilter.SMOOTH kernel (centre 5, sum 13).
LUMA_RGB = (0.299, 0.587, 0.114)
SMOOTH_CENTER_WEIGHT = 5.0
SMOOTH_KERNEL_SUM = 13.0
PIXEL_MAX = 255.0

RAND_AUGMENT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                    "TranslateXRel", "TranslateYRel")

# --- random erasing and mixup (timm's defaults in MAE's fine-tuning) ----------------------------
ERASE_AREA_RANGE = (0.02, 1.0 / 3.0)  # timm RandomErasing min_area, max_area
ERASE_ASPECT_RANGE = (0.3, 1.0 / 0.3)  # timm: min_aspect 0.3, max_aspect 1 / min_aspect
ERASE_ATTEMPTS = 10  # timm: tries per image before giving up


def _blend(image: tf.Tensor, degenerate: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped, float32."""
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, PIXEL_MAX)


def _grey(image: tf.Tensor) -> tf.Tensor:
  return tf.reduce_sum(image * tf.constant(LUMA_RGB, tf.float32), axis=-1, keepdims=True)


def _autocontrast(image: tf.Tensor) -> tf.Tensor:
  lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
  scale = PIXEL_MAX / tf.maximum(hi - lo, 1.0)
  stretched = tf.clip_by_value(tf.floor((image - lo) * scale), 0.0, PIXEL_MAX)
  return tf.where(hi > lo, stretched, image)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  """PIL ImageOps.equalize on one uint8-valued float channel [H, W]."""
  values = tf.cast(channel, tf.int32)
  hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
  nonzero = tf.boolean_mask(hist, hist > 0)
  step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
  safe_step = tf.maximum(step, 1)
  lut = (tf.cumsum(hist, exclusive=True) + safe_step // 2) // safe_step
  lut = tf.cast(tf.minimum(lut, 255), tf.float32)
  return tf.where(step > 0, tf.gather(lut, values), channel)


def _equalize(image: tf.Tensor) -> tf.Tensor:
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def _posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
  shift = tf.cast(8 - bits, tf.int32)
  values = tf.cast(image, tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(values, shift), shift), tf.float32)


def _sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  kernel = tf.ones([3, 3], tf.float32)
  kernel = tf.tensor_scatter_nd_update(kernel, [[1, 1]], [SMOOTH_CENTER_WEIGHT]) / SMOOTH_KERNEL_SUM
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.round(smooth)
  # PIL leaves the one-pixel border unfiltered.
  degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]) + 0.0
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  interior = tf.pad(tf.ones([height - 2, width - 2, 3]), [[1, 1], [1, 1], [0, 0]])
  degenerate = interior * degenerate + (1.0 - interior) * image
  return _blend(image, degenerate, factor)


def _affine(image: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
  """Output pixel (x, y) samples the input at matrix @ (x, y, 1); outside: the fill colour."""
  transform = tf.concat([tf.reshape(matrix, [6]), tf.zeros([2])], axis=0)[None]
  shape = tf.shape(image)[:2]
  fill = tf.constant(FILL_RGB, tf.float32)
  # Shift so the fill colour is 0 for the op's constant fill, then shift back.
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=(image - fill)[None], transforms=transform, output_shape=shape, fill_value=0.0,
      interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  return tf.clip_by_value(tf.round(out + fill), 0.0, PIXEL_MAX)


def _rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
  theta = degrees * (math.pi / 180.0)
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
  cos, sin = tf.cos(theta), tf.sin(theta)
  matrix = tf.stack([cos, -sin, cx - cos * cx + sin * cy,
                     sin, cos, cy - sin * cx - cos * cy])
  return _affine(image, matrix)


def _shear(image: tf.Tensor, amount: tf.Tensor, horizontal: bool) -> tf.Tensor:
  zero, one = tf.constant(0.0), tf.constant(1.0)
  if horizontal:
    matrix = tf.stack([one, amount, zero, zero, one, zero])
  else:
    matrix = tf.stack([one, zero, zero, amount, one, zero])
  return _affine(image, matrix)


def _translate(image: tf.Tensor, fraction: tf.Tensor, horizontal: bool) -> tf.Tensor:
  zero, one = tf.constant(0.0), tf.constant(1.0)
  size = tf.cast(tf.shape(image)[1 if horizontal else 0], tf.float32)
  pixels = fraction * size
  if horizontal:
    matrix = tf.stack([one, zero, pixels, zero, one, zero])
  else:
    matrix = tf.stack([one, zero, zero, zero, one, pixels])
  return _affine(image, matrix)


def apply_op(name: str, image: tf.Tensor, level: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
  """One RandAugment op on a float32 [H, W, 3] image in 0..255; level in [0, MAX_LEVEL]."""
  fraction = level / MAX_LEVEL
  enhance = 1.0 + ENHANCE_MAX_DELTA * fraction * sign
  if name == "AutoContrast":
    return _autocontrast(image)
  if name == "Equalize":
    return _equalize(image)
  if name == "Invert":
    return PIXEL_MAX - image
  if name == "Rotate":
    return _rotate(image, ROTATE_MAX_DEGREES * fraction * sign)
  if name == "PosterizeIncreasing":
    bits = POSTERIZE_MAX_BITS - tf.cast(tf.floor(fraction * POSTERIZE_MAX_BITS), tf.int32)
    return _posterize(image, bits)
  if name == "SolarizeIncreasing":
    threshold = SOLARIZE_LEVELS - tf.floor(fraction * SOLARIZE_LEVELS)
    return tf.where(image >= threshold, PIXEL_MAX - image, image)
  if name == "SolarizeAdd":
    added = tf.minimum(image + tf.floor(fraction * SOLARIZE_ADD_MAX), PIXEL_MAX)
    return tf.where(image < SOLARIZE_ADD_THRESHOLD, added, image)
  if name == "ColorIncreasing":
    return _blend(image, tf.round(_grey(image)) + tf.zeros_like(image), enhance)
  if name == "ContrastIncreasing":
    mean = tf.round(tf.reduce_mean(tf.round(_grey(image))))
    return _blend(image, mean + tf.zeros_like(image), enhance)
  if name == "BrightnessIncreasing":
    return _blend(image, tf.zeros_like(image), enhance)
  if name == "SharpnessIncreasing":
    return _sharpness(image, enhance)
  if name in ("ShearX", "ShearY"):
    return _shear(image, SHEAR_MAX * fraction * sign, horizontal=name == "ShearX")
  if name in ("TranslateXRel", "TranslateYRel"):
    return _translate(image, TRANSLATE_MAX_FRACTION * fraction * sign,
                      horizontal=name == "TranslateXRel")
  raise ValueError(f"unknown RandAugment op {name!r}; known: {RAND_AUGMENT_OPS}")


def rand_augment(image: tf.Tensor, seed: tf.Tensor, num_layers: int, magnitude: float,
                 magnitude_std: float, ops: Sequence[str] = RAND_AUGMENT_OPS) -> tf.Tensor:
  """RandAugment on a uint8 [H, W, 3] image with a stateless int [2] seed; uint8 result."""
  image = tf.cast(image, tf.float32)
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=num_layers)
  identity = len(ops)
  for layer in range(num_layers):
    draws = tf.random.stateless_uniform([3], seeds[layer], dtype=tf.float32)
    noise = tf.random.stateless_normal([], seeds[layer] + 1, dtype=tf.float32)
    op_index = tf.minimum(tf.cast(draws[0] * len(ops), tf.int32), len(ops) - 1)
    op_index = tf.where(draws[1] < OP_PROBABILITY, op_index, identity)
    level = tf.clip_by_value(magnitude + magnitude_std * noise, 0.0, MAX_LEVEL)
    sign = tf.where(draws[2] < 0.5, -1.0, 1.0)
    branches = [(lambda name=name: apply_op(name, image, level, sign)) for name in ops]
    branches.append(lambda: image)
    image = tf.switch_case(op_index, branches)
    image.set_shape([None, None, 3])
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, PIXEL_MAX), tf.uint8)


# --- device side --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MixSettings:
  """`config.aug.mixup`: alphas (0 = off), probability of mixing a batch, cutmix share."""
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  prob: float = 1.0
  switch_prob: float = 0.5

  @property
  def enabled(self) -> bool:
    return self.prob > 0.0 and (self.mixup_alpha > 0.0 or self.cutmix_alpha > 0.0)


def smooth_labels(labels: Array, num_classes: int, smoothing: float) -> Array:
  """int [B] -> float32 [B, C]: 1 - smoothing + smoothing / C on the label, smoothing / C elsewhere."""
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return one_hot * (1.0 - smoothing) + smoothing / num_classes


def cutmix_box(rng: Array, height: int, width: int, lam: Array) -> Tuple[Array, Array, Array,
                                                                         Array]:
  """(top, bottom, left, right) of a box of side fraction sqrt(1 - lam), centre uniform, clipped."""
  cut = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * cut).astype(jnp.int32)
  cut_w = jnp.floor(width * cut).astype(jnp.int32)
  rng_y, rng_x = jax.random.split(rng)
  cy = jax.random.randint(rng_y, (), 0, height)
  cx = jax.random.randint(rng_x, (), 0, width)
  top = jnp.clip(cy - cut_h // 2, 0, height)
  bottom = jnp.clip(cy + cut_h // 2, 0, height)
  left = jnp.clip(cx - cut_w // 2, 0, width)
  right = jnp.clip(cx + cut_w // 2, 0, width)
  return top, bottom, left, right


def mixup_cutmix(rng: Array, images: Array, targets: Array,
                 settings: MixSettings) -> Tuple[Array, Array, Array]:
  """Mixes a batch with its reverse (timm's batch mode); returns (images, targets, lambda).

  images: float [B, H, W, C]; targets: float [B, C] (rows summing to one).
  """
  if not settings.enabled:
    return images, targets, jnp.ones((), jnp.float32)
  rng_apply, rng_switch, rng_mix, rng_cut, rng_box = jax.random.split(rng, 5)
  _, height, width, _ = images.shape
  apply = jax.random.uniform(rng_apply) < settings.prob
  if settings.mixup_alpha > 0.0 and settings.cutmix_alpha > 0.0:
    use_cutmix = jax.random.uniform(rng_switch) < settings.switch_prob
  else:
    use_cutmix = jnp.asarray(settings.cutmix_alpha > 0.0)
  # An alpha of 0 turns its method off (use_cutmix above never picks it); Beta(1, 1) stands in.
  mix_alpha = settings.mixup_alpha if settings.mixup_alpha > 0.0 else 1.0
  cut_alpha = settings.cutmix_alpha if settings.cutmix_alpha > 0.0 else 1.0
  lam_mix = jax.random.beta(rng_mix, mix_alpha, mix_alpha)
  lam_cut = jax.random.beta(rng_cut, cut_alpha, cut_alpha)
  top, bottom, left, right = cutmix_box(rng_box, height, width, lam_cut)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  in_box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  lam_cut = 1.0 - (bottom - top) * (right - left) / (height * width)

  reversed_images = images[::-1]
  mixed = lam_mix * images + (1.0 - lam_mix) * reversed_images
  pasted = jnp.where(in_box[None, :, :, None], reversed_images, images)
  lam = jnp.where(use_cutmix, lam_cut, lam_mix).astype(jnp.float32)
  lam = jnp.where(apply, lam, 1.0)
  out_images = jnp.where(apply, jnp.where(use_cutmix, pasted, mixed), images)
  out_targets = lam * targets + (1.0 - lam) * targets[::-1]
  return out_images.astype(images.dtype), out_targets, lam


def random_erasing(rng: Array, images: Array, prob: float, pixel_mean: Sequence[float],
                   pixel_std: Sequence[float], area_range: Tuple[float, float] = ERASE_AREA_RANGE,
                   aspect_range: Tuple[float, float] = ERASE_ASPECT_RANGE,
                   attempts: int = ERASE_ATTEMPTS) -> Array:
  """Per example, with probability `prob`, one rectangle of normalised-N(0,1) noise (see above).

  images: float [B, H, W, C] in pixel units (0..255); mean/std per channel in the same units.
  """
  if prob <= 0.0:
    return images
  batch, height, width, channels = images.shape
  rng_apply, rng_area, rng_aspect, rng_pos, rng_fill = jax.random.split(rng, 5)
  area = jax.random.uniform(rng_area, (batch, attempts), minval=area_range[0],
                            maxval=area_range[1]) * (height * width)
  log_aspect = jax.random.uniform(rng_aspect, (batch, attempts),
                                  minval=math.log(aspect_range[0]),
                                  maxval=math.log(aspect_range[1]))
  aspect = jnp.exp(log_aspect)
  box_h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  box_w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (box_h < height) & (box_w < width)
  first = jnp.argmax(fits, axis=1)
  pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]
  box_h, box_w = pick(box_h), pick(box_w)
  apply = (jax.random.uniform(rng_apply, (batch,)) < prob) & jnp.any(fits, axis=1)
  pos = jax.random.uniform(rng_pos, (batch, 2))
  top = jnp.floor(pos[:, 0] * (height - box_h + 1)).astype(jnp.int32)
  left = jnp.floor(pos[:, 1] * (width - box_w + 1)).astype(jnp.int32)
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  inside = ((rows >= top[:, None, None]) & (rows < (top + box_h)[:, None, None]) &
            (cols >= left[:, None, None]) & (cols < (left + box_w)[:, None, None]))
  inside = inside & apply[:, None, None]
  mean = jnp.asarray(pixel_mean, jnp.float32)
  std = jnp.asarray(pixel_std, jnp.float32)
  fill = mean + std * jax.random.normal(rng_fill, (batch, height, width, channels), jnp.float32)
  return jnp.where(inside[..., None], fill.astype(images.dtype), images)
