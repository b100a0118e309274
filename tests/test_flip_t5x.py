"""FLIP's released checkpoint layout -> flip.convert.flip_t5x -> our model: the same function.

The checkpoint is built here from the names and shapes FLIP's model defines (facebookresearch/flip
models_flip.py and its t5x/layers.py: t5x's DenseGeneral stores every attention kernel flattened
to [embed, heads * head_dim], LayerNorms have a scale and a bias, the image position table is a
stored [1, 1 + N, D] sin-cos table with a zero row for the class token, the text token table has
exactly vocab_size rows), with random values, and written by t5x's Checkpointer with an AdamW
state, as FLIP's training wrote its checkpoints. The reference is an independent float64 numpy
forward pass of FLIP's architecture written from FLIP's code: class token without position
embedding, tanh GELU (flax's nn.gelu default), image features the mean of all tokens, text
features the first token with no attention mask, projections without bias, z / (|z| + 1e-8).
"""

import math
import os
import subprocess
import sys

import flax
from flax import traverse_util
from flax.linen import partitioning as nn_partitioning
import jax
import numpy as np
import optax
import pytest
from t5x import checkpoints as t5x_checkpoints
from t5x import optimizers as t5x_optimizers
from t5x import partitioning as t5x_partitioning
from t5x import train_state as t5x_train_state

from flip import checkpoints
from flip import config as config_lib
from flip.convert import flip_t5x

IMG_HEADS, TXT_HEADS = 4, 2
VOCAB = 100
MAX_LEN = 8
OVERRIDES = [f"model.model_img.transformer.num_heads={IMG_HEADS}",
             f"model.model_txt.transformer.num_heads={TXT_HEADS}",
             f"model.model_txt.vocab_size={VOCAB}", f"aug.txt.max_len={MAX_LEN}"]
CONFIG = "configs/cfg_flip_large.py:smoke"
MEAN_RGB = np.array([0.485, 0.456, 0.406]) * 255  # FLIP utils/transform_util.py
STD_RGB = np.array([0.229, 0.224, 0.225]) * 255
# float32 forward vs the float64 reference.
ATOL = 1e-5


def small_config():
  return config_lib.load_config(CONFIG, OVERRIDES)


# --- FLIP's layout, from FLIP's code --------------------------------------------------------------


def flip_sincos(width, grid):
  """FLIP's utils/posembed_util.get_2d_sincos_pos_embed(width, grid, cls_token=True), in numpy."""
  def one_dim(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
  emb = np.concatenate([one_dim(width // 2, gw), one_dim(width // 2, gh)], axis=1)
  return np.concatenate([np.zeros((1, width)), emb])[None].astype(np.float32)


def flip_tower_params(rng, width, depth, mlp):
  """FLIP's Encoder: encoderblock_NN (LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
  MlpBlock_0) and encoder_norm; with t5x's logical axes."""
  params, axes = {}, {}

  def put(path, shape, names, scale=0.2, offset=0.0):
    params[path] = (offset + scale * rng.standard_normal(shape)).astype(np.float32)
    axes[path] = names

  for layer in range(depth):
    block = f"Transformer/encoderblock_{layer:02d}"
    for norm in ("LayerNorm_0", "LayerNorm_1"):
      put(f"{block}/{norm}/scale", (width,), ("embed",), 0.1, 1.0)
      put(f"{block}/{norm}/bias", (width,), ("embed",), 0.1)
    for proj in ("query", "key", "value"):
      put(f"{block}/MultiHeadDotProductAttention_0/{proj}/kernel", (width, width),
          ("embed", "joined_kv"), 1.0 / math.sqrt(width))
      put(f"{block}/MultiHeadDotProductAttention_0/{proj}/bias", (width,), ("joined_kv",), 0.1)
    put(f"{block}/MultiHeadDotProductAttention_0/out/kernel", (width, width),
        ("joined_kv", "embed"), 1.0 / math.sqrt(width))
    put(f"{block}/MultiHeadDotProductAttention_0/out/bias", (width,), ("embed",), 0.1)
    put(f"{block}/MlpBlock_0/Dense_0/kernel", (width, mlp), ("embed", "mlp"), 1 / math.sqrt(width))
    put(f"{block}/MlpBlock_0/Dense_0/bias", (mlp,), ("mlp",), 0.1)
    put(f"{block}/MlpBlock_0/Dense_1/kernel", (mlp, width), ("mlp", "embed"), 1 / math.sqrt(mlp))
    put(f"{block}/MlpBlock_0/Dense_1/bias", (width,), ("embed",), 0.1)
  put("Transformer/encoder_norm/scale", (width,), ("embed",), 0.1, 1.0)
  put("Transformer/encoder_norm/bias", (width,), ("embed",), 0.1)
  return params, axes


def flip_layout(config, seed=0):
  """{flat name: array} and {flat name: logical axes} of FLIP's FLIP module for `config`'s sizes."""
  rng = np.random.default_rng(seed)
  img, txt = config.model.model_img, config.model.model_txt
  patch, width = img.patches.size[0], img.hidden_size
  grid = config.image_size // patch
  params, axes = {}, {}
  tower, tower_axes = flip_tower_params(rng, width, img.transformer.num_layers,
                                        img.transformer.mlp_dim)
  params.update({f"img_encoder/{k}": v for k, v in tower.items()})
  axes.update({f"img_encoder/{k}": v for k, v in tower_axes.items()})
  params["img_encoder/embedding/kernel"] = (
      rng.standard_normal((patch, patch, 3, width)) / math.sqrt(patch * patch * 3)
  ).astype(np.float32)
  axes["img_encoder/embedding/kernel"] = ("_null0", "_null1", "_null2", "embed")
  params["img_encoder/embedding/bias"] = (0.1 * rng.standard_normal(width)).astype(np.float32)
  axes["img_encoder/embedding/bias"] = ("embed",)
  params["img_encoder/posembed_encoder/pos_embedding"] = flip_sincos(width, grid)
  axes["img_encoder/posembed_encoder/pos_embedding"] = ("_null0", "length", "embed")
  params["img_encoder/cls"] = rng.standard_normal((1, 1, width)).astype(np.float32)
  axes["img_encoder/cls"] = ("_null0", "_null1", "embed")

  twidth = txt.hidden_size
  tower, tower_axes = flip_tower_params(rng, twidth, txt.transformer.num_layers,
                                        txt.transformer.mlp_dim)
  params.update({f"txt_encoder/{k}": v for k, v in tower.items()})
  axes.update({f"txt_encoder/{k}": v for k, v in tower_axes.items()})
  params["txt_encoder/token_embedding/embedding"] = rng.standard_normal(
      (txt.vocab_size, twidth)).astype(np.float32)
  axes["txt_encoder/token_embedding/embedding"] = ("classes", "embed")
  params["txt_encoder/posembed_encoder/pos_embedding"] = (
      0.5 * rng.standard_normal((1, config.aug.txt.max_len, twidth))).astype(np.float32)
  axes["txt_encoder/posembed_encoder/pos_embedding"] = ("_null0", "length", "embed")

  proj = config.model.clr.proj_dim_out
  params["img_mlp1/kernel"] = (rng.standard_normal((width, proj)) / math.sqrt(width)).astype(
      np.float32)
  params["txt_mlp1/kernel"] = (rng.standard_normal((twidth, proj)) / math.sqrt(twidth)).astype(
      np.float32)
  axes["img_mlp1/kernel"] = axes["txt_mlp1/kernel"] = ("_null0", "_null1")
  params["logit_scale"] = np.array([math.log(1 / 0.05)], np.float32)
  axes["logit_scale"] = ("_null0",)
  return params, axes


def write_flip_checkpoint(workdir, flat_params, flat_axes, step=1000):
  """A t5x checkpoint of FLIP's parameters with an AdamW state, as FLIP's training writes one."""
  params = traverse_util.unflatten_dict(flat_params, sep="/")
  axes = traverse_util.unflatten_dict(
      {k + "_axes": nn_partitioning.AxisMetadata(names=v) for k, v in flat_axes.items()}, sep="/")
  state = t5x_train_state.FlaxOptimTrainState.create(
      t5x_optimizers.OptaxWrapper(optax.adamw(1e-3)),
      {"params": flax.core.freeze(params), "params_axes": flax.core.freeze(axes)})
  state = state.replace_step(np.asarray(step, np.int32))
  rules = list(t5x_partitioning.standard_logical_axis_rules()) + [
      ("_null0", None), ("_null1", None), ("_null2", None), ("classes", None)]
  partitioner = t5x_partitioning.PjitPartitioner(num_partitions=1, logical_axis_rules=rules)
  t5x_checkpoints.Checkpointer(state, partitioner, workdir).save(state)
  return os.path.join(workdir, f"checkpoint_{step}")


# --- FLIP's forward pass in float64 numpy ---------------------------------------------------------


def layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def flip_encoder(p, prefix, x, heads, depth):
  """FLIP's Encoder (pre-norm blocks, no mask) on x [B, L, D], float64."""
  g = lambda name: p[f"{prefix}/{name}"].astype(np.float64)
  b, length, width = x.shape
  head_dim = width // heads
  for layer in range(depth):
    blk = f"Transformer/encoderblock_{layer:02d}"
    att = f"{blk}/MultiHeadDotProductAttention_0"
    y = layer_norm(x, g(f"{blk}/LayerNorm_0/scale"), g(f"{blk}/LayerNorm_0/bias"))
    q, k, v = ((y @ g(f"{att}/{n}/kernel") + g(f"{att}/{n}/bias")).reshape(
        b, length, heads, head_dim) for n in ("query", "key", "value"))
    weights = softmax(np.einsum("bqhd,bkhd->bhqk", q / math.sqrt(head_dim), k))
    attended = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, width)
    x = x + attended @ g(f"{att}/out/kernel") + g(f"{att}/out/bias")
    y = layer_norm(x, g(f"{blk}/LayerNorm_1/scale"), g(f"{blk}/LayerNorm_1/bias"))
    mlp = f"{blk}/MlpBlock_0"
    hidden = gelu_tanh(y @ g(f"{mlp}/Dense_0/kernel") + g(f"{mlp}/Dense_0/bias"))
    x = x + hidden @ g(f"{blk}/MlpBlock_0/Dense_1/kernel") + g(f"{blk}/MlpBlock_0/Dense_1/bias")
  return layer_norm(x, g("Transformer/encoder_norm/scale"), g("Transformer/encoder_norm/bias"))


def flip_reference(p, config, images, tokens):
  """FLIP's zero-shot forward (train=False: no masking): normalised image and text embeddings
  and the clipped log logit scale."""
  img, txt = config.model.model_img, config.model.model_txt
  patch = img.patches.size[0]
  x = (images.astype(np.float64) - MEAN_RGB) / STD_RGB
  b, h, w, c = x.shape
  gh, gw = h // patch, w // patch
  patches = x.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
  kernel = p["img_encoder/embedding/kernel"].astype(np.float64)
  z = np.einsum("bijpqc,pqcd->bijd", patches, kernel).reshape(b, gh * gw, -1)
  z = z + p["img_encoder/embedding/bias"]
  z = z + p["img_encoder/posembed_encoder/pos_embedding"][:, 1:].astype(np.float64)
  cls = np.broadcast_to(p["img_encoder/cls"].astype(np.float64), (b, 1, z.shape[-1]))
  z = flip_encoder(p, "img_encoder", np.concatenate([cls, z], axis=1), img.transformer.num_heads,
                   img.transformer.num_layers)
  z_img = z.mean(axis=1) @ p["img_mlp1/kernel"].astype(np.float64)

  t = p["txt_encoder/token_embedding/embedding"].astype(np.float64)[tokens]
  t = t + p["txt_encoder/posembed_encoder/pos_embedding"].astype(np.float64)
  t = flip_encoder(p, "txt_encoder", t, txt.transformer.num_heads, txt.transformer.num_layers)
  z_txt = t[:, 0] @ p["txt_mlp1/kernel"].astype(np.float64)

  normalise = lambda z: z / (np.linalg.norm(z, axis=-1, keepdims=True) + 1e-8)
  scale = np.clip(p["logit_scale"].astype(np.float64)[0], 0, math.log(100))
  return normalise(z_img), normalise(z_txt), scale


# --- tests ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flip_checkpoint(tmp_path_factory):
  config = small_config()
  flat, axes = flip_layout(config)
  ckpt = write_flip_checkpoint(str(tmp_path_factory.mktemp("flip_released")), flat, axes)
  return config, flat, ckpt


def inputs(config, seed=3):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (3, config.image_size, config.image_size, 3)).astype(np.uint8)
  tokens = rng.integers(1, VOCAB, (3, MAX_LEN)).astype(np.int32)
  tokens[0, 4:] = 0  # padding is attended to in FLIP's text tower
  return images, tokens


def test_every_flip_tensor_has_a_place_and_the_forward_is_flips(flip_checkpoint, tmp_path):
  config, flat, ckpt = flip_checkpoint
  assert config.model.model_img.transformer.num_heads == IMG_HEADS
  dst = str(tmp_path / "converted")
  out_dir = flip_t5x.convert(ckpt, dst, config)
  assert checkpoints.find_checkpoint_dir(dst) == out_dir

  # Loaded exactly as config.pretrain_dir loads parameters.
  model, shapes, _ = flip_t5x.model_and_shapes(config)
  params = checkpoints.load_pretrained_params(dst, shapes)
  images, tokens = inputs(config)
  out = model.apply({"params": params}, images, tokens, train=False, mask_ratio=0.0)
  ref_img, ref_txt, ref_scale = flip_reference(flat, config, images, tokens)
  diffs = {"img": np.max(np.abs(np.asarray(out["img_emb"], np.float64) - ref_img)),
           "txt": np.max(np.abs(np.asarray(out["txt_emb"], np.float64) - ref_txt))}
  print(f"max |ours - FLIP float64 reference|: {diffs}")
  assert max(diffs.values()) <= ATOL, diffs
  assert float(out["logit_scale_log"]) == pytest.approx(ref_scale, abs=1e-6)
  # Not a vacuous match: the embeddings are far from constant.
  assert np.std(ref_img) > 0.05 and np.std(ref_txt) > 0.05
  # The padded token rows of our table are zero and unused.
  table = np.asarray(params["txt_encoder"]["token_embedding"])
  np.testing.assert_array_equal(table[:VOCAB], flat["txt_encoder/token_embedding/embedding"])
  assert not table[VOCAB:].any()


def test_the_command_line_converts_and_names_problems(flip_checkpoint, tmp_path):
  """The command on a config of another model size: refused in one line naming shapes."""
  _, _, ckpt = flip_checkpoint
  result = subprocess.run(
      [sys.executable, "-m", "flip.convert.flip_t5x", f"--src={ckpt}",
       f"--dst={tmp_path / 'out'}", "--config=configs/cfg_flip_base.py:smoke"],
      capture_output=True, text=True, check=False, cwd=os.getcwd())
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("flip.convert.flip_t5x: ") and "wrong shape" in last, last


@pytest.mark.parametrize("change,expected", [
    ("drop", "the FLIP checkpoint does not fit the model: missing 1 (img_encoder/Transformer/"
             "encoderblock_01/MultiHeadSelfAttention_0/value/bias)"),
    ("extra", "does not fit the model: 1 without a place (img_encoder/extra_thing)"),
    ("shape", "does not fit the model: 1 wrong shape (img_encoder/cls (1, 1, 8) vs (1, 1, 64))"),
    ("posemb", "img_encoder/posembed_encoder/pos_embedding is not the fixed 2-D sin-cos table"),
])
def test_a_missing_extra_or_misshaped_tensor_is_named(change, expected):
  config = small_config()
  flat, _ = flip_layout(config)
  if change == "drop":
    del flat["img_encoder/Transformer/encoderblock_01/MultiHeadDotProductAttention_0/value/bias"]
  elif change == "extra":
    flat["img_encoder/extra_thing"] = np.zeros(3, np.float32)
  elif change == "shape":
    flat["img_encoder/cls"] = np.zeros((1, 1, 8), np.float32)
  else:
    flat["img_encoder/posembed_encoder/pos_embedding"] = flat[
        "img_encoder/posembed_encoder/pos_embedding"] + 0.01
  model, shapes, _ = flip_t5x.model_and_shapes(config)
  with pytest.raises(flip_t5x.ConversionError) as info:
    flip_t5x.convert_params(traverse_util.unflatten_dict(flat, sep="/"), model,
                            config.image_size, shapes)
  message = str(info.value)
  assert "\n" not in message and expected in message, message


def test_released_layout_reads_back_through_t5x(flip_checkpoint):
  """The test's checkpoint is a real t5x one: FLIP's loader would read the same tree."""
  _, flat, ckpt = flip_checkpoint
  target = traverse_util.flatten_dict(flip_t5x.read_flip_target(ckpt), sep="/")
  assert set(target) == set(flat)
  for key, value in flat.items():
    np.testing.assert_array_equal(target[key], value, err_msg=key)


def test_a_zipped_release_converts_like_its_directory_and_a_bad_src_is_named(flip_checkpoint,
                                                                           tmp_path):
  """FLIP's weights are released as zips of the checkpoint directory: the zip converts to exactly
  the parameters its directory does; a file that is neither is refused in one line."""
  import shutil  # pylint: disable=g-import-not-at-top
  config, _, ckpt = flip_checkpoint
  archive = shutil.make_archive(str(tmp_path / "release"), "zip", root_dir=os.path.dirname(ckpt),
                                base_dir=os.path.basename(ckpt))
  _, shapes, _ = flip_t5x.model_and_shapes(config)
  flip_t5x.convert(ckpt, str(tmp_path / "from_dir"), config)
  flip_t5x.convert(archive, str(tmp_path / "from_zip"), config)
  from_dir = checkpoints.load_pretrained_params(str(tmp_path / "from_dir"), shapes)
  from_zip = checkpoints.load_pretrained_params(str(tmp_path / "from_zip"), shapes)
  for a, b in zip(jax.tree.leaves(from_dir), jax.tree.leaves(from_zip)):
    np.testing.assert_array_equal(a, b)
  (tmp_path / "notes.txt").write_text("not a checkpoint")
  with pytest.raises(flip_t5x.ConversionError, match="neither a checkpoint directory nor a zip"):
    flip_t5x.convert(str(tmp_path / "notes.txt"), str(tmp_path / "x"), config)
  with pytest.raises(flip_t5x.ConversionError, match="does not exist"):
    flip_t5x.convert(str(tmp_path / "nope"), str(tmp_path / "y"), config)
