"""Tests for flip.data.transforms: decoding grey/RGBA/PNG/odd sizes against PIL, the random-resized
crop box and its pixels, flips, the evaluation crop geometry, normalisation against numpy."""

import io

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from flip.data import transforms

AREA_RANGE = (0.5, 1.0)
ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)


def make_config(image_size=16, flip=True):
  return ml_collections.ConfigDict(dict(
      image_size=image_size,
      aug=dict(area_range=AREA_RANGE, aspect_ratio_range=ASPECT_RANGE, flip=flip)))


def encode(array, fmt, **kwargs):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, fmt, **kwargs)
  return buffer.getvalue()


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  return {
      "rgb": rng.integers(0, 256, (37, 53, 3), dtype=np.uint8),
      "grey": rng.integers(0, 256, (17, 9), dtype=np.uint8),
      "rgba": rng.integers(0, 256, (20, 31, 4), dtype=np.uint8),
      "tall": rng.integers(0, 256, (101, 7, 3), dtype=np.uint8),
  }


def test_decode_png_exact_for_rgb_grey_rgba(images):
  rgb, grey, rgba = images["rgb"], images["grey"], images["rgba"]
  assert np.array_equal(transforms.decode_image(encode(rgb, "PNG")).numpy(), rgb)
  assert np.array_equal(transforms.decode_image(encode(grey, "PNG")).numpy(),
                        np.repeat(grey[..., None], 3, axis=-1))
  assert np.array_equal(transforms.decode_image(encode(rgba, "PNG")).numpy(), rgba[..., :3])


def test_decode_jpeg_matches_pil(images):
  for key in ("rgb", "grey", "tall"):
    data = encode(images[key], "JPEG", quality=95)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int32)
    decoded = transforms.decode_image(data).numpy().astype(np.int32)
    assert decoded.shape == reference.shape
    assert np.abs(decoded - reference).mean() < 2.0  # two libjpeg builds; IDCTs may differ by 1


def test_decode_rejects_corrupt_bytes(images):
  truncated = encode(images["rgb"], "PNG")[:60]
  for bad in (b"", b"not an image", truncated):
    with pytest.raises(tf.errors.InvalidArgumentError):
      transforms.decode_image(bad)


def test_crop_box_within_configured_ranges():
  shape = tf.constant([300, 200, 3])
  areas, aspects = [], []
  for seed in range(200):
    offset, size = transforms.sample_crop_box(shape, tf.constant([seed, 1]), AREA_RANGE,
                                              ASPECT_RANGE)
    (y, x), (h, w) = offset.numpy(), size.numpy()
    assert 0 <= y and y + h <= 300 and 0 <= x and x + w <= 200
    areas.append(h * w / (300 * 200))
    aspects.append(w / h)
  # Pixel rounding of the box moves the ratios by at most a pixel's worth.
  assert min(areas) >= AREA_RANGE[0] - 0.01 and max(areas) <= AREA_RANGE[1]
  assert min(aspects) >= ASPECT_RANGE[0] - 0.02 and max(aspects) <= ASPECT_RANGE[1] + 0.02
  assert max(areas) - min(areas) > 0.3  # the range is really sampled


def test_random_crop_pixels_are_the_box_of_the_image(images):
  rgb = images["rgb"]
  png, jpeg = encode(rgb, "PNG"), encode(rgb, "JPEG", quality=95)
  decoded_jpeg = transforms.decode_image(jpeg).numpy().astype(np.int32)
  for seed in range(8):
    seed_t = tf.constant([seed, 3])
    offset, size = transforms.sample_crop_box(tf.constant(rgb.shape), seed_t, AREA_RANGE,
                                              ASPECT_RANGE)
    (y, x), (h, w) = offset.numpy(), size.numpy()
    crop = transforms.random_crop(png, seed_t, AREA_RANGE, ASPECT_RANGE).numpy()
    assert np.array_equal(crop, rgb[y:y + h, x:x + w])  # generic path: exact
    jpeg_crop = transforms.random_crop(jpeg, seed_t, AREA_RANGE, ASPECT_RANGE).numpy()
    # JPEG path decodes only the window; chroma upsampling at its border may differ slightly.
    assert jpeg_crop.shape == (h, w, 3)
    assert np.abs(jpeg_crop.astype(np.int32) - decoded_jpeg[y:y + h, x:x + w]).mean() < 4.0


def test_train_transform_shapes_determinism_and_flip(images):
  config = make_config(image_size=16, flip=True)
  no_flip = make_config(image_size=16, flip=False)
  for key in ("rgb", "grey", "rgba", "tall"):
    for fmt in ("PNG", "JPEG"):
      if key == "rgba" and fmt == "JPEG":
        continue
      data = encode(images[key], fmt)
      out = transforms.train_transform(data, tf.constant([1, 2]), config)
      assert out.dtype == tf.uint8 and out.shape == (16, 16, 3)
      again = transforms.train_transform(data, tf.constant([1, 2]), config)
      assert np.array_equal(out.numpy(), again.numpy())
  data = encode(images["rgb"], "PNG")
  flipped = 0
  for seed in range(16):
    seed_t = tf.constant([seed, 9])
    a = transforms.train_transform(data, seed_t, config).numpy()
    b = transforms.train_transform(data, seed_t, no_flip).numpy()
    if np.array_equal(a, b[:, ::-1]) and not np.array_equal(a, b):
      flipped += 1
    else:
      assert np.array_equal(a, b)
  assert 0 < flipped < 16


def test_train_transform_resizes_the_crop(images):
  rgb = images["rgb"]
  config = make_config(image_size=24, flip=False)
  seed = tf.constant([5, 5])
  crop_seed = tf.random.experimental.stateless_split(seed, num=2)[0]
  offset, size = transforms.sample_crop_box(tf.constant(rgb.shape), crop_seed, AREA_RANGE,
                                            ASPECT_RANGE)
  (y, x), (h, w) = offset.numpy(), size.numpy()
  expected = tf.image.resize(rgb[y:y + h, x:x + w].astype(np.float32), (24, 24), method="bicubic",
                             antialias=True).numpy()
  expected = np.clip(np.round(expected), 0, 255).astype(np.uint8)
  out = transforms.train_transform(encode(rgb, "PNG"), seed, config).numpy()
  assert np.array_equal(out, expected)


def test_eval_transform_geometry(images):
  # 37 x 74 with image_size 32: the shorter side is already round(32 / 0.875) = 37, so the resize is
  # the identity and the result is the exact centre crop.
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (37, 74, 3), dtype=np.uint8)
  assert transforms.eval_resize_size(32) == 37 and transforms.eval_resize_size(224) == 256
  out = transforms.eval_transform(encode(image, "PNG"), 32).numpy()
  top, left = (37 - 32) // 2, (74 - 32) // 2
  assert np.array_equal(out, image[top:top + 32, left:left + 32])
  # Any size and channel count gives [S, S, 3]; a constant image stays constant.
  for key in ("grey", "rgba", "tall"):
    assert transforms.eval_transform(encode(images[key], "PNG"), 32).shape == (32, 32, 3)
  flat = np.full((50, 20, 3), 77, np.uint8)
  assert (transforms.eval_transform(encode(flat, "PNG"), 32).numpy() == 77).all()


def test_normalize_images_matches_numpy():
  rng = np.random.default_rng(2)
  batch = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  expected = (batch.astype(np.float64) - np.array([0.485, 0.456, 0.406]) * 255) / (
      np.array([0.229, 0.224, 0.225]) * 255)
  got = np.asarray(transforms.normalize_images(jnp.asarray(batch)))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
