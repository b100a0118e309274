"""Import of FLIP's released checkpoints (facebookresearch/flip, t5x layout) as a `pretrain_dir`.

    python -m flip.convert.flip_t5x --src=<FLIP checkpoint> --dst=<new dir> \
        [--config=configs/cfg_flip_large.py]

FLIP's released ViT-L/16 and ViT-H/14 weights are zip archives of a t5x checkpoint directory (a
msgpack `checkpoint` file and tensorstore arrays, the layout FLIP's own `restore_checkpoint` reads);
`--src` is that directory, a directory holding `checkpoint_<step>` directories, or the zip itself.
`--config` names the model the weights are for (our FLIP configs are FLIP's sizes; for the H/14
weights pass configs/cfg_flip_huge14.py): it gives the head counts, which the weights alone do not
(FLIP stores every attention kernel flattened to [embed, heads * head_dim]).
`--dst` receives a t5x checkpoint (`checkpoint_0`) holding only parameters, in our layout:
`--config.pretrain_dir=<dst>` loads it for unmasked tuning, and with `--config.eval_only=True`
evaluates it.

Where each tensor of FLIP's `target` goes (FLIP name -> ours; `<tower>` is img_encoder or
txt_encoder, `<block>` is Transformer/encoderblock_NN):
  <tower>/<block>/MultiHeadDotProductAttention_0/{query,key,value}/kernel [D, H*K]
      -> <tower>/<block>/MultiHeadSelfAttention_0/{query,key,value}/kernel [D, H, K]
  .../{query,key,value}/bias [H*K] -> [H, K];  .../out/kernel [H*K, D] -> [H, K, D];
  .../out/bias [D] unchanged
  every other <tower>/Transformer/... tensor (LayerNorm_0/1, MlpBlock_0/Dense_0/1, encoder_norm)
      -> the same name
  img_encoder/embedding/{kernel,bias}, img_encoder/cls -> the same names
  img_encoder/posembed_encoder/pos_embedding [1, 1+N, D]: FLIP's fixed sin-cos table (a parameter
      FLIP never trains, row 0 for the class token unused); ours is computed, so the tensor is
      checked against our table (it must match) instead of being copied; with a learned image
      position embedding (sincos=False) its patch rows go to img_encoder/pos_embedding
  txt_encoder/token_embedding/embedding [V, D] -> txt_encoder/token_embedding, zero rows
      appended up to our padded row count (ids >= V never occur)
  txt_encoder/posembed_encoder/pos_embedding -> txt_encoder/pos_embedding
  img_mlp1/kernel, txt_mlp1/kernel (and bias) -> img_proj/..., txt_proj/...
  logit_scale [1] -> logit_scale [1]
FLIP's optimizer state (`state`) is not imported. A FLIP tensor without a place, a model parameter
that nothing fills, or a wrong shape is reported in one line naming the keys (exit 2).
"""

import argparse
import os
import re
import sys
import tempfile
import zipfile
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax
from flax import traverse_util
import jax
import numpy as np
import optax
from t5x import checkpoint_importer as t5x_importer
from t5x import checkpoints as t5x_checkpoints
from t5x import optimizers as t5x_optimizers
from t5x import train_state as t5x_train_state

from flip import checkpoints
from flip import compat
from flip import misfit
from flip import config as config_lib
from flip import partitioning
from flip import paths
from flip import process_setup
from flip.models import flip as flip_lib
from flip.models import layers

DEFAULT_CONFIG = "configs/cfg_flip_large.py"
# FLIP's sin-cos table is float32 numpy; ours is computed in float32 by XLA.
SINCOS_ATOL = 1e-5

_ATTENTION = re.compile(
    r"^(?P<tower>img_encoder|txt_encoder)/Transformer/(?P<block>encoderblock_\d+)/"
    r"MultiHeadDotProductAttention_0/(?P<proj>query|key|value|out)/(?P<leaf>kernel|bias)$")
_RENAMES = {
    "txt_encoder/token_embedding/embedding": "txt_encoder/token_embedding",
    "txt_encoder/posembed_encoder/pos_embedding": "txt_encoder/pos_embedding",
    "img_mlp1/kernel": "img_proj/kernel",
    "img_mlp1/bias": "img_proj/bias",
    "txt_mlp1/kernel": "txt_proj/kernel",
    "txt_mlp1/bias": "txt_proj/bias",
}
IMG_POSEMB = "img_encoder/posembed_encoder/pos_embedding"
TOKEN_TABLE = "txt_encoder/token_embedding"


class ConversionError(ValueError):
  """A FLIP checkpoint that does not fit the model, in one line naming the keys."""


def flip_sincos_table(grid: Tuple[int, int], width: int) -> np.ndarray:
  """FLIP's stored image position table [1, 1 + gh*gw, D]: a zero row, then our sin-cos table."""
  table = np.asarray(layers.sincos_2d(grid[0], grid[1], width), np.float32)
  return np.concatenate([np.zeros((1, width), np.float32), table])[None]


def _place(key: str, value: np.ndarray, target: Mapping[str, Any], model: flip_lib.FlipModel,
           image_size: int) -> Tuple[str, Any]:
  """(our key, value) for one FLIP tensor; our key None: checked and consumed, nothing stored."""
  match = _ATTENTION.match(key)
  if match:
    ours = (f"{match['tower']}/Transformer/{match['block']}/MultiHeadSelfAttention_0/"
            f"{match['proj']}/{match['leaf']}")
    want = target.get(ours)
    if want is not None and value.size == int(np.prod(want.shape)):
      value = value.reshape(want.shape)
    return ours, value
  if key == IMG_POSEMB:
    img = model.img
    grid = (image_size // img["patch_size"][0], image_size // img["patch_size"][1])
    if not img["sincos"]:
      return "img_encoder/pos_embedding", value[:, 1:]
    expected = flip_sincos_table(grid, img["hidden_size"])
    if value.shape != expected.shape:
      raise ConversionError(f"{key} has shape {value.shape}, the model's fixed sin-cos table for a "
                            f"{grid[0]}x{grid[1]} grid with a class token is {expected.shape}")
    worst = float(np.max(np.abs(value.astype(np.float32) - expected)))
    if worst > SINCOS_ATOL:
      raise ConversionError(f"{key} is not the fixed 2-D sin-cos table the model computes (max "
                            f"|difference| {worst:.3g}): it was not trained with sincos=True")
    return None, None
  ours = _RENAMES.get(key, key)
  if ours == TOKEN_TABLE and ours in target:
    rows = target[ours].shape[0]
    if value.ndim == 2 and value.shape[0] < rows and value.shape[1] == target[ours].shape[1]:
      value = np.concatenate([value, np.zeros((rows - value.shape[0], value.shape[1]),
                                              value.dtype)])
  return ours, value


def convert_params(flip_target: Mapping[str, Any], model: flip_lib.FlipModel,
                   image_size: int, target_shapes: Mapping[str, Any]) -> Dict[str, Any]:
  """FLIP's `target` tree (numpy) -> our parameter tree for `model`, checked key by key."""
  flat_target = traverse_util.flatten_dict(flax.core.unfreeze(target_shapes), sep="/")
  flat_flip = traverse_util.flatten_dict(dict(flip_target), sep="/")
  converted, sources = {}, {}
  for key in sorted(flat_flip):
    ours, value = _place(key, np.asarray(flat_flip[key]), flat_target, model, image_size)
    if ours is None:
      continue
    if ours in converted:
      raise ConversionError(f"{key} and {sources[ours]} both map to {ours}")
    converted[ours], sources[ours] = value, key
  missing = sorted(set(flat_target) - set(converted))
  extra = sorted(sources[k] for k in set(converted) - set(flat_target))
  misshaped = [misfit.shape_mismatch(sources[k], converted[k].shape, flat_target[k].shape, k)
               for k in sorted(set(converted) & set(flat_target))
               if tuple(converted[k].shape) != tuple(flat_target[k].shape)]
  line = misfit.misfit_line("the FLIP checkpoint", "the model", missing=missing, extra=extra,
                            misshaped=misshaped)
  if line:
    raise ConversionError(line)
  return traverse_util.unflatten_dict(
      {k: v.astype(flat_target[k].dtype) for k, v in converted.items()}, sep="/")


def read_flip_target(src: str) -> Dict[str, Any]:
  """The `target` (parameters) of FLIP's t5x checkpoint as numpy (optimizer state not read)."""
  ckpt_dir = checkpoints.find_checkpoint_dir(src)
  contents = t5x_checkpoints.load_t5x_checkpoint(ckpt_dir, lazy_parameters=True)
  if "target" not in contents:
    raise ConversionError(f"{ckpt_dir} holds no parameters ('target' missing)")

  def materialise(x):
    if isinstance(x, t5x_importer.LazyArray):
      x = x.get()
    return np.asarray(x)

  return jax.tree.map(materialise, contents["target"])


def model_and_shapes(config: Any) -> Tuple[flip_lib.FlipModel, Dict[str, Any], Dict[str, Any]]:
  """The FLIP model of `config`, its parameter shapes and their logical axes (no compute)."""
  model = flip_lib.flip_model_from_config(config)
  images = np.zeros((1, config.image_size, config.image_size, 3), np.uint8)
  tokens = np.ones((1, config.aug.txt.max_len), np.int32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, tokens,
                                                train=False, mask_ratio=0.0))
  return model, variables["params"], variables["params_axes"]


def write_params_checkpoint(dst: str, params: Mapping[str, Any], params_axes: Any) -> str:
  """`params` as a step-0 t5x checkpoint in `dst` (no optimizer state); returns its directory."""
  state = t5x_train_state.FlaxOptimTrainState.create(
      t5x_optimizers.OptaxWrapper(optax.identity()),
      {"params": flax.core.freeze(params), "params_axes": params_axes})
  state = state.replace_step(np.asarray(0, np.int32))
  partitioner = partitioning.FlipPjitPartitioner(num_partitions=1)
  t5x_checkpoints.Checkpointer(state, partitioner, dst).save(state)
  return paths.join(dst, compat.t5x_checkpoint_dir_name(0))


def convert(src: str, dst: str, config: Any) -> str:
  """FLIP checkpoint `src` -> our parameter checkpoint in `dst`; returns its directory."""
  if paths.exists(dst) and paths.listdir(dst):
    raise ConversionError(f"--dst {dst} is not empty")
  if not paths.exists(src):
    raise ConversionError(f"--src {src} does not exist")
  model, shapes, axes = model_and_shapes(config)
  with tempfile.TemporaryDirectory() as tmp:
    if not paths.isdir(src):
      with paths.open_file(src, "rb") as f:  # local or gs://: zipfile needs a seekable file
        if not zipfile.is_zipfile(f):
          raise ConversionError(f"--src {src} is neither a checkpoint directory nor a zip")
        with zipfile.ZipFile(f) as archive:
          archive.extractall(tmp)
      src = _directory_with_checkpoint(tmp)
    params = convert_params(read_flip_target(src), model, config.image_size, shapes)
  return write_params_checkpoint(dst, params, axes)


def _directory_with_checkpoint(root: str) -> str:
  for directory, _, files in sorted(os.walk(root)):
    if compat.T5X_CHECKPOINT_FILE in files:
      return directory
  raise ConversionError(f"the archive holds no t5x '{compat.T5X_CHECKPOINT_FILE}' file")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m flip.convert.flip_t5x",
                                   description="FLIP's released t5x checkpoint -> a pretrain_dir")
  parser.add_argument("--src", required=True, help="FLIP's checkpoint: directory or zip")
  parser.add_argument("--dst", required=True, help="new directory for the converted checkpoint")
  parser.add_argument("--config", default=DEFAULT_CONFIG,
                      help="our FLIP config of the same model size")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
  args = _parser().parse_args(argv)
  process_setup.configure_process()
  try:
    config = config_lib.load_config(args.config)
    out = convert(args.src, args.dst, config)
  except (ConversionError, checkpoints.CheckpointError, config_lib.ConfigError) as err:
    print(f"flip.convert.flip_t5x: {err}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {out}; use it as --config.pretrain_dir={args.dst} with --config={args.config}")


if __name__ == "__main__":
  main()
