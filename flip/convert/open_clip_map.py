"""The tensor table between an open_clip CLIP state dict and our FlipModel's parameters.

One `Entry` per open_clip tensor: its name and shape there, our parameter path and shape, and the
reshape between them (open_clip name -> ours; `<b>` = transformer.resblocks.N, ours
Transformer/encoderblock_NN; visual.* goes to img_encoder, the text tensors to txt_encoder):
  visual.conv1.weight [D, 3, p, p] -> img_encoder/embedding/kernel [p, p, 3, D] (no bias)
  visual.class_embedding [D] -> img_encoder/cls [1, 1, D]
  visual.positional_embedding [1 + N, D] -> img_encoder/pos_embedding [1, 1 + N, D] (row 0: cls)
  visual.ln_pre.{weight,bias} -> img_encoder/ln_pre/{scale,bias}
  visual.ln_post.{weight,bias} -> img_encoder/Transformer/encoder_norm (img_encoder/fc_norm when
      the norm follows the pooling); visual.proj [D, E] -> img_proj/kernel
  <b>.ln_1 / ln_2 -> LayerNorm_0 / LayerNorm_1;  <b>.ls_1.gamma / ls_2.gamma ->
      layerscale_msa/scale / layerscale_mlp/scale
  <b>.attn.in_proj_weight [3D, D] -> MultiHeadSelfAttention_0/qkv_kernel [D, 3, H, K]
  <b>.attn.in_proj_bias [3D] -> qkv_bias [3, H, K];  attn.out_proj.weight [D, D] ->
      out_kernel [H, K, D];  attn.out_proj.bias -> out_bias
  <b>.mlp.c_fc / c_proj {weight [out, in], bias} -> MlpBlock_0/Dense_0 / Dense_1 {kernel [in, out]}
  token_embedding.weight [V, D] -> txt_encoder/token_embedding [V', D] (zero rows appended up to
      VOCAB_ROW_MULTIPLE; export drops them again)
  positional_embedding [L, D] -> txt_encoder/pos_embedding [1, L, D]
  ln_final -> txt_encoder/Transformer/encoder_norm;  text_projection [D, E] -> txt_proj/kernel
  logit_scale [] -> logit_scale [1];  logit_bias [] -> logit_bias []
`to_flip` and `to_open_clip` apply the table in each direction. A tensor the table does not know,
one it expects but does not find, or a wrong shape is one `MappingError` line naming them.
Export first rewrites our other layouts into the table's (`canonical_params`): separate q/k/v
kernels are fused, a fixed sin-cos or class-row-less position table gets a zero class row, a patch
embedding bias is folded into the patch rows of the position table, a fixed temperature becomes
the logit scale.
"""

import dataclasses
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from flip import misfit
from flip.convert import open_clip_arch as arch_lib

Shape = Tuple[int, ...]


class MappingError(ValueError):
  """State-dict keys or shapes that do not fit the architecture, in one line."""


@dataclasses.dataclass(frozen=True)
class Entry:
  oc_key: str
  oc_shape: Shape
  ours: str
  our_shape: Shape
  kind: str  # copy | T | conv | qkv_w | qkv_b | out_w | reshape | vocab


def _padded_rows(vocab_size: int) -> int:
  from flip.models import text as text_lib  # pylint: disable=g-import-not-at-top (jax)
  return text_lib.padded_vocab_rows(vocab_size)


def _block(oc: str, ours: str, t: arch_lib.Tower) -> List[Entry]:
  d, m, h = t.width, t.mlp_dim, t.heads
  k = d // h
  a = f"{ours}/MultiHeadSelfAttention_0"
  entries = [
      Entry(f"{oc}.ln_1.weight", (d,), f"{ours}/LayerNorm_0/scale", (d,), "copy"),
      Entry(f"{oc}.ln_1.bias", (d,), f"{ours}/LayerNorm_0/bias", (d,), "copy"),
      Entry(f"{oc}.attn.in_proj_weight", (3 * d, d), f"{a}/qkv_kernel", (d, 3, h, k), "qkv_w"),
      Entry(f"{oc}.attn.in_proj_bias", (3 * d,), f"{a}/qkv_bias", (3, h, k), "qkv_b"),
      Entry(f"{oc}.attn.out_proj.weight", (d, d), f"{a}/out_kernel", (h, k, d), "out_w"),
      Entry(f"{oc}.attn.out_proj.bias", (d,), f"{a}/out_bias", (d,), "copy"),
      Entry(f"{oc}.ln_2.weight", (d,), f"{ours}/LayerNorm_1/scale", (d,), "copy"),
      Entry(f"{oc}.ln_2.bias", (d,), f"{ours}/LayerNorm_1/bias", (d,), "copy"),
      Entry(f"{oc}.mlp.c_fc.weight", (m, d), f"{ours}/MlpBlock_0/Dense_0/kernel", (d, m), "T"),
      Entry(f"{oc}.mlp.c_fc.bias", (m,), f"{ours}/MlpBlock_0/Dense_0/bias", (m,), "copy"),
      Entry(f"{oc}.mlp.c_proj.weight", (d, m), f"{ours}/MlpBlock_0/Dense_1/kernel", (m, d), "T"),
      Entry(f"{oc}.mlp.c_proj.bias", (d,), f"{ours}/MlpBlock_0/Dense_1/bias", (d,), "copy"),
  ]
  if t.layer_scale is not None:
    entries += [Entry(f"{oc}.ls_1.gamma", (d,), f"{ours}/layerscale_msa/scale", (d,), "copy"),
                Entry(f"{oc}.ls_2.gamma", (d,), f"{ours}/layerscale_mlp/scale", (d,), "copy")]
  return entries


def _norm(oc: str, ours: str, width: int) -> List[Entry]:
  return [Entry(f"{oc}.weight", (width,), f"{ours}/scale", (width,), "copy"),
          Entry(f"{oc}.bias", (width,), f"{ours}/bias", (width,), "copy")]


def entries(arch: arch_lib.Arch) -> List[Entry]:
  """Every tensor of the open_clip CLIP state dict of `arch`, with its place in our model."""
  v, t, e = arch.vision, arch.text, arch.embed_dim
  p, d = v.patch_size, v.width
  tokens = (v.image_size // p) ** 2 + 1
  table = [
      Entry("visual.conv1.weight", (d, 3, p, p), "img_encoder/embedding/kernel", (p, p, 3, d),
            "conv"),
      Entry("visual.class_embedding", (d,), "img_encoder/cls", (1, 1, d), "reshape"),
      Entry("visual.positional_embedding", (tokens, d), "img_encoder/pos_embedding",
            (1, tokens, d), "reshape"),
  ]
  if v.ln_pre:
    table += _norm("visual.ln_pre", "img_encoder/ln_pre", d)
  for i in range(v.layers):
    table += _block(f"visual.transformer.resblocks.{i}",
                    f"img_encoder/Transformer/encoderblock_{i:02d}", v)
  post = "img_encoder/fc_norm" if v.pooled_norm else "img_encoder/Transformer/encoder_norm"
  table += _norm("visual.ln_post", post, d)
  table.append(Entry("visual.proj", (d, e), "img_proj/kernel", (d, e), "copy"))
  w = t.width
  table += [
      Entry("token_embedding.weight", (t.vocab_size, w), "txt_encoder/token_embedding",
            (_padded_rows(t.vocab_size), w), "vocab"),
      Entry("positional_embedding", (t.context_length, w), "txt_encoder/pos_embedding",
            (1, t.context_length, w), "reshape"),
  ]
  for i in range(t.layers):
    table += _block(f"transformer.resblocks.{i}", f"txt_encoder/Transformer/encoderblock_{i:02d}",
                    t)
  table += _norm("ln_final", "txt_encoder/Transformer/encoder_norm", w)
  table += [Entry("text_projection", (w, e), "txt_proj/kernel", (w, e), "copy"),
            Entry("logit_scale", (), "logit_scale", (1,), "reshape")]
  if arch.logit_bias:
    table.append(Entry("logit_bias", (), "logit_bias", (), "reshape"))
  return table


def _forward(entry: Entry, x: np.ndarray) -> np.ndarray:
  kind, shape = entry.kind, entry.our_shape
  if kind == "copy":
    return x
  if kind == "T":
    return x.T
  if kind == "conv":
    return x.transpose(2, 3, 1, 0)
  if kind == "qkv_w":
    return x.reshape(3, shape[2], shape[3], shape[0]).transpose(3, 0, 1, 2)
  if kind in ("qkv_b", "reshape"):
    return x.reshape(shape)
  if kind == "out_w":
    return x.T.reshape(shape)
  if kind == "vocab":
    return np.concatenate([x, np.zeros((shape[0] - x.shape[0], shape[1]), x.dtype)])
  raise AssertionError(kind)


def _backward(entry: Entry, x: np.ndarray) -> np.ndarray:
  kind, shape = entry.kind, entry.oc_shape
  if kind == "copy":
    return x
  if kind == "T":
    return x.T
  if kind == "conv":
    return x.transpose(3, 2, 0, 1)
  if kind == "qkv_w":
    return x.transpose(1, 2, 3, 0).reshape(shape)
  if kind in ("qkv_b", "reshape"):
    return x.reshape(shape)
  if kind == "out_w":
    return x.reshape(shape[0], shape[1]).T
  if kind == "vocab":
    return x[:shape[0]]
  raise AssertionError(kind)


def _shape_ok(entry: Entry, shape: Shape) -> bool:
  if entry.oc_shape == ():  # a scalar: open_clip stores [] or [1] (nonscalar_logit_scale)
    return int(np.prod(shape)) == 1
  return tuple(shape) == entry.oc_shape


def to_flip(state_dict: Mapping[str, np.ndarray], arch: arch_lib.Arch,
            source: str = "state dict") -> Dict[str, np.ndarray]:
  """open_clip state dict (numpy) -> our flat parameters {path: float32 array}."""
  table = entries(arch)
  known = {entry.oc_key for entry in table}
  missing = [entry.oc_key for entry in table if entry.oc_key not in state_dict]
  extra = sorted(key for key in state_dict if key not in known)
  misshaped = [misfit.shape_mismatch(entry.oc_key, np.shape(state_dict[entry.oc_key]),
                                     entry.oc_shape) for entry in table
               if entry.oc_key in state_dict
               and not _shape_ok(entry, tuple(np.shape(state_dict[entry.oc_key])))]
  line = misfit.misfit_line(source, "the open_clip model config", missing=missing, extra=extra,
                            misshaped=misshaped)
  if line:
    raise MappingError(line)
  return {entry.ours: _forward(entry, np.asarray(state_dict[entry.oc_key], np.float32)
                               .reshape(entry.oc_shape))
          for entry in table}


def to_open_clip(flat: Mapping[str, np.ndarray], arch: arch_lib.Arch,
                 source: str = "checkpoint") -> Dict[str, np.ndarray]:
  """Our flat parameters in the table's layout (`canonical_params`) -> open_clip state dict."""
  table = entries(arch)
  known = {entry.ours for entry in table}
  missing = [entry.ours for entry in table if entry.ours not in flat]
  extra = sorted(key for key in flat if key not in known)
  misshaped = [misfit.shape_mismatch(entry.ours, np.shape(flat[entry.ours]), entry.our_shape)
               for entry in table
               if entry.ours in flat and tuple(np.shape(flat[entry.ours])) != entry.our_shape]
  line = misfit.misfit_line(source, "the open_clip architecture", missing=missing, extra=extra,
                            misshaped=misshaped)
  if line:
    raise MappingError(line)
  return {entry.oc_key: np.ascontiguousarray(_backward(entry, np.asarray(flat[entry.ours],
                                                                         np.float32)))
          for entry in table}


# --- our other layouts -> the table's --------------------------------------------------------

_SEPARATE = ("query", "key", "value")


def _fuse_attention(flat: Dict[str, np.ndarray]) -> None:
  for key in [k for k in flat if k.endswith("/MultiHeadSelfAttention_0/query/kernel")]:
    base = key[:-len("query/kernel")]
    flat[base + "qkv_kernel"] = np.stack([flat.pop(f"{base}{n}/kernel") for n in _SEPARATE], 1)
    flat[base + "qkv_bias"] = np.stack([flat.pop(f"{base}{n}/bias") for n in _SEPARATE], 0)
    flat[base + "out_kernel"] = flat.pop(base + "out/kernel")
    flat[base + "out_bias"] = flat.pop(base + "out/bias")


def canonical_params(flat: Mapping[str, np.ndarray], config: Any,
                     arch: arch_lib.Arch) -> Dict[str, np.ndarray]:
  """Our parameters of `config`'s model rewritten into the layout `entries` uses (see above)."""
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  _fuse_attention(flat)
  width = arch.vision.width
  grid = arch.vision.image_size // arch.vision.patch_size
  pos = flat.pop("img_encoder/pos_embedding", None)
  if pos is None:  # fixed sin-cos table, computed by the model
    from flip.models import layers  # pylint: disable=g-import-not-at-top (jax)
    pos = np.asarray(layers.sincos_2d(grid, grid, width), np.float32)[None]
  if pos.shape[1] == grid * grid:  # the class token gets no position embedding
    pos = np.concatenate([np.zeros((1, 1, width), np.float32), pos], axis=1)
  bias = flat.pop("img_encoder/embedding/bias", None)
  if bias is not None:  # x @ W + b + pos == x @ W + (pos + b) on the patch rows
    pos = pos.copy()
    pos[:, 1:] += bias
  flat["img_encoder/pos_embedding"] = pos
  if "logit_scale" not in flat:
    flat["logit_scale"] = np.log(1.0 / np.asarray([config.model.clr.tau], np.float32))
  return flat
