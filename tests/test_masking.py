"""Tests for flip.masking and the ViT's patch dropping (flip.models.vit).

References are independent: kept counts from exact fractions, keep sets from numpy's argsort of
the same noise, gathered tokens from a float64 numpy patch embedding (explicit per-patch slices of
the image) plus a float64 sin-cos table, and the unmasked path from a second code path (an identity
permutation through the masked path) and from the jaxpr (no gather, no sort).
"""

import fractions
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flip import masking
from flip.models import layers
from flip.models import vit as vit_lib

IMAGE_SIZE = 16
PATCH = 4
GRID = IMAGE_SIZE // PATCH
NUM_PATCHES = GRID * GRID
WIDTH = 32
PARAM_STDDEV = 0.1
SINCOS_TEMPERATURE = 10000.0  # the Transformer/MAE/FLIP sin-cos base
# ImageNet channel statistics (torchvision/MAE/FLIP), in 0..255 pixel units.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float64) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float64) * 255
# Tests compile small models without LLVM's optimisation passes: compiling, not running, is what
# costs time on a 2-core machine; every compared computation is compiled the same way.
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}


random_token_mask = jax.jit(masking.random_token_mask, static_argnums=(1, 2, 3))
token_mask_from_noise = jax.jit(masking.token_mask_from_noise, static_argnums=(1,))


def tiny_vit(**overrides):
  fields = dict(patch_size=(PATCH, PATCH), hidden_size=WIDTH, num_layers=1, num_heads=2,
                mlp_dim=64)
  fields.update(overrides)
  return vit_lib.VisionTransformer(**fields)


def random_images(seed, batch):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, size=(batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)


def distinct_noise(seed, batch, num_tokens):
  """Uniform noise without ties, so argsort is unambiguous for the numpy reference."""
  rng = np.random.default_rng(seed)
  return np.stack([rng.permutation(num_tokens) for _ in range(batch)]).astype(np.float32) / (
      num_tokens + 1)


def init_vit(model, images):
  """Random variables of the right shapes (numpy draws: no compiled initialisers, fast)."""
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False,
                                               mask_ratio=0.0), images)
  rng = np.random.default_rng(0)

  def draw(path, shape):
    values = rng.normal(scale=PARAM_STDDEV, size=shape.shape)
    if path[-1].key == "scale":  # LayerNorm scales around one
      values += 1.0
    return jnp.asarray(values, shape.dtype)

  return {"params": jax.tree_util.tree_map_with_path(draw, shapes["params"])}


_COMPILED = {}


def apply_capturing_encoder_input(model, variables, images, mask_ratio=None, mask_noise=None,
                                  train=False, rngs=None):
  """Runs the ViT (compiled once per model, mode and shapes) and returns (outputs, the token
  sequence that enters the transformer)."""

  def forward(variables, images, mask_noise, rngs):
    captured = {}

    def interceptor(next_fun, args, call_kwargs, context):
      if isinstance(context.module, layers.Encoder) and context.method_name == "__call__":
        captured["tokens"] = args[0]
      return next_fun(*args, **call_kwargs)

    with nn.intercept_methods(interceptor):
      outputs = model.apply(variables, images, train=train, mask_ratio=mask_ratio,
                            mask_noise=mask_noise, rngs=rngs)
    return outputs, captured["tokens"]

  args = (variables, images, mask_noise, rngs)
  leaves, structure = jax.tree.flatten(args)
  key = (model, mask_ratio, train, structure,
         tuple((np.shape(x), np.result_type(x)) for x in leaves))
  if key not in _COMPILED:
    _COMPILED[key] = jax.jit(forward).lower(*args).compile(FAST_COMPILE_OPTIONS)
  return _COMPILED[key](*args)


def apply_vit(model, variables, images, **kwargs):
  return apply_capturing_encoder_input(model, variables, images, **kwargs)[0]


def numpy_sincos_2d(grid_h, grid_w, width):
  """float64 2-D sin-cos table, FLIP/MAE layout: [sin(x), cos(x), sin(y), cos(y)], x = column."""
  quarter = width // 4
  omega = 1.0 / SINCOS_TEMPERATURE ** (np.arange(quarter, dtype=np.float64) / quarter)
  table = np.zeros((grid_h * grid_w, width), np.float64)
  for row in range(grid_h):
    for col in range(grid_w):
      x, y = col * omega, row * omega
      table[row * grid_w + col] = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)])
  return table


def numpy_patch_tokens(params, images, model):
  """float64 conv-style patch embedding, patch by patch, plus the position table: [B, N, D]."""
  kernel = np.asarray(params["embedding"]["kernel"], np.float64)  # [ph, pw, C, D]
  bias = np.asarray(params["embedding"]["bias"], np.float64)
  pixels = (images.astype(np.float64) - IMAGENET_MEAN) / IMAGENET_STD
  batch = images.shape[0]
  tokens = np.zeros((batch, NUM_PATCHES, WIDTH), np.float64)
  for b in range(batch):
    for row in range(GRID):
      for col in range(GRID):
        patch = pixels[b, row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH, :]
        tokens[b, row * GRID + col] = np.einsum("hwc,hwcd->d", patch, kernel) + bias
  if model.sincos:
    table = numpy_sincos_2d(GRID, GRID, WIDTH)
  else:
    table = np.asarray(params["pos_embedding"], np.float64)[0]
  return tokens + table[None]


def primitive_names(jaxpr_text):
  return set(re.findall(r"\b([a-z_]+)\[", jaxpr_text)) | set(
      re.findall(r"=\s*([a-z_]+)\s", jaxpr_text))


# --- kept counts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens,ratio", [
    (196, 0.5), (196, 0.75), (256, 0.5), (256, 0.75), (49, 0.5), (10, 0.75), (10, 0.25),
    (15, 0.9), (25, 0.34), (50, 0.55), (7, 0.9), (3, 0.99), (16, 0.0), (64, 0.6)])
def test_num_kept_is_round_half_up_of_the_decimal_ratio(num_tokens, ratio):
  exact = num_tokens * (1 - fractions.Fraction(str(ratio)))
  expected = max(1, math.floor(exact + fractions.Fraction(1, 2)))
  assert masking.num_kept(num_tokens, ratio) == expected


def test_num_kept_hand_computed_cases():
  assert masking.num_kept(196, 0.75) == 49  # ViT-L/16 at FLIP's 75 %
  assert masking.num_kept(256, 0.5) == 128  # ViT-H/14 at FLIP's 50 %
  assert masking.num_kept(49, 0.5) == 25  # 24.5 rounds up
  assert masking.num_kept(15, 0.9) == 2  # 1.5 rounds up (1 - 0.9 is 0.0999... in binary)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_num_kept_refuses_ratios_outside_unit_interval(ratio):
  with pytest.raises(ValueError, match="mask_ratio"):
    masking.num_kept(16, ratio)


@pytest.mark.parametrize("num_tokens,ratio", [(16, 0.5), (196, 0.75), (49, 0.5), (15, 0.9)])
def test_random_mask_keeps_num_kept_distinct_tokens(num_tokens, ratio):
  batch = 6
  mask = random_token_mask(jax.random.PRNGKey(3), batch, num_tokens, ratio)
  kept = masking.num_kept(num_tokens, ratio)
  keep = np.asarray(mask.keep_indices)
  assert keep.shape == (batch, kept)
  assert np.asarray(mask.mask).shape == (batch, num_tokens)
  for row in range(batch):
    assert len(set(keep[row])) == kept
    expected_mask = np.ones(num_tokens, np.float32)
    expected_mask[keep[row]] = 0.0
    np.testing.assert_array_equal(np.asarray(mask.mask)[row], expected_mask)
    # restore undoes the shuffle: shuffled[restore] is the identity.
    shuffle = np.asarray(mask.restore_indices)[row].argsort()
    np.testing.assert_array_equal(shuffle[:kept], keep[row])
    np.testing.assert_array_equal(shuffle[np.asarray(mask.restore_indices)[row]],
                                  np.arange(num_tokens))


def test_token_mask_from_noise_keeps_the_smallest_noise_in_noise_order():
  noise = distinct_noise(0, 5, 20)
  mask = masking.token_mask_from_noise(jnp.asarray(noise), 0.75)
  expected = np.argsort(noise, axis=1, kind="stable")[:, :5]
  np.testing.assert_array_equal(np.asarray(mask.keep_indices), expected)


def test_masks_differ_across_the_examples_of_a_batch():
  mask = random_token_mask(jax.random.PRNGKey(0), 8, 16, 0.5)
  keep_sets = {frozenset(row.tolist()) for row in np.asarray(mask.keep_indices)}
  assert len(keep_sets) == 8


def test_masks_are_uniform_over_positions():
  batch, num_tokens, ratio = 20000, 16, 0.75
  mask = random_token_mask(jax.random.PRNGKey(7), batch, num_tokens, ratio)
  kept_frequency = 1.0 - np.asarray(mask.mask).mean(axis=0)
  # Binomial standard error sqrt(0.25 * 0.75 / 20000) ~= 0.003; allow five of them.
  np.testing.assert_allclose(kept_frequency, 0.25, atol=0.015)


def test_masks_from_noise_do_not_depend_on_the_batch_split():
  noise = jnp.asarray(distinct_noise(1, 12, 49))
  full = token_mask_from_noise(noise, 0.75)
  parts = [token_mask_from_noise(noise[start:start + 4], 0.75) for start in (0, 4, 8)]
  for field in masking.TokenMask._fields:
    np.testing.assert_array_equal(np.asarray(getattr(full, field)),
                                  np.concatenate([np.asarray(getattr(p, field)) for p in parts]))


def test_gather_tokens_against_numpy_indexing():
  x = np.random.default_rng(0).normal(size=(3, 10, 4)).astype(np.float32)
  indices = np.array([[9, 0, 3], [1, 1, 2], [5, 4, 7]], np.int32)
  got = np.asarray(masking.gather_tokens(jnp.asarray(x), jnp.asarray(indices)))
  expected = np.stack([x[b, indices[b]] for b in range(3)])
  np.testing.assert_array_equal(got, expected)


# --- the ViT's masked path ------------------------------------------------------------------------


@pytest.mark.parametrize("sincos", [True, False], ids=["sincos", "learned"])
def test_kept_tokens_carry_their_own_position_embeddings(sincos):
  model = tiny_vit(sincos=sincos)
  images = random_images(0, 3)
  variables = init_vit(model, images)
  noise = distinct_noise(2, 3, NUM_PATCHES)
  ratio = 0.75
  _, tokens = apply_capturing_encoder_input(model, variables, images, mask_ratio=ratio,
                                            mask_noise=jnp.asarray(noise))
  keep = np.argsort(noise, axis=1)[:, :masking.num_kept(NUM_PATCHES, ratio)]
  all_tokens = numpy_patch_tokens(variables["params"], images, model)
  expected = np.stack([all_tokens[b, keep[b]] for b in range(3)])
  assert tokens.shape == expected.shape == (3, 4, WIDTH)
  np.testing.assert_allclose(np.asarray(tokens), expected, rtol=1e-5, atol=1e-5)


def test_class_token_is_prepended_and_never_dropped():
  model = tiny_vit(use_cls_token=True, pool="cls")
  images = random_images(1, 2)
  variables = init_vit(model, images)
  noise = distinct_noise(3, 2, NUM_PATCHES)
  _, tokens = apply_capturing_encoder_input(model, variables, images, mask_ratio=0.5,
                                            mask_noise=jnp.asarray(noise))
  cls = np.asarray(variables["params"]["cls"], np.float32)[0, 0]
  assert tokens.shape == (2, 1 + 8, WIDTH)
  np.testing.assert_array_equal(np.asarray(tokens)[:, 0], np.stack([cls, cls]))
  keep = np.argsort(noise, axis=1)[:, :8]
  all_tokens = numpy_patch_tokens(variables["params"], images, model)
  np.testing.assert_allclose(np.asarray(tokens)[:, 1:],
                             np.stack([all_tokens[b, keep[b]] for b in range(2)]),
                             rtol=1e-5, atol=1e-5)


def test_model_draws_a_different_mask_per_example_from_the_masking_rng():
  model = tiny_vit(mask_ratio=0.5)
  images = random_images(2, 8)
  variables = init_vit(model, images)
  out_a, out_b, out_c = [
      apply_vit(model, variables, images, train=True, rngs={"masking": jax.random.PRNGKey(seed)})
      for seed in (5, 5, 6)]
  keep_a = np.asarray(out_a["mask"].keep_indices)
  assert keep_a.shape == (8, 8)
  assert len({frozenset(row.tolist()) for row in keep_a}) == 8
  np.testing.assert_array_equal(keep_a, np.asarray(out_b["mask"].keep_indices))
  assert not np.array_equal(keep_a, np.asarray(out_c["mask"].keep_indices))


def test_vit_outputs_do_not_depend_on_the_batch_split_when_noise_is_given():
  model = tiny_vit(mask_ratio=0.5)
  images = random_images(3, 6)
  variables = init_vit(model, images)
  noise = jnp.asarray(distinct_noise(4, 6, NUM_PATCHES))
  full = apply_vit(model, variables, images, mask_noise=noise)["pooled"]
  halves = [apply_vit(model, variables, images[s:s + 3], mask_noise=noise[s:s + 3])["pooled"]
            for s in (0, 3)]
  np.testing.assert_allclose(np.asarray(full), np.concatenate([np.asarray(h) for h in halves]),
                             rtol=1e-6, atol=1e-6)


def test_ratio_zero_is_the_plain_vit():
  model = tiny_vit(mask_ratio=0.5)
  images = random_images(4, 2)
  variables = init_vit(model, images)
  outputs, tokens = apply_capturing_encoder_input(model, variables, images, mask_ratio=0.0)
  assert outputs["mask"] is None
  np.testing.assert_allclose(np.asarray(tokens),
                             numpy_patch_tokens(variables["params"], images, model),
                             rtol=1e-5, atol=1e-5)
  # The configured ratio 0.0 and the call-time override 0.0 are the same computation.
  unmasked_model = tiny_vit(mask_ratio=0.0)
  np.testing.assert_array_equal(
      np.asarray(outputs["pooled"]),
      np.asarray(apply_vit(unmasked_model, variables, images)["pooled"]))


def test_ratio_zero_equals_the_masked_path_with_an_identity_permutation_exactly():
  model = tiny_vit()
  images = random_images(5, 2)
  variables = init_vit(model, images)
  tiny_ratio = 0.01  # keeps round(16 * 0.99) = 16 tokens: the masked path keeps everything
  assert masking.num_kept(NUM_PATCHES, tiny_ratio) == NUM_PATCHES
  identity_noise = jnp.tile(jnp.arange(NUM_PATCHES, dtype=jnp.float32)[None], (2, 1))
  masked = apply_vit(model, variables, images, mask_ratio=tiny_ratio, mask_noise=identity_noise)
  unmasked = apply_vit(model, variables, images, mask_ratio=0.0)
  np.testing.assert_array_equal(np.asarray(masked["mask"].keep_indices),
                                np.tile(np.arange(NUM_PATCHES), (2, 1)))
  np.testing.assert_array_equal(np.asarray(masked["tokens"]), np.asarray(unmasked["tokens"]))
  np.testing.assert_array_equal(np.asarray(masked["pooled"]), np.asarray(unmasked["pooled"]))


def test_ratio_zero_traces_no_gather_and_no_sort():
  model = tiny_vit()
  images = random_images(6, 2)
  variables = init_vit(model, images)

  def forward(ratio):
    return lambda v, x: model.apply(v, x, train=True, mask_ratio=ratio,
                                    rngs={"masking": jax.random.PRNGKey(0)})["pooled"]

  unmasked = primitive_names(str(jax.make_jaxpr(forward(0.0))(variables, images)))
  masked = primitive_names(str(jax.make_jaxpr(forward(0.5))(variables, images)))
  assert "gather" in masked and "sort" in masked  # the check below can see them
  assert "gather" not in unmasked
  assert "sort" not in unmasked
