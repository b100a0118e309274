"""open_clip CLIP models in and out (flip.convert.open_clip) and open_clip's tokenizer
(flip.data.clip_bpe), against open_clip itself.

The references are open_clip models built here from shrunk ViT-B-16-style model configs with
random weights (every tensor perturbed, so no bias or LayerNorm stays at its initial value): their
`encode_image` / `encode_text` (normalised), `open_clip.get_tokenizer`, and
`open_clip.build_zero_shot_classifier` on the exact pixels our evaluation pipeline produces.
Variants: "openai" (QuickGELU, causal text with argmax/EOT pooling, class-token pooling, ln_pre),
"gelu" (exact GELU, LayerScale in both towers, larger MLP ratio) and "avgpool" (no ln_pre, patch
average with the LayerNorm after the pooling, bidirectional text pooled at the first token, tanh
GELU, LayerNorm eps 1e-6, sin-cos position table).
"""

import json
import os

import jax
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import open_clip  # conftest makes torchvision importable beside the CPU build of torch

from flip import checkpoints
from flip import config as config_lib
from flip.convert import open_clip as cli
from flip.convert import open_clip_arch
from flip.convert import open_clip_map
from flip.data import text as text_lib

ATOL = 1e-5  # float32 against float32
CONTEXT = 16
OPENAI_MEAN = np.asarray(open_clip_arch.OPENAI_MEAN, np.float32)
OPENAI_STD = np.asarray(open_clip_arch.OPENAI_STD, np.float32)
STRINGS = ["a photo of a dog.", "", "Ünïcödé café — naïve 東京 🐶 ½", "word " * 100,
           "  Multiple   spaces\tand\nlines  ", "&amp; html &lt;b&gt; x", "CAPS and 123 numbers!!"]


def tiny_config(variant):
  vision = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}
  text = {"context_length": CONTEXT, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
  cfg = {"embed_dim": 24, "vision_cfg": vision, "text_cfg": text}
  if variant == "openai":
    cfg["quick_gelu"] = True
  elif variant == "gelu":
    vision.update(ls_init_value=0.1, mlp_ratio=3.0)
    text.update(ls_init_value=0.1)
  elif variant == "avgpool":
    vision.update(no_ln_pre=True, pool_type="avg", final_ln_after_pool=True,
                  pos_embed_type="sin_cos_2d", norm_kwargs={"eps": 1e-6},
                  act_kwargs={"approximate": "tanh"})
    text.update(no_causal_mask=True, pool_type="first", norm_kwargs={"eps": 1e-6},
                act_kwargs={"approximate": "tanh"})
  return cfg


def random_clip(cfg, seed=0):
  torch.manual_seed(seed)
  model = open_clip.CLIP(**cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "logit_scale":
        continue
      if p.ndim == 1 and ("ln" in name or "gamma" in name):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.add_(0.05 * torch.randn_like(p))
  return model


def random_params(shapes, seed):
  """Random values for every parameter of `shapes` (LayerNorm scales near 1, the rest small)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    if name.endswith("scale") and "logit" not in name:
      return (1.0 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    return (0.05 * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, dict(shapes))


def images(seed, n=4, size=32):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def torch_pixels(uint8_images):
  x = (uint8_images.astype(np.float32) / 255.0 - OPENAI_MEAN) / OPENAI_STD
  return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def oc_embeddings(model, uint8_images, tokens):
  with torch.no_grad():
    return (model.encode_image(torch_pixels(uint8_images), normalize=True).numpy(),
            model.encode_text(torch.from_numpy(np.asarray(tokens, np.int64)),
                              normalize=True).numpy())


def our_embeddings(directory, uint8_images, tokens):
  from flip import builders  # pylint: disable=g-import-not-at-top
  config = cli.flip_config_for(directory)
  task = builders.build_task(config)
  params = checkpoints.load_params_tree(directory)
  return (np.asarray(jax.jit(task.encode_image)(params, uint8_images)),
          np.asarray(jax.jit(task.encode_text)(params, np.asarray(tokens, np.int32))))


def oc_tokens(strings, length=CONTEXT):
  return open_clip.get_tokenizer("ViT-B-16")(strings, context_length=length).numpy()


@pytest.fixture(scope="module")
def imports(tmp_path_factory):
  """variant -> (variant, model config, open_clip model, safetensors path, converted dir)."""
  cache = {}

  def get(variant):
    if variant not in cache:
      cfg = tiny_config(variant)
      model = random_clip(cfg, seed=len(variant))
      root = tmp_path_factory.mktemp(variant)
      weights = str(root / "weights.safetensors")
      safetensors.torch.save_file(model.state_dict(), weights)
      out = str(root / "converted")
      cli.import_open_clip(weights, cfg, out)
      cache[variant] = (variant, cfg, model, weights, out)
    return cache[variant]

  return get


@pytest.fixture(params=["openai", "gelu", "avgpool"])
def imported(request, imports):
  return imports(request.param)


@pytest.fixture
def openai_imported(imports):
  return imports("openai")


# --- tokenizer ----------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [77, CONTEXT, 4])
def test_tokenizer_equals_open_clip(length):
  vocab = text_lib.get_vocabulary(config_lib.load_config(
      "configs/cfg_demo.py", ["aug.txt.tokenizer=open_clip"]).aug.txt)
  ours = np.asarray(text_lib.tokenize(vocab, STRINGS, length))
  np.testing.assert_array_equal(ours, oc_tokens(STRINGS, length))
  assert (ours[3] != 0).all() and ours[3, -1] == 49407  # truncated: end of text kept last


def test_tokenizer_without_open_clip_is_one_config_error(monkeypatch):
  from flip.data import clip_bpe  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(clip_bpe.importlib.util, "find_spec", lambda name: None)
  clip_bpe._simple_tokenizer.cache_clear()  # pylint: disable=protected-access
  try:
    with pytest.raises(config_lib.ConfigError, match=r"openclip extra") as err:
      clip_bpe.OpenClipVocabulary()
    assert "\n" not in str(err.value)
  finally:
    clip_bpe._simple_tokenizer.cache_clear()  # pylint: disable=protected-access


def test_tokenizer_module_loaded_alone_is_open_clips():
  """The fallback for an open_clip whose package init cannot import torchvision."""
  from flip.data import clip_bpe  # pylint: disable=g-import-not-at-top
  alone = clip_bpe._tokenizer_module_alone(RuntimeError("test"))  # pylint: disable=protected-access
  np.testing.assert_array_equal(alone.SimpleTokenizer()(STRINGS, context_length=CONTEXT).numpy(),
                                oc_tokens(STRINGS))


def test_vocabulary_round_trip_and_zeroshot_tokenizer(openai_imported):
  from flip.evals import zeroshot  # pylint: disable=g-import-not-at-top
  *_, out = openai_imported
  config = cli.flip_config_for(out)
  assert config.aug.txt.tokenizer == "open_clip" and config.aug.txt.max_len == CONTEXT
  np.testing.assert_array_equal(zeroshot.make_tokenizer(config)(STRINGS), oc_tokens(STRINGS))
  vocab = text_lib.get_vocabulary(config.aug.txt)
  assert vocab.decode(vocab.encode("A photo of a Dog!")) == "a photo of a dog !"
  assert vocab.encode("a dog")[0] == 49406 and vocab.encode("a dog")[-1] == 49407
  tokens = text_lib.tokenize(vocab, ["A photo of a Dog!", "x"], CONTEXT)  # the TensorFlow side
  assert vocab.decode_tf(tokens).numpy().tolist() == [b"a photo of a dog !", b"x"]


# --- import -------------------------------------------------------------------------------------

def test_import_matches_open_clip(imported):
  _, _, model, _, out = imported
  pixels, tokens = images(1), oc_tokens(STRINGS)
  ref_img, ref_txt = oc_embeddings(model, pixels, tokens)
  our_img, our_txt = our_embeddings(out, pixels, tokens)
  np.testing.assert_allclose(our_img, ref_img, atol=ATOL, rtol=0)
  np.testing.assert_allclose(our_txt, ref_txt, atol=ATOL, rtol=0)


def test_import_of_a_torch_bin_equals_the_safetensors_import(openai_imported, tmp_path):
  _, cfg, model, _, out = openai_imported
  path = str(tmp_path / "open_clip_pytorch_model.bin")
  torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
  cli.import_open_clip(path, cfg, str(tmp_path / "from_bin"))
  a, b = checkpoints.load_params_tree(out), checkpoints.load_params_tree(str(tmp_path / "from_bin"))
  jax_tree_equal(a, b)


def jax_tree_equal(a, b):
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  fa, fb = traverse_util.flatten_dict(a, sep="/"), traverse_util.flatten_dict(b, sep="/")
  assert sorted(fa) == sorted(fb)
  for key in fa:
    np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=key)


# --- export -------------------------------------------------------------------------------------

def test_export_loads_strict_in_open_clip_and_round_trips(imported, tmp_path):
  variant, _, model, weights, out = imported
  dst = str(tmp_path / f"exported-{variant}.safetensors")
  json_path = cli.export_open_clip(out, cli.flip_config_for(out), dst)
  # Bit for bit the state dict we imported.
  original = safetensors.numpy.load_file(weights)
  exported = safetensors.numpy.load_file(dst)
  assert sorted(exported) == sorted(original)
  for key in original:
    np.testing.assert_array_equal(exported[key], original[key].reshape(exported[key].shape),
                                  err_msg=key)
  # open_clip's own loader, strict.
  open_clip.add_model_config(json_path)
  loaded = open_clip.create_model(f"exported-{variant}", pretrained=dst).eval()
  pixels, tokens = images(2), oc_tokens(STRINGS)
  for ref, got in zip(oc_embeddings(model, pixels, tokens), oc_embeddings(loaded, pixels, tokens)):
    np.testing.assert_array_equal(got, ref)
  # import(export(x)) == x.
  again = str(tmp_path / "again")
  cli.import_open_clip(dst, json.load(open(json_path)), again)
  jax_tree_equal(checkpoints.load_params_tree(again), checkpoints.load_params_tree(out))


def test_export_of_a_flip_layout_model(tmp_path):
  """Our FLIP layout (separate q/k/v, fixed sin-cos positions, class token without position,
  patch bias, tanh GELU, first-token text pooling without padding mask) exported with class-token
  pooling: open_clip loads it strict and computes our embeddings."""
  from flip import builders  # pylint: disable=g-import-not-at-top
  from flip.convert import flip_t5x  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config("configs/cfg_flip_base.py:smoke",
                                  ["model.model_img.pool=cls", "model.model_txt.vocab_size=300",
                                   "aug.txt.max_len=8", "model.model_img.mask_ratio=0.0"])
  task = builders.build_task(config)
  _, shapes, axes = flip_t5x.model_and_shapes(config)
  params = random_params(shapes, seed=3)
  flip_t5x.write_params_checkpoint(str(tmp_path / "ckpt"), params, axes)
  dst = str(tmp_path / "flip-layout.safetensors")
  json_path = cli.export_open_clip(str(tmp_path / "ckpt"), config, dst)
  model_cfg = json.load(open(json_path))
  loaded = open_clip.CLIP(**model_cfg).eval()
  loaded.load_state_dict(safetensors.torch.load_file(dst), strict=True)
  pixels = images(4, size=config.image_size)
  tokens = np.random.default_rng(5).integers(1, 300, (4, 8)).astype(np.int32)
  mean, std = (np.asarray(s, np.float32) for s in open_clip_arch.NORMALIZATIONS["imagenet"])
  x = torch.from_numpy(((pixels / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2))
  with torch.no_grad():
    ref_img = loaded.encode_image(x, normalize=True).numpy()
    ref_txt = loaded.encode_text(torch.from_numpy(tokens.astype(np.int64)), normalize=True).numpy()
  our_img = np.asarray(jax.jit(task.encode_image)(params, pixels))
  our_txt = np.asarray(jax.jit(task.encode_text)(params, tokens))
  np.testing.assert_allclose(our_img, ref_img, atol=ATOL, rtol=0)
  np.testing.assert_allclose(our_txt, ref_txt, atol=ATOL, rtol=0)


def test_export_refuses_what_open_clip_cannot_express():
  config = config_lib.load_config("configs/cfg_flip_base.py:smoke")  # FLIP: pool avg_all
  with pytest.raises(open_clip_arch.ArchError, match=r"^config\.model\.model_img\.pool='avg_all'"):
    open_clip_arch.arch_from_flip_config(config)


# --- bad inputs ---------------------------------------------------------------------------------

def _state(cfg):
  return {k: v.numpy() for k, v in random_clip(cfg).state_dict().items()}


@pytest.mark.parametrize("edit,pattern", [
    (lambda sd: sd.pop("visual.transformer.resblocks.1.attn.in_proj_bias"),
     r"does not fit the open_clip model config: missing 1 "
     r"\(visual\.transformer\.resblocks\.1\.attn\.in_proj_bias\)$"),
    (lambda sd: sd.__setitem__("visual.head.weight", np.zeros(3, np.float32)),
     r": 1 without a place \(visual\.head\.weight\)$"),
    (lambda sd: sd.__setitem__("text_projection", np.zeros((32, 25), np.float32)),
     r": 1 wrong shape \(text_projection \(32, 25\) vs \(32, 24\)\)$"),
])
def test_bad_state_dicts_are_one_line_naming_the_key(edit, pattern):
  cfg = tiny_config("openai")
  state = _state(cfg)
  edit(state)
  with pytest.raises(open_clip_map.MappingError, match=pattern) as err:
    open_clip_map.to_flip(state, open_clip_arch.parse_model_config(cfg))
  assert "\n" not in str(err.value)


def test_command_line_reports_one_line(tmp_path, capsys):
  cfg = tiny_config("openai")
  state = _state(cfg)
  del state["ln_final.bias"]
  src = str(tmp_path / "bad.safetensors")
  safetensors.numpy.save_file(state, src)
  cfg_path = tmp_path / "cfg.json"
  cfg_path.write_text(json.dumps(cfg))
  status = cli.main(["import", "--src", src, "--model-config", str(cfg_path), "--dst",
                     str(tmp_path / "out")])
  err = capsys.readouterr().err.strip()
  assert status == 2 and "\n" not in err and "ln_final.bias" in err
  assert not (tmp_path / "out").exists()
  status = cli.main(["import", "--src", src, "--model", "coca_ViT-B-32", "--dst",
                     str(tmp_path / "out")])
  err = capsys.readouterr().err.strip()
  assert status == 2 and "\n" not in err and "attentional_pool" in err


def test_import_of_an_open_clip_local_dir(openai_imported, tmp_path):
  """open_clip's local-dir / Hugging Face layout: open_clip_config.json (model_cfg and
  preprocess_cfg) beside open_clip_model.safetensors."""
  _, cfg, _, weights, out = openai_imported
  snapshot = tmp_path / "snapshot"
  snapshot.mkdir()
  (snapshot / "open_clip_model.safetensors").write_bytes(open(weights, "rb").read())
  (snapshot / "open_clip_config.json").write_text(json.dumps({
      "model_cfg": cfg, "preprocess_cfg": {"mean": list(open_clip_arch.OPENAI_MEAN),
                                           "std": list(open_clip_arch.OPENAI_STD)}}))
  assert cli.main(["import", "--src", str(snapshot), "--dst", str(tmp_path / "out")]) == 0
  jax_tree_equal(checkpoints.load_params_tree(str(tmp_path / "out")),
                 checkpoints.load_params_tree(out))
  (snapshot / "open_clip_config.json").write_text(json.dumps({
      "model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
  with pytest.raises(open_clip_arch.ArchError, match=r"preprocess_cfg\.mean/std"):
    cli.import_open_clip(str(snapshot / "open_clip_model.safetensors"),
                         json.loads((snapshot / "open_clip_config.json").read_text()),
                         str(tmp_path / "out2"))


@pytest.mark.parametrize("name,key", [("ViT-B-16", None), ("ViT-B-32-quickgelu", None),
                                      ("ViT-M-16-alt", None), ("ViT-bigG-14", None),
                                      ("RN50", "layers"), ("ViT-L-14-CLIPA", "hf_tokenizer_name"),
                                      ("convnext_base", "timm_model_name"),
                                      ("ViT-H-14-worldwide", "hf_tokenizer_name"),
                                      ("roberta-ViT-B-32", "hf_model_name")])
def test_open_clip_model_configs(name, key):
  """open_clip's plain ViT configs map onto exactly the keys and shapes of open_clip's own state
  dict (built on the meta device: no memory); others are refused naming the key."""
  cfg = cli.read_model_config(name, None)
  if key is not None:
    with pytest.raises(open_clip_arch.ArchError, match=key):
      open_clip_arch.parse_model_config(cfg, name)
    return
  arch = open_clip_arch.parse_model_config(cfg, name)
  with torch.device("meta"):
    model = open_clip.CLIP(**cfg)
  expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  assert {e.oc_key: e.oc_shape for e in open_clip_map.entries(arch)} == expected
  assert open_clip_arch.parse_model_config(open_clip_arch.open_clip_model_config(arch)) == arch


# --- zero-shot in main.py's eval_only against open_clip's zero-shot classifier -----------------

CLASSNAMES = ["golden retriever", "café au lait", "Ünïcode thing", "t-shirt", "airplane",
              "the number 7", "tabby cat"]


def write_image_folder(root, per_class=2):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(7)
  for c in range(len(CLASSNAMES)):
    (root / f"class_{c}").mkdir(parents=True)
    for i in range(per_class):
      pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)  # resized and centre-cropped
      (root / f"class_{c}" / f"{i}.png").write_bytes(tf.io.encode_png(pixels).numpy())
  (root / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n", encoding="utf-8")


def test_zeroshot_of_the_imported_model_equals_open_clips(openai_imported, tmp_path):
  from flip.data import eval_sources  # pylint: disable=g-import-not-at-top
  from flip.evals import eval_only  # pylint: disable=g-import-not-at-top
  from flip.evals import zeroshot  # pylint: disable=g-import-not-at-top
  _, _, model, _, out = openai_imported
  folder = tmp_path / "images"
  write_image_folder(folder)
  config = config_lib.load_config(f"{cli.CONFIG_FILE}:{out}", [
      f"eval_dataset={folder}", "evals.zeroshot.templates=templates_short",
      "evals.zeroshot.batch_size=8"])
  metrics = eval_only.run_eval_only(config, str(tmp_path / "workdir"))  # main.py's eval_only

  # open_clip on the exact pixels our pipeline feeds the model.
  source = eval_sources.classification_source(str(folder), "templates_short", "", 0)
  examples = list(source.dataset(0, 1, config.image_size,
                                 config.aug.eval_crop_fraction).as_numpy_iterator())
  pixels = np.stack([e["image"] for e in examples])
  labels = np.asarray([e["label"] for e in examples])
  tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT)
  with torch.no_grad():
    weights = open_clip.build_zero_shot_classifier(model, tokenizer, source.classnames,
                                                   source.templates, num_classes_per_batch=None)
    ref_logits = (model.encode_image(torch_pixels(pixels), normalize=True) @ weights).numpy()
  ranked = np.argsort(-ref_logits, axis=1)
  name = f"zeroshot/{source.name}"
  assert metrics[f"{name}/num_images"] == len(labels) == 2 * len(CLASSNAMES)
  assert metrics[f"{name}/top1"] == np.mean(ranked[:, 0] == labels)
  assert metrics[f"{name}/top5"] == np.mean((ranked[:, :5] == labels[:, None]).any(axis=1))

  # Per image: our classifier (the evaluator's tokenizer and prompts) ranks like open_clip's.
  prompts = zeroshot.class_prompts(source.classnames, source.templates)
  our_img, our_txt = our_embeddings(out, pixels, zeroshot.make_tokenizer(config)(prompts))
  ours = our_txt.reshape(len(CLASSNAMES), len(source.templates), -1).mean(axis=1)
  ours /= np.linalg.norm(ours, axis=1, keepdims=True)
  our_logits = our_img @ ours.T
  np.testing.assert_allclose(ours.T, weights.numpy(), atol=ATOL, rtol=0)
  np.testing.assert_allclose(our_logits, ref_logits, atol=ATOL, rtol=0)
  np.testing.assert_array_equal(np.argsort(-our_logits, axis=1)[:, :5], ranked[:, :5])
