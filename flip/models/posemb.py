"""Resampling a learned position-embedding table to another patch grid (host-side numpy).

`resample(table, new_grid, num_prefix_tokens)` takes a table [1, prefix + gh*gw, D] (the rows of
the prefix tokens, e.g. a class token, first; then the patch rows in row-major order), keeps the
prefix rows unchanged and resizes the [gh, gw, D] grid of patch rows to `new_grid` the way timm's
`timm.layers.resample_abs_pos_embed` does by default: PyTorch's `F.interpolate(mode="bicubic",
antialias=True, align_corners=False)`. That is a separable filter whose weights for output pixel i
of an axis resized by `scale = old / new` are

    centre = scale * (i + 0.5);  support = 2 * max(scale, 1)
    taps j in [trunc(centre - support + 0.5) clipped at 0, trunc(centre + support + 0.5) clipped
    at old), weight = cubic((j - centre + 0.5) / max(scale, 1)), normalised to sum to one,

with Keys' cubic convolution kernel at a = -0.5 (the antialiased kernel of PyTorch and PIL; the
non-antialiased bicubic of PyTorch uses -0.75). Weights and products are computed in float64 and
the result is returned in the table's dtype.

Used by the importers (flip.convert) when the target image size differs from the checkpoint's, and
by flip.checkpoints when a `pretrain_dir` checkpoint with a learned table is loaded into a model of
another resolution.
"""

import math
from typing import Optional, Tuple

import numpy as np

CUBIC_A = -0.5  # Keys' kernel parameter of the antialiased bicubic filter
CUBIC_SUPPORT = 2.0  # half-width of the cubic kernel in input pixels at scale <= 1


class PosembError(ValueError):
  """A position table that cannot be resampled, in one line naming its shape."""


def cubic(x: np.ndarray, a: float = CUBIC_A) -> np.ndarray:
  """Keys' cubic convolution kernel, zero outside |x| < 2."""
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def resize_weights(old: int, new: int) -> np.ndarray:
  """The [new, old] matrix of antialiased bicubic resize weights along one axis (float64)."""
  if old <= 0 or new <= 0:
    raise PosembError(f"cannot resize an axis of {old} positions to {new}")
  scale = old / new
  stretch = max(scale, 1.0)
  support = CUBIC_SUPPORT * stretch
  weights = np.zeros((new, old), np.float64)
  for i in range(new):
    centre = scale * (i + 0.5)
    lo = max(int(centre - support + 0.5), 0)  # int(): truncation toward zero, as in C++
    hi = min(int(centre + support + 0.5), old)
    taps = np.arange(lo, hi)
    w = cubic((taps - centre + 0.5) / stretch)
    total = w.sum()
    weights[i, lo:hi] = w / total if total != 0.0 else w
  return weights


def square_grid(num_positions: int, what: str = "position table") -> Tuple[int, int]:
  """(g, g) for a square grid of `num_positions` patches, else a PosembError."""
  side = int(round(math.sqrt(num_positions)))
  if side * side != num_positions:
    raise PosembError(f"{what} has {num_positions} patch positions, not a square grid: give its "
                      "grid")
  return side, side


def resample(table: np.ndarray, new_grid: Tuple[int, int], num_prefix_tokens: int = 0,
             old_grid: Optional[Tuple[int, int]] = None) -> np.ndarray:
  """[1, prefix + gh*gw, D] -> [1, prefix + nh*nw, D] (see the module doc); `old_grid` defaults
  to the square grid of the patch rows. The same grid returns the table unchanged."""
  table = np.asarray(table)
  if table.ndim != 3 or table.shape[0] != 1 or table.shape[1] < num_prefix_tokens:
    raise PosembError(f"position table of shape {table.shape} is not [1, {num_prefix_tokens} "
                      "prefix + patches, width]")
  prefix, patches = table[:, :num_prefix_tokens], table[:, num_prefix_tokens:]
  if old_grid is None:
    old_grid = square_grid(patches.shape[1], f"position table {table.shape}")
  old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
  if old_grid[0] * old_grid[1] != patches.shape[1]:
    raise PosembError(f"position table {table.shape} with {num_prefix_tokens} prefix rows does "
                      f"not hold a {old_grid[0]}x{old_grid[1]} grid")
  if old_grid == new_grid:
    return table
  width = table.shape[-1]
  grid = patches.reshape(old_grid[0], old_grid[1], width).astype(np.float64)
  rows, cols = resize_weights(old_grid[0], new_grid[0]), resize_weights(old_grid[1], new_grid[1])
  resized = np.einsum("ih,jw,hwd->ijd", rows, cols, grid)
  resized = resized.reshape(1, new_grid[0] * new_grid[1], width).astype(table.dtype)
  return np.concatenate([prefix, resized], axis=1)
