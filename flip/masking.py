"""Per-sample random token masking (FLIP's patch dropping, MAE's masking).

Every example draws its own uniform noise over the N tokens; the tokens with the smallest noise are
kept (argsort of noise), so each example keeps an independent uniformly random subset of size
`num_kept(N, ratio) = round(N * (1 - ratio))` (rounding halves up). The order of the kept tokens is
the order of their noise, which is itself random; `restore` indices undo the shuffle for decoders
that need the full sequence back (MAE).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

# N * (1 - ratio) is rounded to this many decimals before rounding half up, so a decimal ratio
# whose product is an exact half in decimal (15 * (1 - 0.9) = 1.5) is not pushed below it by
# binary floating-point error (1 - 0.9 = 0.0999...).
_KEPT_PRODUCT_DECIMALS = 9


class TokenMask(NamedTuple):
  keep_indices: Array  # [batch, kept] int32: token positions kept, in shuffled order
  restore_indices: Array  # [batch, N] int32: position of each token in the shuffled order
  mask: Array  # [batch, N] float32: 1 = dropped, 0 = kept (MAE's convention)


def num_kept(num_tokens: int, mask_ratio: float) -> int:
  """round(N * (1 - mask_ratio)), halves rounded up, at least one token."""
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
  product = round(num_tokens * (1.0 - mask_ratio), _KEPT_PRODUCT_DECIMALS)
  return max(1, int(math.floor(product + 0.5)))


def random_token_mask(rng: Array, batch: int, num_tokens: int, mask_ratio: float) -> TokenMask:
  """Draws an independent random subset of kept tokens for every example."""
  return token_mask_from_noise(mask_noise(rng, batch, num_tokens), mask_ratio)


def mask_noise(rng: Array, batch: int, num_tokens: int) -> Array:
  """The uniform noise [batch, N] whose per-row order decides which tokens are kept."""
  return jax.random.uniform(rng, (batch, num_tokens))


def token_mask_from_noise(noise: Array, mask_ratio: float) -> TokenMask:
  """Keeps the tokens with the smallest noise in each row.

  Taking the noise as input lets a caller split a batch into micro-batches (gradient accumulation)
  and still give every example exactly the mask it gets in the full batch.
  """
  batch, num_tokens = noise.shape
  kept = num_kept(num_tokens, mask_ratio)
  shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  restore = jnp.argsort(shuffle, axis=1).astype(jnp.int32)
  keep_indices = shuffle[:, :kept]
  mask = jnp.ones((batch, num_tokens), jnp.float32)
  mask = mask.at[jnp.arange(batch)[:, None], keep_indices].set(0.0)
  return TokenMask(keep_indices, restore, mask)


def gather_tokens(x: Array, indices: Array) -> Array:
  """x: [batch, N, D], indices: [batch, K] -> [batch, K, D]."""
  return jnp.take_along_axis(x, indices[:, :, None], axis=1)
