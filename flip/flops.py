"""Analytic FLOP count of one FLIP training step (image tower with kept tokens, text tower,
projections, contrastive loss).

Conventions (the ones open_clip's and FLIP's papers use, so ratios are comparable):
- Only matrix multiplications are counted, one multiply-add = 2 FLOPs. Softmax, LayerNorm, GELU,
  the optimizer update, the patch gather and the embedding-table lookup are not counted: they
  are memory-bound work whose cost the benchmarks measure instead of predict.
- A training step (forward + backward) costs `TRAIN_STEP_FORWARD_MULTIPLE` = 3 forward passes:
  the backward pass of a matmul is two matmuls of the same size (input and weight gradients).
  The patch embedding is counted the same way even though its input gradient is never needed
  (it is < 2 % of the ViT's FLOPs at every size here).
- The patch embedding runs on every patch (tokens are dropped after it and after the position
  embedding, as in FLIP and open_clip's `patch_dropout`); the transformer blocks see the kept
  tokens (`flip.masking.num_kept`) plus the class token when there is one.
- One transformer block on T tokens of width D with MLP width M and any number of heads:
  q/k/v 6TD^2, attention logits 2T^2D, attention-weighted values 2T^2D, output projection 2TD^2,
  MLP 4TDM. Heads split D without changing the count.
- The contrastive loss is one [B, E] x [E, B] product (2 B^2 E), the formulation of
  `flip.losses.contrastive_loss`; it is the only term that is not linear in the batch.
"""

import dataclasses
from typing import Any, Dict

from flip import masking

TRAIN_STEP_FORWARD_MULTIPLE = 3  # forward + backward = 3 forward passes (see the docstring)
FLOPS_PER_MULTIPLY_ADD = 2


@dataclasses.dataclass(frozen=True)
class TowerDims:
  """A transformer tower's matmul-relevant sizes."""
  width: int
  depth: int
  mlp_dim: int


@dataclasses.dataclass(frozen=True)
class FlipDims:
  """The sizes that decide a FLIP step's FLOPs."""
  image_size: int
  patch_size: int
  channels: int
  img: TowerDims
  use_cls_token: bool
  text_len: int
  txt: TowerDims
  proj_dim: int

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  def image_tokens(self, mask_ratio: float) -> int:
    """Tokens the image transformer sees: kept patches (+ the class token)."""
    kept = self.num_patches if mask_ratio == 0.0 else masking.num_kept(self.num_patches,
                                                                       mask_ratio)
    return kept + int(self.use_cls_token)


def dims_from_config(config: Any) -> FlipDims:
  """The FLOP-relevant sizes of a FLIP experiment config (FLIP's key names)."""
  img, txt = config.model.model_img, config.model.model_txt
  patch = tuple(img.patches.size)
  if patch[0] != patch[1]:
    raise ValueError(f"model.model_img.patches.size must be square for the FLOP count, got {patch}")
  return FlipDims(
      image_size=config.image_size, patch_size=patch[0], channels=3,
      img=TowerDims(img.hidden_size, img.transformer.num_layers, img.transformer.mlp_dim),
      use_cls_token=bool(img.use_cls_token),
      text_len=config.aug.txt.max_len,
      txt=TowerDims(txt.hidden_size, txt.transformer.num_layers, txt.transformer.mlp_dim),
      proj_dim=config.model.clr.proj_dim_out)


def block_forward_flops(tokens: int, width: int, mlp_dim: int) -> int:
  """One pre-norm transformer block on one example of `tokens` tokens (matmuls only)."""
  macs = (3 * tokens * width * width  # fused q/k/v projection
          + tokens * tokens * width  # q @ k^T over all heads
          + tokens * tokens * width  # softmax(.) @ v over all heads
          + tokens * width * width  # output projection
          + 2 * tokens * width * mlp_dim)  # MLP in and out
  return FLOPS_PER_MULTIPLY_ADD * macs


def tower_forward_flops(tokens: int, tower: TowerDims) -> int:
  return tower.depth * block_forward_flops(tokens, tower.width, tower.mlp_dim)


def forward_flops(dims: FlipDims, batch_size: int, mask_ratio: float) -> Dict[str, int]:
  """Forward FLOPs of one batch, by part: patch_embed, image, text, proj, loss, total."""
  patch_macs = dims.num_patches * dims.patch_size ** 2 * dims.channels * dims.img.width
  parts = {
      "patch_embed": batch_size * FLOPS_PER_MULTIPLY_ADD * patch_macs,
      "image": batch_size * tower_forward_flops(dims.image_tokens(mask_ratio), dims.img),
      "text": batch_size * tower_forward_flops(dims.text_len, dims.txt),
      "proj": batch_size * FLOPS_PER_MULTIPLY_ADD * (dims.img.width + dims.txt.width) *
              dims.proj_dim,
      "loss": FLOPS_PER_MULTIPLY_ADD * batch_size * batch_size * dims.proj_dim,
  }
  parts["total"] = sum(parts.values())
  return parts


def train_step_flops(dims: FlipDims, batch_size: int, mask_ratio: float) -> int:
  """FLOPs of one training step (forward + backward) on `batch_size` examples."""
  return TRAIN_STEP_FORWARD_MULTIPLE * forward_flops(dims, batch_size, mask_ratio)["total"]


def image_inference_flops(dims: FlipDims, batch_size: int) -> int:
  """Forward FLOPs of unmasked image embeddings (tower + projection) for `batch_size` images."""
  parts = forward_flops(dims, batch_size, 0.0)
  return (parts["patch_embed"] + parts["image"] +
          batch_size * FLOPS_PER_MULTIPLY_ADD * dims.img.width * dims.proj_dim)


def flop_ratio(dims: FlipDims, batch_size: int, mask_ratio: float,
               reference_ratio: float = 0.0) -> float:
  """Step FLOPs at `reference_ratio` over step FLOPs at `mask_ratio` (the ideal speedup)."""
  return (train_step_flops(dims, batch_size, reference_ratio) /
          train_step_flops(dims, batch_size, mask_ratio))
