"""Image transforms: decoding, FLIP's training augmentation, the evaluation crop, normalisation.

This module owns every pixel operation between encoded image bytes and the model input:

* `decode_image(bytes)`: JPEG, PNG (and the other formats `tf.io.decode_image` reads: GIF's first
  frame, BMP, WebP) of any size to uint8 [H, W, 3]; grey is replicated to RGB, an alpha channel
  is dropped (not composited).
* `train_transform(bytes, seed, config)`: random-resized crop (`config.aug.area_range`, area as a
  fraction of the image, and `config.aug.aspect_ratio_range`, width / height of the crop), resize
  to `config.image_size`, random horizontal flip when `config.aug.flip`. Randomness is stateless:
  the same (bytes, seed) always gives the same pixels, which the exact-resume contract of the
  input pipeline relies on. JPEGs are decoded only inside the crop window
  (`tf.image.decode_and_crop_jpeg`), other formats are decoded whole and then cropped.
* `eval_transform(bytes, image_size)`: resize the shorter side to image_size / EVAL_CROP_FRACTION
  (224 -> 256), then a central image_size crop.
* `normalize_images(images_uint8, mean, std)`: jax.numpy, for the device. Host-side images stay
  uint8 (4x less host memory and host-to-device traffic than float32).

Decisions where the design docs are silent:
* The crop box is sampled like Inception / FLIP's TF pipeline (`sample_distorted_bounding_box`,
  aspect ratio uniform in the range, CROP_MAX_ATTEMPTS tries); when no box fits, the whole image
  is used (then squashed to a square), which is TF's fall-back.
* Resizing is bicubic (FLIP and MAE's TF pipelines) with antialiasing on, so large LAION images
  are not aliased when shrunk; results are rounded and clipped back to uint8.
"""

from typing import Sequence, Tuple

import jax.numpy as jnp
import ml_collections
import tensorflow as tf

# ImageNet channel statistics in 0..255 units (the torchvision / MAE / FLIP values
# (0.485, 0.456, 0.406) and (0.229, 0.224, 0.225) times 255).
IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)

# Evaluation: centre crop / resized shorter side (the ImageNet convention 224 / 256).
EVAL_CROP_FRACTION = 0.875
# Attempts at a crop box inside the area / aspect ranges before using the whole image (Inception).
CROP_MAX_ATTEMPTS = 10
RESIZE_METHOD = tf.image.ResizeMethod.BICUBIC
RESIZE_ANTIALIAS = True
RGB_CHANNELS = 3
UINT8_MAX = 255.0


def decode_image(image_bytes: tf.Tensor) -> tf.Tensor:
  """Decodes encoded image bytes to uint8 [H, W, 3]; raises InvalidArgumentError when corrupt."""
  image = tf.io.decode_image(image_bytes, channels=RGB_CHANNELS, dtype=tf.uint8,
                             expand_animations=False)
  image.set_shape([None, None, RGB_CHANNELS])
  return image


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, UINT8_MAX), tf.uint8)


def _resize(image: tf.Tensor, size: Tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
  return tf.image.resize(image, size, method=RESIZE_METHOD, antialias=RESIZE_ANTIALIAS)


def sample_crop_box(image_shape: tf.Tensor, seed: tf.Tensor, area_range: Sequence[float],
                    aspect_ratio_range: Sequence[float]) -> Tuple[tf.Tensor, tf.Tensor]:
  """(offset [y, x], size [h, w]) of a random crop of an image of shape [H, W, C]."""
  whole_image = tf.constant([[[0.0, 0.0, 1.0, 1.0]]], tf.float32)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.cast(image_shape, tf.int32), bounding_boxes=whole_image, seed=seed,
      min_object_covered=0.0, aspect_ratio_range=tuple(aspect_ratio_range),
      area_range=tuple(area_range), max_attempts=CROP_MAX_ATTEMPTS,
      use_image_if_no_bounding_boxes=True)
  return begin[:2], size[:2]


def random_crop(image_bytes: tf.Tensor, seed: tf.Tensor, area_range: Sequence[float],
                aspect_ratio_range: Sequence[float]) -> tf.Tensor:
  """Decodes a random-resized-crop window of the image (before the resize): uint8 [h, w, 3]."""

  def jpeg_crop():
    offset, size = sample_crop_box(tf.image.extract_jpeg_shape(image_bytes), seed, area_range,
                                   aspect_ratio_range)
    window = tf.concat([offset, size], axis=0)
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=RGB_CHANNELS)

  def generic_crop():
    image = decode_image(image_bytes)
    offset, size = sample_crop_box(tf.shape(image), seed, area_range, aspect_ratio_range)
    return tf.slice(image, tf.concat([offset, [0]], 0), tf.concat([size, [RGB_CHANNELS]], 0))

  crop = tf.cond(tf.io.is_jpeg(image_bytes), jpeg_crop, generic_crop)
  crop.set_shape([None, None, RGB_CHANNELS])
  return crop


def train_transform(image_bytes: tf.Tensor, seed: tf.Tensor,
                    config: ml_collections.ConfigDict) -> tf.Tensor:
  """FLIP's training augmentation: uint8 [S, S, 3] with S = config.image_size.

  Args:
    image_bytes: scalar string tensor with an encoded image.
    seed: int32/int64 [2] stateless seed; equal seeds give equal crops and flips.
    config: the experiment config (uses image_size, aug.area_range, aug.aspect_ratio_range,
      aug.flip).
  """
  size = int(config.image_size)
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  crop = random_crop(image_bytes, crop_seed, config.aug.area_range,
                     config.aug.aspect_ratio_range)
  image = _to_uint8(_resize(crop, (size, size)))
  if config.aug.flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  image.set_shape([size, size, RGB_CHANNELS])
  return image


def eval_resize_size(image_size: int, crop_fraction: float = EVAL_CROP_FRACTION) -> int:
  """Shorter-side length before the evaluation centre crop (224 -> 256)."""
  return int(round(image_size / crop_fraction))


def resize_shorter_side(image: tf.Tensor, target: int) -> tf.Tensor:
  """Resizes so that min(H, W) == target, keeping the aspect ratio; float32 result."""
  shape = tf.cast(tf.shape(image)[:2], tf.float64)
  scale = tf.cast(target, tf.float64) / tf.reduce_min(shape)
  new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), target)
  return _resize(image, new_shape)


def eval_transform(image_bytes: tf.Tensor, image_size: int,
                   crop_fraction: float = EVAL_CROP_FRACTION) -> tf.Tensor:
  """Evaluation transform: shorter side to image_size / crop_fraction, centre crop; uint8 [S,S,3].
  """
  image = resize_shorter_side(decode_image(image_bytes),
                              eval_resize_size(image_size, crop_fraction))
  shape = tf.shape(image)
  top = (shape[0] - image_size) // 2
  left = (shape[1] - image_size) // 2
  image = _to_uint8(image[top:top + image_size, left:left + image_size])
  image.set_shape([image_size, image_size, RGB_CHANNELS])
  return image


def normalize_images(images: jnp.ndarray, mean: Sequence[float] = IMAGENET_MEAN_RGB,
                     std: Sequence[float] = IMAGENET_STD_RGB,
                     dtype: jnp.dtype = jnp.float32) -> jnp.ndarray:
  """(images - mean) / std over the last (RGB) axis, for uint8 [..., 3] images in 0..255 units."""
  mean = jnp.asarray(mean, dtype)
  std = jnp.asarray(std, dtype)
  return (images.astype(dtype) - mean) / std
