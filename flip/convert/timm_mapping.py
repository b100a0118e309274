"""The tensor-by-tensor mapping between timm's `VisionTransformer` state dict and our image tower.

Pure numpy (no torch): `timm_to_ours` and `ours_to_timm` are exact inverses (transposes and
reshapes only), `layout_from_timm` / `layout_from_ours` read the architecture off the tensors, and
`vit_fields` / `timm_kwargs` turn a layout into our `VisionTransformer` fields or the keyword
arguments of `timm.create_model` that build the same function.

timm name -> ours (under `img_encoder/`; `<b>` is `Transformer/encoderblock_NN` for `blocks.N`):
  patch_embed.proj.weight [D, C, p, p] -> embedding/kernel [p, p, C, D] (transpose 2, 3, 1, 0)
  patch_embed.proj.bias [D] -> embedding/bias (absent: patch_bias=False)
  cls_token [1, 1, D] -> cls
  pos_embed [1, 1 + N, D] -> pos_embedding (learned, cls_posemb=True); [1, N, D] (timm's
      no_embed_class) -> pos_embedding (learned, no class row); MAE's fixed sin-cos table (zero
      class row, then our sincos_2d) -> nothing (sincos=True: checked, recomputed by the model)
  norm_pre.{weight,bias} -> ln_pre/{scale,bias}
  <b>: norm1 -> LayerNorm_0, norm2 -> LayerNorm_1 ({weight,bias} -> {scale,bias})
       attn.qkv.weight [3D, D] -> MultiHeadSelfAttention_0/qkv_kernel [D, 3, H, K] (transpose,
           reshape); attn.qkv.bias [3D] -> qkv_bias [3, H, K]; attn.proj.weight [D, D] ->
           out_kernel [H, K, D]; attn.proj.bias -> out_bias (qkv_layout "separate": the three
           thirds -> query|key|value/{kernel [D, H, K], bias [H, K]}, proj -> out/{kernel, bias})
       mlp.fc1 -> MlpBlock_0/Dense_0, mlp.fc2 -> MlpBlock_0/Dense_1 (weight transposed -> kernel)
       ls1.gamma -> layerscale_msa/scale, ls2.gamma -> layerscale_mlp/scale
  norm.{weight,bias} -> Transformer/encoder_norm/{scale,bias}
  fc_norm.{weight,bias} -> fc_norm/{scale,bias} (pooled_norm=True; timm then has no `norm`)
  head.weight [classes, D], head.bias -> head/{kernel [D, classes], bias} (the classifier's head,
      beside img_encoder)
A tensor without a place, a tensor the layout needs that is absent, or a wrong shape is a
`MappingError` naming the timm key.
"""

import dataclasses
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from flip import misfit
from flip.models import layers

Array = np.ndarray
# MAE stores its sin-cos table as float32 numpy float64 values; ours is float32 from XLA.
SINCOS_ATOL = 1e-5
POSEMB_KINDS = ("auto", "sincos", "learned")
BLOCK = "Transformer/encoderblock_{:02d}"
ENCODER_NORM = "Transformer/encoder_norm"
# timm's `act_layer` names of our `gelu` kinds.
TIMM_ACT = {"exact": "gelu", "tanh": "gelu_tanh", "quick": "quick_gelu"}
TIMM_POOL = {"cls": "token", "avg": "avg"}
DEFAULT_LAYER_SCALE_INIT = 1e-5  # only initialises new models; imported values come from the file
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")

# (our suffix inside a block, timm suffix inside `blocks.N.`, transposed)
_BLOCK_PLAIN = (
    ("LayerNorm_0/scale", "norm1.weight", False), ("LayerNorm_0/bias", "norm1.bias", False),
    ("LayerNorm_1/scale", "norm2.weight", False), ("LayerNorm_1/bias", "norm2.bias", False),
    ("MlpBlock_0/Dense_0/kernel", "mlp.fc1.weight", True),
    ("MlpBlock_0/Dense_0/bias", "mlp.fc1.bias", False),
    ("MlpBlock_0/Dense_1/kernel", "mlp.fc2.weight", True),
    ("MlpBlock_0/Dense_1/bias", "mlp.fc2.bias", False),
)
_LAYER_SCALE = (("layerscale_msa/scale", "ls1.gamma"), ("layerscale_mlp/scale", "ls2.gamma"))
_ATTN = "MultiHeadSelfAttention_0"


class MappingError(ValueError):
  """A state dict or parameter tree that does not fit the mapping, in one line naming the key."""


@dataclasses.dataclass(frozen=True)
class VitLayout:
  """What the tensors of a ViT say about its architecture (plus the head count and grid)."""

  width: int
  patch: Tuple[int, int]
  channels: int
  depth: int
  num_heads: int
  mlp_dim: int
  grid: Tuple[int, int]
  cls_token: bool
  sincos: bool
  cls_posemb: bool
  ln_pre: bool
  patch_bias: bool
  layer_scale: bool
  pooled_norm: bool
  num_classes: int  # 0: no head
  qkv_layout: str = "fused"

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


def sincos_table(layout: VitLayout) -> Array:
  """The fixed table as timm / MAE store it: [1, (1 +) N, D], the class row zero."""
  table = np.asarray(layers.sincos_2d(layout.grid[0], layout.grid[1], layout.width), np.float32)
  if layout.cls_token:
    table = np.concatenate([np.zeros((1, layout.width), np.float32), table])
  return table[None]


def _shape_of(sd: Mapping[str, Array], key: str) -> Tuple[int, ...]:
  if key not in sd:
    raise MappingError(f"the state dict has no {key}")
  return tuple(np.shape(sd[key]))


def layout_from_timm(sd: Mapping[str, Array], num_heads: int,
                     grid: Optional[Tuple[int, int]] = None,
                     posemb: str = "auto", qkv_layout: str = "fused") -> VitLayout:
  """The layout of a timm ViT state dict; `grid` defaults to the square grid of `pos_embed`;
  `posemb` "auto" takes MAE's fixed sin-cos table as sincos=True and any other table as learned."""
  if posemb not in POSEMB_KINDS:
    raise MappingError(f"posemb must be one of {POSEMB_KINDS}, got {posemb!r}")
  width, channels, ph, pw = _shape_of(sd, "patch_embed.proj.weight")
  if width % num_heads:
    raise MappingError(f"patch_embed.proj.weight: width {width} is not divisible by {num_heads} "
                       "heads")
  depth = len({int(m.group(1)) for m in map(_BLOCK_KEY.match, sd) if m})
  if depth == 0:
    raise MappingError("the state dict has no blocks.N tensors")
  cls_token = "cls_token" in sd
  pos_len = _shape_of(sd, "pos_embed")[1]
  patches = pos_len - 1 if cls_token and _is_square(pos_len - 1) and not _is_square(pos_len) \
      else pos_len
  if grid is None:
    if not _is_square(patches):
      raise MappingError(f"pos_embed {_shape_of(sd, 'pos_embed')} holds no square grid: give the "
                         "image size")
    grid = (int(round(patches ** 0.5)),) * 2
  grid = tuple(int(g) for g in grid)
  cls_posemb = cls_token and pos_len == grid[0] * grid[1] + 1
  if not cls_posemb and pos_len != grid[0] * grid[1]:
    raise MappingError(f"pos_embed {_shape_of(sd, 'pos_embed')} does not hold a "
                       f"{grid[0]}x{grid[1]} grid")
  head = "head.weight" in sd
  layout = VitLayout(
      width=width, patch=(ph, pw), channels=channels, depth=depth, num_heads=num_heads,
      mlp_dim=_shape_of(sd, "blocks.0.mlp.fc1.weight")[0], grid=grid, cls_token=cls_token,
      sincos=False, cls_posemb=cls_posemb, ln_pre="norm_pre.weight" in sd,
      patch_bias="patch_embed.proj.bias" in sd, layer_scale="blocks.0.ls1.gamma" in sd,
      pooled_norm="fc_norm.weight" in sd,
      num_classes=_shape_of(sd, "head.weight")[0] if head else 0,
      qkv_layout=qkv_layout)
  if posemb == "learned":
    return layout
  is_sincos = (cls_posemb or not cls_token) and _matches_sincos(sd["pos_embed"], layout)
  if posemb == "sincos" and not is_sincos:
    raise MappingError("pos_embed is not the fixed 2-D sin-cos table (zero class row) that "
                       "sincos=True computes: import it with --posemb=learned")
  return dataclasses.replace(layout, sincos=True, cls_posemb=False) if is_sincos else layout


def _is_square(n: int) -> bool:
  return n > 0 and int(round(n ** 0.5)) ** 2 == n


def _matches_sincos(table: Array, layout: VitLayout) -> bool:
  expected = sincos_table(dataclasses.replace(layout, sincos=True))
  table = np.asarray(table, np.float32)
  return table.shape == expected.shape and float(np.max(np.abs(table - expected))) <= SINCOS_ATOL


def layout_from_ours(encoder: Mapping[str, Array], head: Optional[Mapping[str, Array]],
                     grid: Optional[Tuple[int, int]]) -> VitLayout:
  """The layout of our flat `img_encoder` parameters ("a/b/c" keys); `grid` is needed for a
  sin-cos model (it has no table); for a learned table it defaults to the table's square grid."""
  ph, pw, channels, width = _shape_of(encoder, "embedding/kernel")
  attn = f"{BLOCK.format(0)}/{_ATTN}"
  separate = f"{attn}/query/kernel" in encoder
  heads = _shape_of(encoder, f"{attn}/query/kernel" if separate else f"{attn}/qkv_kernel")[-2]
  depth = len({k.split("/")[1] for k in encoder if k.startswith("Transformer/encoderblock_")})
  cls_token = "cls" in encoder
  sincos = "pos_embedding" not in encoder
  cls_posemb = False
  if not sincos:
    pos_len = _shape_of(encoder, "pos_embedding")[1]
    if grid is None:
      patches = pos_len - 1 if cls_token and _is_square(pos_len - 1) else pos_len
      if not _is_square(patches):
        raise MappingError(f"pos_embedding of {pos_len} rows holds no square grid: give the image "
                           "size")
      grid = (int(round(patches ** 0.5)),) * 2
    cls_posemb = cls_token and pos_len == grid[0] * grid[1] + 1
  elif grid is None:
    raise MappingError("the encoder uses fixed sin-cos positions: give the image size")
  num_classes = _shape_of(head, "kernel")[1] if head else 0
  return VitLayout(
      width=width, patch=(ph, pw), channels=channels, depth=depth, num_heads=heads,
      mlp_dim=_shape_of(encoder, f"{BLOCK.format(0)}/MlpBlock_0/Dense_0/kernel")[1],
      grid=tuple(grid), cls_token=cls_token, sincos=sincos, cls_posemb=cls_posemb,
      ln_pre="ln_pre/scale" in encoder, patch_bias="embedding/bias" in encoder,
      layer_scale=f"{BLOCK.format(0)}/layerscale_msa/scale" in encoder,
      pooled_norm="fc_norm/scale" in encoder, num_classes=num_classes,
      qkv_layout="separate" if separate else "fused")


def _pairs(layout: VitLayout):
  """(our key, timm key, to_ours, to_timm) for every tensor of the layout outside the blocks."""
  ident = (lambda x: x, lambda x: x)
  conv = (lambda x: np.transpose(x, (2, 3, 1, 0)), lambda x: np.transpose(x, (3, 2, 0, 1)))
  out = [("embedding/kernel", "patch_embed.proj.weight") + conv]
  if layout.patch_bias:
    out.append(("embedding/bias", "patch_embed.proj.bias") + ident)
  if layout.cls_token:
    out.append(("cls", "cls_token") + ident)
  if not layout.sincos:
    out.append(("pos_embedding", "pos_embed") + ident)
  if layout.ln_pre:
    out += [("ln_pre/scale", "norm_pre.weight") + ident, ("ln_pre/bias", "norm_pre.bias") + ident]
  norm = ("fc_norm", "fc_norm") if layout.pooled_norm else (ENCODER_NORM, "norm")
  out += [(f"{norm[0]}/scale", f"{norm[1]}.weight") + ident,
          (f"{norm[0]}/bias", f"{norm[1]}.bias") + ident]
  return out


def timm_shapes(layout: VitLayout) -> Dict[str, Tuple[int, ...]]:
  """The shape of every timm tensor of a layout (pos_embed only for a learned table)."""
  d, m, (ph, pw) = layout.width, layout.mlp_dim, layout.patch
  shapes = {"patch_embed.proj.weight": (d, layout.channels, ph, pw)}
  vectors = ["patch_embed.proj.bias"] if layout.patch_bias else []
  if layout.cls_token:
    shapes["cls_token"] = (1, 1, d)
  if not layout.sincos:
    shapes["pos_embed"] = (1, layout.grid[0] * layout.grid[1] + int(layout.cls_posemb), d)
  if layout.ln_pre:
    vectors += ["norm_pre.weight", "norm_pre.bias"]
  for n in range(layout.depth):
    b = f"blocks.{n}."
    vectors += [b + name for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                                      "attn.proj.bias", "mlp.fc2.bias")]
    vectors += [b + "ls1.gamma", b + "ls2.gamma"] if layout.layer_scale else []
    shapes.update({b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
                   b + "attn.proj.weight": (d, d), b + "mlp.fc1.weight": (m, d),
                   b + "mlp.fc1.bias": (m,), b + "mlp.fc2.weight": (d, m)})
  norm = "fc_norm" if layout.pooled_norm else "norm"
  vectors += [f"{norm}.weight", f"{norm}.bias"]
  shapes.update({key: (d,) for key in vectors})
  if layout.num_classes:
    shapes.update({"head.weight": (layout.num_classes, d), "head.bias": (layout.num_classes,)})
  return shapes


def attention_to_ours(sd: Mapping[str, Array], n: int, layout: VitLayout) -> Dict[str, Array]:
  d, h, k = layout.width, layout.num_heads, layout.head_dim
  prefix, attn = f"blocks.{n}.attn.", f"{BLOCK.format(n)}/{_ATTN}"
  qkv_w, qkv_b = sd[prefix + "qkv.weight"], sd[prefix + "qkv.bias"]
  proj_w, proj_b = sd[prefix + "proj.weight"], sd[prefix + "proj.bias"]
  kernel = np.transpose(qkv_w).reshape(d, 3, h, k)
  bias = np.reshape(qkv_b, (3, h, k))
  out_kernel = np.transpose(proj_w).reshape(h, k, d)
  if layout.qkv_layout == "fused":
    return {f"{attn}/qkv_kernel": kernel, f"{attn}/qkv_bias": bias,
            f"{attn}/out_kernel": out_kernel, f"{attn}/out_bias": proj_b}
  out = {f"{attn}/out/kernel": out_kernel, f"{attn}/out/bias": proj_b}
  for i, name in enumerate(("query", "key", "value")):
    out[f"{attn}/{name}/kernel"] = kernel[:, i]
    out[f"{attn}/{name}/bias"] = bias[i]
  return out


def attention_to_timm(params: Mapping[str, Array], n: int, layout: VitLayout) -> Dict[str, Array]:
  d = layout.width
  prefix, attn = f"blocks.{n}.attn.", f"{BLOCK.format(n)}/{_ATTN}"
  if layout.qkv_layout == "fused":
    kernel, bias = params[f"{attn}/qkv_kernel"], params[f"{attn}/qkv_bias"]
    out_kernel, out_bias = params[f"{attn}/out_kernel"], params[f"{attn}/out_bias"]
  else:
    names = ("query", "key", "value")
    kernel = np.stack([params[f"{attn}/{name}/kernel"] for name in names], axis=1)
    bias = np.stack([params[f"{attn}/{name}/bias"] for name in names])
    out_kernel, out_bias = params[f"{attn}/out/kernel"], params[f"{attn}/out/bias"]
  return {prefix + "qkv.weight": np.transpose(np.reshape(kernel, (d, 3 * d))),
          prefix + "qkv.bias": np.reshape(bias, (3 * d,)),
          prefix + "proj.weight": np.transpose(np.reshape(out_kernel, (d, d))),
          prefix + "proj.bias": out_bias}


def block_to_ours(sd: Mapping[str, Array], n: int, layout: VitLayout) -> Dict[str, Array]:
  """timm's `blocks.N.*` tensors -> ours under `Transformer/encoderblock_NN/` (any tower)."""
  block, prefix = BLOCK.format(n), f"blocks.{n}."
  out = {f"{block}/{ours}": np.transpose(sd[prefix + theirs]) if transposed else sd[prefix + theirs]
         for ours, theirs, transposed in _BLOCK_PLAIN}
  if layout.layer_scale:
    out.update({f"{block}/{ours}": sd[prefix + theirs] for ours, theirs in _LAYER_SCALE})
  return dict(out, **attention_to_ours(sd, n, layout))


def block_to_timm(params: Mapping[str, Array], n: int, layout: VitLayout) -> Dict[str, Array]:
  """The inverse of `block_to_ours`."""
  block, prefix = BLOCK.format(n), f"blocks.{n}."
  out = {prefix + theirs: np.transpose(params[f"{block}/{ours}"]) if transposed
         else params[f"{block}/{ours}"] for ours, theirs, transposed in _BLOCK_PLAIN}
  if layout.layer_scale:
    out.update({prefix + theirs: params[f"{block}/{ours}"] for ours, theirs in _LAYER_SCALE})
  return dict(out, **attention_to_timm(params, n, layout))


def timm_to_ours(sd: Mapping[str, Array], layout: VitLayout
                 ) -> Tuple[Dict[str, Array], Dict[str, Array]]:
  """A timm state dict -> (our flat img_encoder params, our flat head params or {}); every
  tensor of the state dict must find its place. `sd` holds numpy arrays."""
  expected = set(timm_shapes(layout))
  if layout.sincos:
    expected.add("pos_embed")  # checked by layout_from_timm, recomputed by the model
  _check_keys(set(sd), expected, "the state dict")
  misshaped = [misfit.shape_mismatch(key, np.shape(sd[key]), shape)
               for key, shape in sorted(timm_shapes(layout).items())
               if tuple(np.shape(sd[key])) != shape]
  _check_keys(set(sd), set(sd), "the state dict", misshaped=misshaped,
              target="the layout read off patch_embed, blocks.0 and pos_embed")
  encoder = {ours: to_ours(np.asarray(sd[theirs])) for ours, theirs, to_ours, _ in _pairs(layout)}
  for n in range(layout.depth):
    encoder.update(block_to_ours(sd, n, layout))
  head = {}
  if layout.num_classes:
    head = {"kernel": np.transpose(sd["head.weight"]), "bias": np.asarray(sd["head.bias"])}
  return encoder, head


def ours_to_timm(encoder: Mapping[str, Array], head: Optional[Mapping[str, Array]],
                 layout: VitLayout) -> Dict[str, Array]:
  """Our flat img_encoder (and head) params -> a timm VisionTransformer state dict (numpy)."""
  headless = dataclasses.replace(layout, num_classes=0)
  zeros = {key: np.zeros(shape, np.float32) for key, shape in timm_shapes(headless).items()}
  expected = set(timm_to_ours(dict(zeros, **({"pos_embed": 0} if layout.sincos else {})),
                              headless)[0])
  _check_keys(set(encoder), expected, "the img_encoder parameter tree")
  sd = {theirs: np.ascontiguousarray(to_timm(np.asarray(encoder[ours])))
        for ours, theirs, _, to_timm in _pairs(layout)}
  for n in range(layout.depth):
    sd.update(block_to_timm(encoder, n, layout))
  if layout.sincos:
    sd["pos_embed"] = sincos_table(layout)
  if head:
    sd["head.weight"] = np.ascontiguousarray(np.transpose(head["kernel"]))
    sd["head.bias"] = np.asarray(head["bias"])
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def _check_keys(present: set, expected: set, what: str, misshaped=(),
                target: str = "the ViT layout") -> None:
  line = misfit.misfit_line(what, target, missing=sorted(expected - present),
                            extra=sorted(present - expected), misshaped=misshaped)
  if line:
    raise MappingError(line)


def vit_fields(layout: VitLayout, pool: str, gelu: str = "exact",
               layernorm_epsilon: float = 1e-6) -> Dict[str, Any]:
  """Our `VisionTransformer` fields (and their `model.model_img` config keys) for a layout."""
  fields = dict(
      num_layers=layout.depth, num_heads=layout.num_heads, mlp_dim=layout.mlp_dim,
      patch_size=tuple(layout.patch), hidden_size=layout.width, sincos=layout.sincos,
      use_cls_token=layout.cls_token, pool=pool, gelu=gelu, layernorm_epsilon=layernorm_epsilon,
      qkv_layout=layout.qkv_layout, cls_posemb=layout.cls_posemb, ln_pre=layout.ln_pre,
      patch_bias=layout.patch_bias, pooled_norm=layout.pooled_norm,
      layer_scale_init=DEFAULT_LAYER_SCALE_INIT if layout.layer_scale else None)
  return fields


def timm_kwargs(layout: VitLayout, pool: str, gelu: str = "exact",
                layernorm_epsilon: float = 1e-6) -> Dict[str, Any]:
  """`timm.create_model(name, pretrained=False, **kwargs)` arguments building the same ViT."""
  if pool not in TIMM_POOL:
    raise MappingError(f"timm has no global pool for our pool {pool!r} (one of {tuple(TIMM_POOL)})")
  if layernorm_epsilon != 1e-6:
    raise MappingError(f"timm's VisionTransformer uses LayerNorm epsilon 1e-6, the model "
                       f"{layernorm_epsilon}")
  if layout.patch_bias == layout.ln_pre:
    raise MappingError("timm's VisionTransformer has a patch bias exactly when it has no pre-norm; "
                       f"the model has patch_bias={layout.patch_bias}, ln_pre={layout.ln_pre}")
  if int(layout.width * (layout.mlp_dim / layout.width)) != layout.mlp_dim:
    raise MappingError(f"timm's mlp_ratio cannot express mlp_dim {layout.mlp_dim} at width "
                       f"{layout.width}")
  return dict(
      img_size=[layout.grid[0] * layout.patch[0], layout.grid[1] * layout.patch[1]],
      patch_size=list(layout.patch), in_chans=layout.channels, embed_dim=layout.width,
      depth=layout.depth, num_heads=layout.num_heads, mlp_ratio=layout.mlp_dim / layout.width,
      qkv_bias=True, class_token=layout.cls_token,
      no_embed_class=layout.cls_token and not (layout.sincos or layout.cls_posemb),
      global_pool=TIMM_POOL[pool], fc_norm=layout.pooled_norm,
      init_values=DEFAULT_LAYER_SCALE_INIT if layout.layer_scale else None,
      pre_norm=layout.ln_pre, num_classes=layout.num_classes,
      act_layer=TIMM_ACT[gelu])
