"""MAE's pretraining decoder (the `decoder_*` and `mask_token` tensors of MAE's
`models_mae.MaskedAutoencoderViT`) <-> our `mae_decoder` (flip.models.mae.MaeDecoder).

MAE name -> ours (under `mae_decoder/`; blocks map as the encoder's, flip.convert.timm_mapping):
  decoder_embed.weight [Dd, D], .bias -> decoder_embed/kernel [D, Dd], bias
  mask_token [1, 1, Dd] -> mask_token
  decoder_pos_embed [1, 1 + N, Dd]: MAE's fixed sin-cos table (zero class row) -> nothing (checked
      against the table our decoder computes)
  decoder_blocks.N.* -> Transformer/encoderblock_NN/*
  decoder_norm.{weight,bias} -> Transformer/encoder_norm/{scale,bias}
  decoder_pred.weight [p*p*C, Dd], .bias -> decoder_pred/kernel [Dd, p*p*C], bias (pixels in
      MAE's patchify order, which is ours)
The head count is not in the tensors: MAE uses 16 for every released model (DEFAULT_NUM_HEADS).
"""

from typing import Any, Dict, Mapping, Tuple

import numpy as np

from flip import misfit
from flip.convert import timm_mapping

Array = np.ndarray
DEFAULT_NUM_HEADS = 16  # MAE: decoder_num_heads=16 in every mae_vit_*_dec512d8b model
PREFIX = "decoder_"
MASK_TOKEN = "mask_token"
_PLAIN = (("decoder_embed/kernel", "decoder_embed.weight", True),
          ("decoder_embed/bias", "decoder_embed.bias", False),
          (MASK_TOKEN, MASK_TOKEN, False),
          (f"{timm_mapping.ENCODER_NORM}/scale", "decoder_norm.weight", False),
          (f"{timm_mapping.ENCODER_NORM}/bias", "decoder_norm.bias", False),
          ("decoder_pred/kernel", "decoder_pred.weight", True),
          ("decoder_pred/bias", "decoder_pred.bias", False))


def is_decoder_key(key: str) -> bool:
  return key.startswith(PREFIX) or key == MASK_TOKEN


def _layout(width: int, depth: int, num_heads: int, mlp_dim: int, grid: Tuple[int, int],
            cls_token: bool, qkv_layout: str) -> timm_mapping.VitLayout:
  """The decoder's stack as a VitLayout (patch fields unused)."""
  if num_heads <= 0 or width % num_heads:
    raise timm_mapping.MappingError(f"decoder width {width} is not divisible by {num_heads} heads")
  return timm_mapping.VitLayout(
      width=width, patch=(1, 1), channels=0, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
      grid=tuple(grid), cls_token=cls_token, sincos=True, cls_posemb=False, ln_pre=False,
      patch_bias=True, layer_scale=False, pooled_norm=False, num_classes=0, qkv_layout=qkv_layout)


def decoder_to_ours(sd: Mapping[str, Array], num_heads: int, grid: Tuple[int, int],
                    cls_token: bool, qkv_layout: str = "fused"
                    ) -> Tuple[Dict[str, Array], Dict[str, Any]]:
  """MAE's decoder tensors -> (our flat mae_decoder params, MaeDecoder fields)."""
  for key in ("decoder_embed.weight", "decoder_blocks.0.mlp.fc1.weight", "decoder_pos_embed"):
    if key not in sd:
      raise timm_mapping.MappingError(f"the MAE decoder has no {key}")
  width = np.shape(sd["decoder_embed.weight"])[0]
  depth = len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")})
  layout = _layout(width, depth, num_heads, np.shape(sd["decoder_blocks.0.mlp.fc1.weight"])[0],
                   grid, cls_token, qkv_layout)
  block_shapes = {PREFIX + k: v for k, v in timm_mapping.timm_shapes(layout).items()
                  if k.startswith("blocks.")}
  expected = set(block_shapes) | {theirs for _, theirs, _ in _PLAIN} | {"decoder_pos_embed"}
  missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
  misshaped = [misfit.shape_mismatch(k, np.shape(sd[k]), v) for k, v in sorted(block_shapes.items())
               if k in sd and tuple(np.shape(sd[k])) != v]
  line = misfit.misfit_line("the MAE decoder's tensors", "the decoder layout", missing=missing,
                            extra=extra, misshaped=misshaped)
  if line:
    raise timm_mapping.MappingError(line)
  table, expected_table = np.asarray(sd["decoder_pos_embed"]), timm_mapping.sincos_table(layout)
  if table.shape != expected_table.shape or float(
      np.max(np.abs(table - expected_table))) > timm_mapping.SINCOS_ATOL:
    raise timm_mapping.MappingError(
        f"decoder_pos_embed {table.shape} is not the fixed sin-cos table our decoder computes for "
        f"a {grid[0]}x{grid[1]} grid {'with' if cls_token else 'without'} a class row")
  blocks = {k[len(PREFIX):]: np.asarray(v) for k, v in sd.items()
            if k.startswith(PREFIX + "blocks.")}
  params = {ours: np.transpose(sd[theirs]) if transposed else np.asarray(sd[theirs])
            for ours, theirs, transposed in _PLAIN}
  for n in range(depth):
    params.update(timm_mapping.block_to_ours(blocks, n, layout))
  fields = dict(hidden_size=width, num_layers=depth, num_heads=num_heads,
                mlp_dim=layout.mlp_dim, gelu="exact", qkv_layout=qkv_layout)
  return params, fields


def decoder_to_mae(params: Mapping[str, Array], grid: Tuple[int, int],
                   cls_token: bool) -> Dict[str, Array]:
  """Our flat mae_decoder params -> MAE's decoder tensors (the inverse of decoder_to_ours)."""
  attn = f"{timm_mapping.BLOCK.format(0)}/MultiHeadSelfAttention_0"
  separate = f"{attn}/query/kernel" in params
  heads = np.shape(params[f"{attn}/query/kernel" if separate else f"{attn}/qkv_kernel"])[-2]
  width = np.shape(params["decoder_embed/kernel"])[1]
  depth = len({k.split("/")[1] for k in params if k.startswith("Transformer/encoderblock_")})
  mlp_dim = np.shape(params[f"{timm_mapping.BLOCK.format(0)}/MlpBlock_0/Dense_0/kernel"])[1]
  layout = _layout(width, depth, heads, mlp_dim, grid, cls_token,
                   "separate" if separate else "fused")
  sd = {theirs: np.transpose(params[ours]) if transposed else np.asarray(params[ours])
        for ours, theirs, transposed in _PLAIN}
  for n in range(depth):
    sd.update({PREFIX + k: v for k, v in timm_mapping.block_to_timm(params, n, layout).items()})
  sd["decoder_pos_embed"] = timm_mapping.sincos_table(layout)
  return {k: np.array(v, np.float32) for k, v in sd.items()}
