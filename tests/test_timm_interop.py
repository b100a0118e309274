"""timm / MAE interop: timm ViTs built here with random weights (no downloads) against our tower.

- import: timm's forward_features / forward_head(pre_logits) / logits equal ours within 1e-5 for
  MAE's style (class token, token pool, fixed sin-cos table), the global-average style (fc_norm,
  learned table, LayerScale) and CLIP's pre-norm style;
- export: our encoder -> timm.create_model(..., **kwargs).load_state_dict(strict=True) -> the same
  features; MAE's fine-tuning load (`torch.load(path)['model']`, strict=False, only head and
  fc_norm missing); export then import is the identity;
- position tables resampled as timm does, and an import at another image size runs like timm's
  own resampled model;
- a missing, extra or mis-shaped tensor is one line naming it.
"""

import functools
import json

import flax
from flax import traverse_util
import jax
import numpy as np
import pytest
import timm
from timm.layers import PatchEmbed
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block
import torch

from flip import builders
from flip import checkpoints
from flip import config as config_lib
from flip.convert import big_vision
from flip.convert import flip_t5x
from flip.convert import timm_mapping
from flip.convert import timm_vit
from flip.models import classifier as classifier_lib
from flip.models import mae as mae_lib
from flip.models import posemb
from flip.models import vit as vit_lib
from flip.tasks import common

ATOL = 1e-5
IMG, PATCH, WIDTH, DEPTH, HEADS, CLASSES = 32, 8, 48, 2, 3, 5
NAMED = timm_vit.NamedModel(num_heads=HEADS, gelu="exact", layernorm_epsilon=1e-6)
TIMM_NAME = "vit_tiny_patch16_224"  # any registered ViT name: the kwargs set every size

STYLES = {
    "mae_token": dict(global_pool="token", fc_norm=False, class_token=True),
    "avg_fc_norm_layerscale": dict(global_pool="avg", fc_norm=True, init_values=0.1),
    "clip_pre_norm": dict(global_pool="token", pre_norm=True, class_token=True),
    "no_embed_class": dict(global_pool="avg", fc_norm=True, no_embed_class=True),
}


def mae_sincos(width: int, grid: int) -> np.ndarray:
  """MAE's util/pos_embed.get_2d_sincos_pos_embed(width, grid, cls_token=True), float64 numpy."""
  def one_d(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  grid_w, grid_h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
  emb = np.concatenate([one_d(width // 2, grid_w), one_d(width // 2, grid_h)], axis=1)
  return np.concatenate([np.zeros([1, width]), emb], axis=0)


def timm_vit_model(img=IMG, seed=0, sincos_posemb=False, **kwargs):
  """A tiny timm VisionTransformer with every tensor random (biases, norms, gammas included)."""
  torch.manual_seed(seed)
  model = timm.models.vision_transformer.VisionTransformer(
      img_size=img, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
      num_classes=CLASSES, **kwargs).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 1 else 0.2) + (1.0 if "norm" in name
                                                                      and "weight" in name else 0))
    if sincos_posemb:
      model.pos_embed.copy_(torch.from_numpy(mae_sincos(WIDTH, img // PATCH)[None]).float())
  return model


def state_dict_np(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def images(img=IMG, batch=2, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (batch, img, img, 3)).astype(np.uint8)


def timm_outputs(model, pixels):
  """forward_features, forward_head(pre_logits=True) and logits of our pixel normalisation."""
  mean, std = np.asarray(vit_lib.IMAGENET_MEAN_RGB), np.asarray(vit_lib.IMAGENET_STD_RGB)
  x = ((pixels.astype(np.float32) - mean.astype(np.float32)) / std.astype(np.float32))
  x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    tokens = model.forward_features(x)
    pooled = model.forward_head(tokens, pre_logits=True)
    logits = model.forward_head(tokens)
  return tokens.numpy(), pooled.numpy(), logits.numpy()


def our_outputs(params, fields, pixels):
  model = classifier_lib.ViTClassifier(img=dict(fields), num_classes=CLASSES)
  encoded = vit_lib.VisionTransformer(**fields).apply({"params": params["img_encoder"]}, pixels,
                                                      train=False)
  logits = model.apply({"params": params}, pixels, train=False) if "head" in params else None
  return np.asarray(encoded["tokens"]), np.asarray(encoded["pooled"]), logits


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("style", sorted(STYLES))
def test_import_matches_timm_features_pooled_and_logits(style):
  model = timm_vit_model(**STYLES[style])
  imported = timm_vit.import_state_dict(state_dict_np(model), NAMED)
  params, fields, size = imported.params, imported.fields, imported.image_size
  assert size == IMG
  pixels = images()
  tokens, pooled, logits = timm_outputs(model, pixels)
  ours = our_outputs(params, fields, pixels)
  assert max_diff(ours[0], tokens) < ATOL and max_diff(ours[1], pooled) < ATOL
  assert max_diff(ours[2], logits) < ATOL


def test_mae_sincos_table_is_imported_as_our_fixed_table():
  model = timm_vit_model(sincos_posemb=True, **STYLES["mae_token"])
  imported = timm_vit.import_state_dict(state_dict_np(model), NAMED)
  params, fields = imported.params, imported.fields
  assert fields["sincos"] and not fields["cls_posemb"]
  assert "pos_embedding" not in params["img_encoder"]
  pixels = images()
  tokens, pooled, logits = timm_outputs(model, pixels)
  ours = our_outputs(params, fields, pixels)
  assert max_diff(ours[0], tokens) < ATOL and max_diff(ours[2], logits) < ATOL
  # The same file taken as a learned table: the class row is kept in the table.
  imported = timm_vit.import_state_dict(state_dict_np(model), NAMED, posemb="learned")
  learned, fields = imported.params, imported.fields
  assert not fields["sincos"] and fields["cls_posemb"]
  assert learned["img_encoder"]["pos_embedding"].shape == (1, 1 + (IMG // PATCH) ** 2, WIDTH)
  with pytest.raises(timm_vit.ConversionError, match="not the fixed 2-D sin-cos table"):
    timm_vit.import_state_dict(state_dict_np(timm_vit_model(**STYLES["mae_token"])), NAMED,
                               posemb="sincos")


@pytest.mark.parametrize("old,new,prefix", [((4, 4), (7, 7), 1), ((14, 14), (24, 24), 1),
                                            ((16, 16), (7, 7), 0), ((8, 8), (3, 5), 1)])
def test_resample_equals_timm(old, new, prefix):
  table = np.random.RandomState(0).normal(size=(1, prefix + old[0] * old[1], 16)).astype(
      np.float32)
  expected = resample_abs_pos_embed(torch.from_numpy(table), list(new), old_size=list(old),
                                    num_prefix_tokens=prefix).numpy()
  got = posemb.resample(table, new, prefix, old)
  assert got.shape == expected.shape and max_diff(got, expected) < ATOL
  np.testing.assert_array_equal(got[:, :prefix], table[:, :prefix])


def test_import_at_another_image_size_runs_like_timms_resampled_model():
  model = timm_vit_model(**STYLES["avg_fc_norm_layerscale"])
  imported = timm_vit.import_state_dict(state_dict_np(model), NAMED, image_size=48)
  params, fields, size = imported.params, imported.fields, imported.image_size
  assert size == 48
  big = timm_vit_model(img=48, **STYLES["avg_fc_norm_layerscale"])
  sd = model.state_dict()
  sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], [6, 6], num_prefix_tokens=1)
  big.load_state_dict(sd, strict=True)
  pixels = images(48)
  tokens, pooled, logits = timm_outputs(big, pixels)
  ours = our_outputs(params, fields, pixels)
  assert max_diff(ours[0], tokens) < ATOL and max_diff(ours[2], logits) < ATOL


def random_params(fields, seed=0, head=True):
  model = classifier_lib.ViTClassifier(img=dict(fields), num_classes=CLASSES)
  variables = model.init(jax.random.PRNGKey(seed), images(), train=False)
  rng = np.random.RandomState(seed)
  params = jax.tree.map(lambda x: (rng.normal(size=x.shape) * 0.2 + (x == 1)).astype(np.float32),
                        flax.core.unfreeze(variables["params"]))
  if not head:
    params.pop("head")
  return params, flax.core.unfreeze(variables["params_axes"])


OUR_ENCODERS = {
    "mae_encoder": dict(sincos=True, use_cls_token=True, pool="cls"),
    "learned_fc_norm_layerscale": dict(sincos=False, use_cls_token=True, cls_posemb=True,
                                       pool="avg", pooled_norm=True, layer_scale_init=0.1),
    "flip_separate_no_cls": dict(sincos=True, use_cls_token=False, pool="avg",
                                 qkv_layout="separate"),
}


def our_fields(**kwargs):
  return dict(num_layers=DEPTH, num_heads=HEADS, mlp_dim=4 * WIDTH, patch_size=(PATCH, PATCH),
              hidden_size=WIDTH, gelu="exact", **kwargs)


@pytest.mark.parametrize("name", sorted(OUR_ENCODERS))
def test_export_loads_strictly_into_timm_with_the_same_features(name):
  fields = our_fields(**OUR_ENCODERS[name])
  params, _ = random_params(fields)
  sd, layout = timm_vit.export_params(params, IMG)
  kwargs = timm_mapping.timm_kwargs(layout, fields["pool"])
  model = timm.create_model(TIMM_NAME, pretrained=False, **kwargs).eval()
  result = model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  pixels = images()
  tokens, pooled, logits = timm_outputs(model, pixels)
  ours = our_outputs(params, fields, pixels)
  assert max_diff(ours[0], tokens) < ATOL and max_diff(ours[1], pooled) < ATOL
  assert max_diff(ours[2], logits) < ATOL
  # Export then import is the identity, exactly.
  qkv = fields.get("qkv_layout", "fused")
  imported = timm_vit.import_state_dict(
      sd, NAMED, posemb="sincos" if fields["sincos"] else "learned",
      global_pool={"cls": "token", "avg": "avg"}[fields["pool"]], qkv_layout=qkv)
  back, back_fields = imported.params, imported.fields
  flat, flat_back = (traverse_util.flatten_dict(t, sep="/") for t in (params, back))
  assert set(flat) == set(flat_back)
  for key, value in flat.items():
    np.testing.assert_array_equal(flat_back[key], value, err_msg=key)
  for key in ("sincos", "use_cls_token", "pool", "pooled_norm", "cls_posemb"):
    assert back_fields[key] == fields.get(key, back_fields[key]), key


class MaeReference(torch.nn.Module):
  """MAE's models_mae.MaskedAutoencoderViT (encoder, random masking from given noise, decoder) on
  timm's PatchEmbed and Block, with MAE's parameter names."""

  def __init__(self, dec_width, dec_depth, dec_heads):
    super().__init__()
    norm = functools.partial(torch.nn.LayerNorm, eps=1e-6)
    num = (IMG // PATCH) ** 2
    self.patch_embed = PatchEmbed(IMG, PATCH, 3, WIDTH)
    self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, WIDTH))
    self.pos_embed = torch.nn.Parameter(torch.zeros(1, 1 + num, WIDTH), requires_grad=False)
    self.blocks = torch.nn.ModuleList([Block(WIDTH, HEADS, 4.0, qkv_bias=True, norm_layer=norm)
                                       for _ in range(DEPTH)])
    self.norm = norm(WIDTH)
    self.decoder_embed = torch.nn.Linear(WIDTH, dec_width)
    self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, dec_width))
    self.decoder_pos_embed = torch.nn.Parameter(torch.zeros(1, 1 + num, dec_width),
                                                requires_grad=False)
    self.decoder_blocks = torch.nn.ModuleList([
        Block(dec_width, dec_heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(dec_depth)])
    self.decoder_norm = norm(dec_width)
    self.decoder_pred = torch.nn.Linear(dec_width, PATCH * PATCH * 3)

  def forward(self, imgs, noise, ratio):
    x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
    n, length, d = x.shape
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    keep = int(length * (1 - ratio))
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].repeat(1, 1, d))
    x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1), x], dim=1)
    for block in self.blocks:
      x = block(x)
    x = self.decoder_embed(self.norm(x))
    rest = torch.cat([x[:, 1:], self.mask_token.repeat(n, length + 1 - x.shape[1], 1)], dim=1)
    rest = torch.gather(rest, 1, ids_restore[:, :, None].repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1], rest], dim=1) + self.decoder_pos_embed
    for block in self.decoder_blocks:
      x = block(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:]


def test_mae_export_loads_into_maes_models_and_files_round_trip(tmp_path):
  decoder = dict(hidden_size=32, num_layers=1, num_heads=4, mlp_dim=128, gelu="exact")
  model = mae_lib.MaskedAutoencoder(
      img=our_fields(**OUR_ENCODERS["mae_encoder"], mask_ratio=0.75), decoder=decoder)
  rngs = {"params": jax.random.PRNGKey(0), "masking": jax.random.PRNGKey(1)}
  variables = model.init(rngs, images(), train=False)
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda x: (rng.normal(size=x.shape) * 0.2 + (x == 1)).astype(np.float32),
                        flax.core.unfreeze(variables["params"]))
  flip_t5x.write_params_checkpoint(str(tmp_path / "ours"), params,
                                   flax.core.unfreeze(variables["params_axes"]))
  out = timm_vit.run_export(str(tmp_path / "ours"), str(tmp_path / "mae"), fmt="mae",
                            image_size=IMG)
  loaded = torch.load(out, map_location="cpu", weights_only=True)["model"]
  # MAE's pretraining model loads every key; its reconstruction equals ours for the same noise.
  reference = MaeReference(32, 1, 4).eval()
  reference.load_state_dict(loaded, strict=True)
  pixels = images()
  noise = np.random.RandomState(2).uniform(size=(2, (IMG // PATCH) ** 2)).astype(np.float32)
  ours = model.apply({"params": params}, pixels, train=False, mask_noise=noise)["pred"]
  mean, std = np.asarray(vit_lib.IMAGENET_MEAN_RGB), np.asarray(vit_lib.IMAGENET_STD_RGB)
  x = ((pixels.astype(np.float32) - mean.astype(np.float32)) / std.astype(np.float32))
  with torch.no_grad():
    expected = reference(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                         torch.from_numpy(noise), 0.75).numpy()
  assert max_diff(ours, expected) < ATOL
  # MAE's fine-tuning (models_vit with global pool = timm's ViT with fc_norm and no norm) loads
  # with strict=False and asserts that only the head and fc_norm are missing.
  finetune = timm.create_model(TIMM_NAME, pretrained=False, img_size=IMG, patch_size=PATCH,
                               embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES,
                               global_pool="avg", fc_norm=True)
  result = finetune.load_state_dict(loaded, strict=False)
  assert set(result.missing_keys) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
  assert {k for k in result.unexpected_keys if not k.startswith("decoder_")} == {
      "norm.weight", "norm.bias", "mask_token"}
  np.testing.assert_allclose(loaded["pos_embed"].numpy()[0], mae_sincos(WIDTH, IMG // PATCH),
                             atol=ATOL)
  # The .pth imports back through the command's reader into the same parameters, a pretrain_dir
  # the MAE task loads (encoder and decoder).
  back_dir = tmp_path / "back"
  timm_vit.run_import(out, str(back_dir), None, num_heads=HEADS, decoder_num_heads=4)
  back = traverse_util.flatten_dict(checkpoints.load_params_tree(str(back_dir)), sep="/")
  flat = traverse_util.flatten_dict(params, sep="/")
  assert set(back) == set(flat)
  for key, value in flat.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  overrides = json.loads((back_dir / timm_vit.SIDECAR).read_text())["config_overrides"]
  assert overrides["model.model_img.sincos"] is True
  assert overrides["model.decoder.hidden_size"] == 32
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  subset = common.load_modules(str(back_dir), shapes, required=(common.ENCODER,),
                               optional=("mae_decoder",))
  assert set(subset) == {common.ENCODER, "mae_decoder"}


def test_timm_export_files_load_with_their_kwargs(tmp_path):
  fields = our_fields(**OUR_ENCODERS["learned_fc_norm_layerscale"])
  params, axes = random_params(fields)
  flip_t5x.write_params_checkpoint(str(tmp_path / "ours"), params, axes)
  out = timm_vit.run_export(str(tmp_path / "ours"), str(tmp_path / "timm"), model=TIMM_NAME)
  spec = json.loads((tmp_path / "timm" / timm_vit.KWARGS_FILE).read_text())
  model = timm.create_model(spec["model"], pretrained=False, **spec["kwargs"])
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  model.load_state_dict(load_file(out), strict=True)
  with pytest.raises(timm_vit.ConversionError, match="is not empty"):
    timm_vit.run_export(str(tmp_path / "ours"), str(tmp_path / "timm"))


@pytest.mark.parametrize("edit,match", [
    ("missing", "missing 1 .*blocks.1.norm2.weight"),
    ("extra", "1 without a place .*blocks.0.attn.q_norm.weight"),
    ("shape", r"blocks.1.mlp.fc1.bias \(100,\) vs \(192,\)"),
    ("heads", "not divisible by 5 heads"),
])
def test_bad_state_dicts_are_one_line_naming_the_key(edit, match):
  sd = state_dict_np(timm_vit_model(**STYLES["mae_token"]))
  named = NAMED
  if edit == "missing":
    del sd["blocks.1.norm2.weight"]
  elif edit == "extra":
    sd["blocks.0.attn.q_norm.weight"] = np.ones(WIDTH // HEADS, np.float32)
  elif edit == "shape":
    sd["blocks.1.mlp.fc1.bias"] = np.zeros(100, np.float32)
  else:
    named = timm_vit.NamedModel(5, "exact", 1e-6)
  with pytest.raises(timm_vit.ConversionError, match=match) as err:
    timm_vit.import_state_dict(sd, named)
  assert "\n" not in str(err.value)


def test_command_line_errors_are_one_line(tmp_path, capsys):
  (tmp_path / "weights.txt").write_text("x")
  with pytest.raises(SystemExit) as exit_info:
    timm_vit.main(["import", "--src", str(tmp_path / "weights.txt"), "--dst", str(tmp_path / "o"),
                   "--model", "vit_base_patch16_224.mae"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert "weights.txt: expected .safetensors" in err and "\n" not in err
  assert timm_vit.parse_model_name("vit_large_patch14_clip_quickgelu_224.openai") == \
      timm_vit.NamedModel(16, "quick", 1e-5)


# --------------------------------------------------------------------------- big_vision

def big_vision_npz(path, pool, scanned, prefix):
  """A big_vision ViT checkpoint (big_vision/models/vit.py names) with random values."""
  d, k, m, grid = WIDTH, WIDTH // HEADS, 4 * WIDTH, IMG // PATCH
  shapes = {"embedding/kernel": (PATCH, PATCH, 3, d), "embedding/bias": (d,),
            "pos_embedding": (1, grid * grid, d), "Transformer/encoder_norm/scale": (d,),
            "Transformer/encoder_norm/bias": (d,), "head/kernel": (d, CLASSES),
            "head/bias": (CLASSES,)}
  if pool == "tok":
    shapes["cls"] = (1, 1, d)
  block = {"LayerNorm_0/scale": (d,), "LayerNorm_0/bias": (d,), "LayerNorm_1/scale": (d,),
           "LayerNorm_1/bias": (d,), "MlpBlock_0/Dense_0/kernel": (d, m),
           "MlpBlock_0/Dense_0/bias": (m,), "MlpBlock_0/Dense_1/kernel": (m, d),
           "MlpBlock_0/Dense_1/bias": (d,),
           "MultiHeadDotProductAttention_0/out/kernel": (HEADS, k, d),
           "MultiHeadDotProductAttention_0/out/bias": (d,)}
  for name in ("query", "key", "value"):
    block[f"MultiHeadDotProductAttention_0/{name}/kernel"] = (d, HEADS, k)
    block[f"MultiHeadDotProductAttention_0/{name}/bias"] = (HEADS, k)
  for leaf, shape in block.items():
    if scanned:
      shapes[f"Transformer/encoderblock/{leaf}"] = (DEPTH,) + shape
    else:
      shapes.update({f"Transformer/encoderblock_{n}/{leaf}": shape for n in range(DEPTH)})
  rng = np.random.RandomState(1)
  arrays = {prefix + key: (rng.normal(size=shape) * 0.2 + key.endswith("scale")).astype(
      np.float32) for key, shape in shapes.items()}
  if prefix == big_vision.TWO_TOWER_PREFIX:
    arrays["params/txt/Embed_0/embedding"] = np.zeros((10, d), np.float32)
    arrays["params/t"] = np.ones((1,), np.float32)
  np.savez(path, **arrays)
  return path


@pytest.mark.parametrize("pool,scanned,prefix", [("gap", False, "params/"),
                                                 ("tok", True, "params/img/")])
def test_big_vision_import_matches_timms_own_npz_loader(tmp_path, pool, scanned, prefix):
  npz = big_vision_npz(str(tmp_path / "bv.npz"), pool, scanned, prefix)
  reference = timm.models.vision_transformer.VisionTransformer(
      img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
      num_classes=CLASSES, class_token=pool == "tok", no_embed_class=True,
      global_pool="token" if pool == "tok" else "avg", fc_norm=False, act_layer="gelu_tanh").eval()
  reference.load_pretrained(npz)
  imported, left_out = big_vision.convert(big_vision.read_npz(npz))
  params, fields = imported.params, imported.fields
  pixels = images()
  tokens, pooled, logits = timm_outputs(reference, pixels)
  ours = our_outputs(params, fields, pixels)
  assert max_diff(ours[0], tokens) < ATOL and max_diff(ours[1], pooled) < ATOL
  if prefix == big_vision.TWO_TOWER_PREFIX:
    assert "head" not in params and left_out == ["params/img/head/bias", "params/img/head/kernel",
                                                 "params/t", "params/txt/Embed_0/embedding"]
  else:
    assert max_diff(ours[2], logits) < ATOL


def test_big_vision_map_head_is_refused_naming_it(tmp_path):
  npz = big_vision_npz(str(tmp_path / "bv.npz"), "gap", False, "params/")
  arrays = dict(np.load(npz))
  arrays["params/MAPHead_0/probe"] = np.zeros((1, 1, WIDTH), np.float32)
  with pytest.raises(timm_vit.ConversionError, match="without a place .*MAPHead_0/probe"):
    big_vision.convert(arrays)


def test_big_vision_sincos2d_table_is_big_visions():
  """big_vision's posemb_sincos_2d as lucidrains' vit-pytorch ports it (torch)."""
  grid, width = (3, 5), 16
  y, x = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
  omega = 1.0 / (10000 ** (torch.arange(width // 4) / (width // 4 - 1)))
  y, x = y.flatten()[:, None] * omega[None, :], x.flatten()[:, None] * omega[None, :]
  expected = torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1).numpy()
  assert max_diff(big_vision.big_vision_sincos(grid, width)[0], expected) < ATOL


def test_imported_directory_is_a_pretrain_dir_of_the_linear_probe_config(tmp_path, capsys):
  model = timm_vit_model(**STYLES["avg_fc_norm_layerscale"])
  torch.save({"model": model.state_dict()}, str(tmp_path / "ft.pth"))
  timm_vit.main(["import", "--src", str(tmp_path / "ft.pth"), "--dst", str(tmp_path / "pre"),
                 "--model", "vit_tiny_patch16_224", "--num_heads", str(HEADS)])
  printed = capsys.readouterr().out.split()
  overrides = [arg[len("--config."):] for arg in printed if arg.startswith("--config.")]
  config = config_lib.load_config("configs/cfg_linprobe_base.py",
                                  overrides + [f"data.num_classes={CLASSES}"])
  assert config.pretrain_dir == str(tmp_path / "pre")
  task = builders.build_task(config)
  encoder = builders.load_pretrained_params(config, task, builders.params_shapes(task))
  variables = flax.core.unfreeze(task.init_variables(jax.random.PRNGKey(0)))
  variables["params"]["img_encoder"] = encoder["img_encoder"]
  variables = {k: v for k, v in variables.items() if not k.endswith("_axes")}
  pixels = images()
  features = task.model.apply(variables, pixels, train=False, method=task.model.features)
  assert max_diff(features, timm_outputs(model, pixels)[1]) < ATOL


def test_converters_import_no_torch_timm_or_torchvision_at_module_level(repo_root):
  import ast  # pylint: disable=g-import-not-at-top
  modules = ["flip/models/posemb.py", "flip/convert/timm_mapping.py", "flip/convert/timm_files.py",
             "flip/convert/timm_vit.py", "flip/convert/mae_decoder.py",
             "flip/convert/big_vision.py"]
  for module in modules:
    tree = ast.parse((repo_root / module).read_text())
    for node in tree.body:  # module level only: the torch file readers import it in functions
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      assert not [n for n in names if n.split(".")[0] in ("torch", "timm", "torchvision")], module


def test_pretrain_dir_table_with_class_row_is_resampled_as_timm_does():
  rng = np.random.RandomState(3)
  loaded = {"img_encoder": {"pos_embedding": rng.normal(size=(1, 1 + 16, 8)).astype(np.float32)}}
  target = {"img_encoder": {"pos_embedding": jax.ShapeDtypeStruct((1, 1 + 36, 8), np.float32)}}
  fitted = checkpoints.match_params(loaded, target, posemb_grid=(6, 6))
  expected = resample_abs_pos_embed(torch.from_numpy(loaded["img_encoder"]["pos_embedding"]),
                                    [6, 6], num_prefix_tokens=1).numpy()
  assert max_diff(fitted["img_encoder"]["pos_embedding"], expected) < ATOL
