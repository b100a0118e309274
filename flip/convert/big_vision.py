"""Import of big_vision ViT checkpoints (`.npz`) as a `pretrain_dir`: the image tower.

    python -m flip.convert.big_vision --src=<checkpoint.npz> --dst=<new dir> [--image_size=N]
        [--qkv_layout=separate|fused]

big_vision's ViT (`big_vision/models/vit.py`) is the model our tower was written after: its
parameter names are ours but for the attention module, so the mapping is nearly the identity
(`<b>` = `Transformer/encoderblock_NN`; big_vision's scanned layout `Transformer/encoderblock/...`
with a leading depth axis is split into blocks first):
  embedding/{kernel [p, p, C, D], bias}, cls [1, 1, D] -> the same names
  pos_embedding [1, N, D] (learned; the class token gets none) -> pos_embedding (sincos=False)
  no pos_embedding (posemb="sincos2d", computed): big_vision's table (sin x, cos x, sin y, cos y
      with omega = 1 / 10000 ** (i / (D/4 - 1)), not our MAE/FLIP table) -> pos_embedding, learned
  <b>/MultiHeadDotProductAttention_0/{query,key,value}/{kernel [D, H, K], bias [H, K]},
      out/{kernel [H, K, D], bias} -> <b>/MultiHeadSelfAttention_0/... ("separate"; "fused"
      stacks them into qkv_kernel [D, 3, H, K], qkv_bias, out_kernel, out_bias)
  <b>/{LayerNorm_0, LayerNorm_1, MlpBlock_0/Dense_0, MlpBlock_0/Dense_1}, Transformer/encoder_norm
      -> the same names
  head/{kernel, bias} of a classification ViT -> head/... (beside img_encoder)
Pooling: `pool_type="gap"` (no class token) -> our pool "avg"; "tok" -> "cls". GELU: flax's
default tanh approximation. The tensors are looked up under `params/img/` (a two-tower
checkpoint), `params/`, `img/` or the top level.

What does not fit: a two-tower checkpoint's text tower (`params/txt/...`: big_vision pools it with
"last", the last position of the padded sequence, or a MAP head, and tokenizes with SentencePiece
models; our text tower pools "first" / "avg" / "eot" with BERT's or CLIP's tokenizer), its
`params/t` / `params/b` (SigLIP's sigmoid-loss temperature and bias; our FLIP model has a softmax
logit scale only) and its image projection `params/img/head` (ours sits in the FLIP model as
`img_proj`, which needs the text tower beside it): those are left out and listed in the sidecar.
MAP-head pooling (`MAPHead_0`, SigLIP's image tower) and `pre_logits` have no place (one line).
"""

import argparse
import io
import re
import sys
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from flip import paths
from flip import process_setup
from flip.convert import timm_mapping
from flip.convert import timm_vit

PREFIXES = ("params/img/", "params/", "img/", "")
TWO_TOWER_PREFIX = "params/img/"
SCANNED = "Transformer/encoderblock/"
_BIG_VISION_ATTN = "MultiHeadDotProductAttention_0/"
_OUR_ATTN = "MultiHeadSelfAttention_0/"
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/")
POOLS = {"gap": "avg", "tok": "cls"}


def read_npz(src: str) -> Dict[str, np.ndarray]:
  """An .npz file -> {name: array} (no pickles)."""
  if not paths.exists(src):
    raise timm_vit.ConversionError(f"--src {src} does not exist")
  try:
    with np.load(io.BytesIO(paths.read_bytes(src)), allow_pickle=False) as data:
      return {key: np.asarray(data[key]) for key in data.files}
  except (OSError, ValueError) as err:
    raise timm_vit.ConversionError(f"{src} is not a readable .npz file: "
                                   f"{' '.join(str(err).split())[:200]}") from None


def find_prefix(arrays: Mapping[str, np.ndarray]) -> str:
  for prefix in PREFIXES:
    if f"{prefix}embedding/kernel" in arrays:
      return prefix
  raise timm_vit.ConversionError("no embedding/kernel under any of "
                                 f"{', '.join(repr(p) for p in PREFIXES)}: not a big_vision ViT")


def big_vision_sincos(grid: Tuple[int, int], width: int, temperature: float = 10000.0
                      ) -> np.ndarray:
  """big_vision's `posemb_sincos_2d` [1, gh*gw, D] (float32)."""
  if width % 4:
    raise timm_vit.ConversionError(f"sincos2d needs a width divisible by 4, got {width}")
  y, x = np.mgrid[:grid[0], :grid[1]]
  omega = np.arange(width // 4) / (width // 4 - 1)
  omega = 1.0 / temperature ** omega
  y = np.einsum("m,d->md", y.reshape(-1), omega)
  x = np.einsum("m,d->md", x.reshape(-1), omega)
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None].astype(
      np.float32)


def unscan(tree: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Scanned blocks (`Transformer/encoderblock/...` [depth, ...]) -> encoderblock_NN tensors."""
  out = {k: v for k, v in tree.items() if not k.startswith(SCANNED)}
  scanned = {k[len(SCANNED):]: v for k, v in tree.items() if k.startswith(SCANNED)}
  depths = {v.shape[0] for v in scanned.values()}
  if len(depths) > 1:
    raise timm_vit.ConversionError(f"scanned blocks of different depths {sorted(depths)}")
  for leaf, value in scanned.items():
    for n in range(value.shape[0]):
      out[f"{timm_mapping.BLOCK.format(n)}/{leaf}"] = value[n]
  return out


def to_ours(tree: Mapping[str, np.ndarray], qkv_layout: str) -> Dict[str, np.ndarray]:
  """big_vision names (under the prefix, blocks unscanned) -> our flat img_encoder names."""
  out = {}
  for key, value in tree.items():
    match = _BLOCK.match(key)
    if match:
      key = timm_mapping.BLOCK.format(int(match.group(1))) + "/" + key[match.end():]
    out[key.replace(_BIG_VISION_ATTN, _OUR_ATTN)] = value
  if qkv_layout == "fused":
    for key in [k for k in out if k.endswith(_OUR_ATTN + "query/kernel")]:
      attn = key[:-len("query/kernel")]
      names = ("query", "key", "value")
      out[attn + "qkv_kernel"] = np.stack([out.pop(f"{attn}{n}/kernel") for n in names], axis=1)
      out[attn + "qkv_bias"] = np.stack([out.pop(f"{attn}{n}/bias") for n in names])
      out[attn + "out_kernel"] = out.pop(attn + "out/kernel")
      out[attn + "out_bias"] = out.pop(attn + "out/bias")
  return out


def convert(arrays: Mapping[str, np.ndarray], image_size: Optional[int] = None,
            qkv_layout: str = "separate"):
  """big_vision arrays -> (timm_vit.Imported, the names left out)."""
  prefix = find_prefix(arrays)
  tree = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
  left_out = sorted(k for k in arrays if not k.startswith(prefix))
  head = {}
  for leaf in ("kernel", "bias"):
    if f"head/{leaf}" in tree:
      value = tree.pop(f"head/{leaf}")
      if prefix == TWO_TOWER_PREFIX:
        left_out.append(f"{prefix}head/{leaf}")
      else:
        head[leaf] = value
  encoder = to_ours(unscan(tree), qkv_layout)
  if "pos_embedding" not in encoder:
    if image_size is None:
      raise timm_vit.ConversionError("the checkpoint computes its sin-cos positions: give "
                                     "--image_size")
    patch = encoder["embedding/kernel"].shape[0]
    encoder["pos_embedding"] = big_vision_sincos((image_size // patch,) * 2,
                                                 encoder["embedding/kernel"].shape[-1])
  try:
    layout = timm_mapping.layout_from_ours(encoder, head, None)
    timm_mapping.ours_to_timm(encoder, head, layout)  # every tensor has its place
  except (timm_mapping.MappingError, KeyError, ValueError) as err:
    raise timm_vit.ConversionError(f"{prefix}...: {err}") from None
  pool = "cls" if layout.cls_token else "avg"
  imported = timm_vit.fit_encoder(encoder, head, layout, image_size, pool, "tanh", 1e-6)
  return imported, sorted(left_out)


def run(src: str, dst: str, image_size: Optional[int] = None,
        qkv_layout: str = "separate") -> str:
  timm_vit.check_empty_dst(dst)
  imported, left_out = convert(read_npz(src), image_size, qkv_layout)
  return timm_vit.write_import(dst, imported, {"src": src, "not_converted": left_out})


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m flip.convert.big_vision",
                                   description="big_vision ViT .npz -> pretrain_dir")
  parser.add_argument("--src", required=True, help="big_vision checkpoint (.npz)")
  parser.add_argument("--dst", required=True, help="a new (empty) directory")
  parser.add_argument("--image_size", type=int, help="target image size (default: the source's)")
  parser.add_argument("--qkv_layout", default="separate", choices=("separate", "fused"))
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  process_setup.configure_process()
  try:
    out = run(args.src, args.dst, args.image_size, args.qkv_layout)
  except timm_vit.ConversionError as err:
    print(f"flip.convert.big_vision: {err}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {out}; the --config overrides are in {paths.join(args.dst, timm_vit.SIDECAR)}")


if __name__ == "__main__":
  main()
