"""Tests for the FLIP towers (flip.models.{layers,vit,text,flip}) and t5x's view of their state.

References: published ViT sizes and an analytic parameter count for the image encoders; a float64
numpy sin-cos table; the same text without padding for padding invariance; the plain (no remat)
gradient for the rematerialised ones; t5x's standard logical axis rules read as a table for the
expected shardings; for the one stack every tower builds (layers.EncoderFields), the stack each
tower actually runs, with a non-default value in every field. Big configs only ever go through
`jax.eval_shape`, so they cost a trace.
"""

import dataclasses
import math
import pathlib

import flax
from flax import traverse_util
import jax
from jax.sharding import PartitionSpec
import jax.numpy as jnp
import numpy as np
import pytest
from t5x import optimizers as t5x_optimizers
from t5x import partitioning as t5x_partitioning
from t5x import train_state as t5x_train_state

from flip import config as config_lib
from flip import masking
from flip import optim
from flip import partitioning
from flip import builders
from flip.models import flip as flip_lib
from flip.models import layers
from flip.models import mae as mae_lib
from flip.models import text as text_lib
from flip.models import vit as vit_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The FLIP configs (two towers); the MAE / probe / fine-tune configs are tested in test_mae,
# test_linprobe and test_finetune.
MAE_FAMILY_PREFIXES = ("cfg_mae_", "cfg_linprobe_", "cfg_finetune_", "cfg_m3ae_")
CONFIG_NAMES = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.py")
                      if p.stem != "__init__" and not p.stem.startswith(MAE_FAMILY_PREFIXES))
SMOKE_CONFIG = "configs/cfg_flip_large.py:smoke"
ABSTRACT_BATCH = 2
PARAM_STDDEV = 0.1
SINCOS_TEMPERATURE = 10000.0  # the Transformer/MAE/FLIP sin-cos base

# Published image-encoder sizes (ViT paper, Dosovitskiy et al. 2021, Table 1), keyed by
# (patch, width, depth); ours have no class token or learned position table, hence "within 1 %".
KNOWN_VIT_PARAMS = {
    (16, 768, 12): 86e6,  # ViT-B/16
    (16, 1024, 24): 304e6,  # ViT-L/16
    (14, 1280, 32): 632e6,  # ViT-H/14
}
KNOWN_VIT_TOLERANCE = 0.01

ALL_RNG_STREAMS = ("params", "masking", "dropout", "droppath")
# Tests compile small models without LLVM's optimisation passes: compiling, not running, is what
# costs time on a 2-core machine; every compared computation is compiled the same way.
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}


def rngs(seed=0):
  return {name: jax.random.PRNGKey(seed + i) for i, name in enumerate(ALL_RNG_STREAMS)}


def load(name_or_path, overrides=()):
  path = name_or_path if name_or_path.startswith("configs/") else f"configs/{name_or_path}.py"
  return config_lib.load_config(str(REPO_ROOT / path), list(overrides))


def random_params(shapes, seed=0):
  """Random values for a params tree of ShapeDtypeStructs (numpy draws: no compiled init)."""
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    values = rng.normal(scale=PARAM_STDDEV, size=shape.shape)
    if path[-1].key == "scale":  # LayerNorm scales around one
      values += 1.0
    return jnp.asarray(values, shape.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def compile_fast(fn, *example_args):
  """jit + compile `fn` for the shapes of `example_args` with FAST_COMPILE_OPTIONS."""
  return jax.jit(fn).lower(*example_args).compile(FAST_COMPILE_OPTIONS)


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# --- every config: shapes and sizes ---------------------------------------------------------------

_ABSTRACT_CACHE = {}


def abstract_forward(config):
  """eval_shape of a training forward: (outputs, variables incl. the towers' intermediates).

  Cached per model architecture: configs that differ only in schedule or data keys share one
  trace (the result is a function of the model keys, image size, text length and dtype only).
  """
  key = (config.model.to_json(), config.image_size, config.aug.txt.max_len, config.dtype)
  if key not in _ABSTRACT_CACHE:
    model = flip_lib.flip_model_from_config(config)
    images = jax.ShapeDtypeStruct((ABSTRACT_BATCH, config.image_size, config.image_size, 3),
                                  jnp.uint8)
    tokens = jax.ShapeDtypeStruct((ABSTRACT_BATCH, config.aug.txt.max_len), jnp.int32)

    def capture_towers(module, method_name):
      return method_name == "__call__" and module.name in ("img_encoder", "txt_encoder")

    _ABSTRACT_CACHE[key] = jax.eval_shape(
        lambda x, t: model.init_with_output(rngs(), x, t, train=True,
                                            capture_intermediates=capture_towers, mutable=True),
        images, tokens)
  return _ABSTRACT_CACHE[key]


def analytic_vit_params(patch, width, depth, mlp_dim, channels=3, learned_posemb_tokens=0,
                        cls_token=False):
  """Parameters of a pre-norm ViT encoder without head, counted from its definition."""
  patch_embedding = patch * patch * channels * width + width
  attention = width * 3 * width + 3 * width + width * width + width  # fused qkv + output
  mlp = width * mlp_dim + mlp_dim + mlp_dim * width + width
  block = 2 * 2 * width + attention + mlp  # two LayerNorms
  extras = learned_posemb_tokens * width + (width if cls_token else 0)
  return patch_embedding + depth * block + 2 * width + extras  # final LayerNorm


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_output_shapes(name):
  config = load(name)
  config_lib.validate_config(config)
  outputs, variables = abstract_forward(config)
  proj = config.model.clr.proj_dim_out
  assert outputs["img_emb"].shape == (ABSTRACT_BATCH, proj)
  assert outputs["txt_emb"].shape == (ABSTRACT_BATCH, proj)
  assert outputs["img_emb"].dtype == outputs["txt_emb"].dtype == jnp.float32
  assert outputs["logit_scale_log"].shape == ()

  img = config.model.model_img
  grid = config.image_size // img.patches.size[0]
  kept = masking.num_kept(grid * grid, img.mask_ratio) if img.mask_ratio > 0 else grid * grid
  tokens = kept + (1 if img.use_cls_token else 0)
  (img_out,) = variables["intermediates"]["img_encoder"]["__call__"]
  assert img_out["tokens"].shape == (ABSTRACT_BATCH, tokens, img.hidden_size)
  assert img_out["pooled"].shape == (ABSTRACT_BATCH, img.hidden_size)
  (txt_out,) = variables["intermediates"]["txt_encoder"]["__call__"]
  txt = config.model.model_txt
  assert txt_out["tokens"].shape == (ABSTRACT_BATCH, config.aug.txt.max_len, txt.hidden_size)
  # The token table is padded to whole multiples of VOCAB_ROW_MULTIPLE rows (shards over model).
  table_rows = math.ceil(txt.vocab_size / text_lib.VOCAB_ROW_MULTIPLE) * text_lib.VOCAB_ROW_MULTIPLE
  assert variables["params"]["txt_encoder"]["token_embedding"].shape == (table_rows,
                                                                         txt.hidden_size)
  assert variables["params"]["img_proj"]["kernel"].shape == (img.hidden_size, proj)
  assert variables["params"]["txt_proj"]["kernel"].shape == (txt.hidden_size, proj)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_image_encoder_parameter_count(name):
  config = load(name)
  img = config.model.model_img
  patch = img.patches.size[0]
  _, variables = abstract_forward(config)
  measured = count(variables["params"]["img_encoder"])
  grid = config.image_size // patch
  expected = analytic_vit_params(
      patch, img.hidden_size, img.transformer.num_layers, img.transformer.mlp_dim,
      learned_posemb_tokens=0 if img.sincos else grid * grid, cls_token=img.use_cls_token)
  assert measured == expected
  known = KNOWN_VIT_PARAMS.get((patch, img.hidden_size, img.transformer.num_layers))
  if known is not None:
    assert abs(measured - known) / known < KNOWN_VIT_TOLERANCE, (name, measured, known)


def test_the_three_published_sizes_are_covered():
  sizes = set()
  for name in CONFIG_NAMES:
    img = load(name).model.model_img
    sizes.add((img.patches.size[0], img.hidden_size, img.transformer.num_layers))
  assert set(KNOWN_VIT_PARAMS) <= sizes


# --- layers ---------------------------------------------------------------------------------------


def numpy_sincos_2d(grid_h, grid_w, width):
  """float64 reference in FLIP/MAE's layout: [sin(x), cos(x), sin(y), cos(y)], x = column."""
  quarter = width // 4
  omega = SINCOS_TEMPERATURE ** (-np.arange(quarter, dtype=np.float64) / quarter)
  table = np.zeros((grid_h * grid_w, width), np.float64)
  for row in range(grid_h):
    for col in range(grid_w):
      table[row * grid_w + col] = np.concatenate(
          [np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
  return table


@pytest.mark.parametrize("grid_h,grid_w,width", [(14, 14, 1024), (16, 16, 1280), (3, 5, 8),
                                                 (7, 7, 64)])
def test_sincos_2d_against_float64_numpy(grid_h, grid_w, width):
  got = np.asarray(layers.sincos_2d(grid_h, grid_w, width))
  np.testing.assert_allclose(got, numpy_sincos_2d(grid_h, grid_w, width), rtol=0, atol=2e-5)


def test_sincos_2d_hand_computed_entries():
  table = np.asarray(layers.sincos_2d(2, 3, 4))  # one frequency (1.0) per quarter
  # Patch (row 1, col 2) is token 1 * 3 + 2 = 5: [sin 2, cos 2, sin 1, cos 1].
  np.testing.assert_allclose(table[5], [math.sin(2), math.cos(2), math.sin(1), math.cos(1)],
                             atol=1e-6)
  np.testing.assert_allclose(table[0], [0.0, 1.0, 0.0, 1.0], atol=1e-7)


def test_sincos_2d_refuses_widths_not_divisible_by_four():
  with pytest.raises(ValueError, match="divisible by 4"):
    layers.sincos_2d(4, 4, 6)


# --- text tower: padding invariance ---------------------------------------------------------------

TEXT_FIELDS = dict(vocab_size=50, max_len=16, hidden_size=32, num_layers=2, num_heads=2,
                   mlp_dim=64)
TEXT_LENGTHS = (3, 5, 8)


@pytest.mark.parametrize("pool", ["first", "avg"])
def test_text_pooled_feature_ignores_appended_padding(pool):
  model = text_lib.TextTransformer(pool=pool, **TEXT_FIELDS)
  rng = np.random.default_rng(0)
  short_len = max(TEXT_LENGTHS)
  real = [rng.integers(1, TEXT_FIELDS["vocab_size"], size=n) for n in TEXT_LENGTHS]
  short = np.zeros((len(real), short_len), np.int32)
  long = np.zeros((len(real), TEXT_FIELDS["max_len"]), np.int32)
  for row, ids in enumerate(real):
    short[row, :len(ids)] = ids
    long[row, :len(ids)] = ids
  shapes = jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t, train=False), long)
  variables = {"params": random_params(shapes["params"])}
  def apply(v, t):
    return compile_fast(lambda v, t: model.apply(v, t, train=False), v, t)(v, t)

  def encode(v, t):
    return apply(v, t)["pooled"]

  long_out = apply(variables, long)
  pooled_long = np.asarray(long_out["pooled"])
  pooled_short = np.asarray(encode(variables, short))
  # Longer rows change only the summation order of exact zeros (masked softmax weights): ulps.
  np.testing.assert_allclose(pooled_long, pooled_short, rtol=1e-6, atol=1e-6)
  # Pooling itself: FLIP's first token, or the mean of the real (non-pad) tokens.
  encoded = np.asarray(long_out["tokens"], np.float64)
  if pool == "first":
    expected = encoded[:, 0]
  else:
    expected = np.stack([encoded[row, :n].mean(axis=0) for row, n in enumerate(TEXT_LENGTHS)])
  np.testing.assert_allclose(pooled_long, expected, rtol=0, atol=1e-6)
  # The row without any padding at all (length 8 of 8) is the reference for the padded ones too.
  unpadded = np.asarray(encode(variables, short[-1:]))
  np.testing.assert_allclose(pooled_long[-1:], unpadded, rtol=1e-6, atol=1e-6)
  # The same positions filled with a real token id do change the feature: the mask matters.
  filled = np.where(long == text_lib.PAD_ID, 1, long).astype(np.int32)
  assert np.abs(np.asarray(encode(variables, filled)) - pooled_long).max() > 1e-3


# --- one stack for every tower --------------------------------------------------------------------

# A value other than the default for every field of the stack.
STACK_FIELDS = dict(num_layers=2, num_heads=2, mlp_dim=24, dropout_rate=0.1,
                    attention_dropout_rate=0.2, droppath_rate=0.3, remat_policy="full",
                    layernorm_epsilon=1e-5, gelu="tanh", dtype=jnp.bfloat16,
                    qkv_layout="separate", causal=True, layer_scale_init=0.25)


def _encoders_called(module, *args, **kwargs):
  """The `layers.Encoder` instances that `module.init(*args, **kwargs)` runs."""
  found = []

  def record(next_fun, fun_args, fun_kwargs, context):
    if isinstance(context.module, layers.Encoder) and context.method_name == "__call__":
      found.append(context.module)
    return next_fun(*fun_args, **fun_kwargs)

  with flax.linen.intercept_methods(record):
    jax.eval_shape(lambda: module.init(rngs(), *args, **kwargs))
  return found


def test_every_tower_gives_its_encoder_all_its_stack_fields():
  stack_names = {f.name for f in dataclasses.fields(layers.EncoderFields)} - {"parent", "name"}
  assert set(STACK_FIELDS) == stack_names
  defaults = layers.Encoder(num_layers=1, num_heads=1, mlp_dim=1)
  assert all(getattr(defaults, k) != v for k, v in STACK_FIELDS.items())
  towers = [
      (vit_lib.VisionTransformer(patch_size=(4, 4), hidden_size=8, **STACK_FIELDS),
       (jnp.zeros((1, 8, 8, 3), jnp.uint8),), {}),
      (text_lib.TextTransformer(vocab_size=10, max_len=4, hidden_size=8, **STACK_FIELDS),
       (jnp.ones((1, 4), jnp.int32),), {}),
      (mae_lib.MaeDecoder(hidden_size=8, **STACK_FIELDS),
       (jnp.zeros((1, 2, 8)), jnp.arange(4)[None], (2, 2), 0, 48), {}),
  ]
  for tower, args, kwargs in towers:
    (encoder,) = _encoders_called(tower, *args, train=True, **kwargs)
    assert encoder.name == "Transformer" and encoder.final_norm
    assert {k: getattr(encoder, k) for k in STACK_FIELDS} == STACK_FIELDS, type(tower).__name__


def test_config_keys_reach_the_towers_fields():
  config = load("configs/cfg_flip_base.py:smoke",
                ["model.model_img.transformer.gelu=exact",
                 "model.model_txt.transformer.remat_policy=actcp",
                 "model.clr.tau_init=0.5"])
  # The other tower keeps a different value, so crossed wires would show.
  assert config.model.model_txt.transformer.gelu != "exact"
  assert config.model.model_img.transformer.remat_policy != "actcp"
  model = flip_lib.flip_model_from_config(config)
  img = vit_lib.VisionTransformer(**model.img)
  txt = text_lib.TextTransformer(**model.txt)
  assert (img.gelu, txt.gelu) == ("exact", config.model.model_txt.transformer.gelu)
  assert (img.remat_policy, txt.remat_policy) == (
      config.model.model_img.transformer.remat_policy, "actcp")
  assert img.num_layers == config.model.model_img.transformer.num_layers
  assert txt.max_len == config.aug.txt.max_len
  assert img.layernorm_epsilon == config.model.model_img.layernorm_epsilon
  assert model.tau_init == 0.5
  decoder = mae_lib.decoder_kwargs_from_config(load("cfg_mae_demo").model.decoder)
  assert (decoder["hidden_size"], decoder["num_layers"], decoder["mlp_dim"]) == (64, 2, 256)


# --- remat ----------------------------------------------------------------------------------------


def _remat_policies_in(closed_jaxpr):
  """The `policy` of every remat equation in a jaxpr, nested jaxprs included."""
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if "policy" in eqn.params and "jaxpr" in eqn.params:
        found.append(eqn.params["policy"])
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            visit(inner)

  visit(closed_jaxpr.jaxpr)
  return found


def test_remat_policies_give_the_same_gradients():
  """Same gradients for every remat name (masking and drop path on), and unit-norm embeddings;
  FLIP's mapping: "minimal" saves dots without batch dims, any other name is full remat."""
  overrides = ["model.model_img.transformer.droppath_rate=0.1",
               "model.model_txt.transformer.droppath_rate=0.1",
               "model.model_img.transformer.num_layers=1",
               "model.model_txt.transformer.num_layers=1",
               "aug.txt.max_len=8"]
  base = load(SMOKE_CONFIG, overrides)
  images = np.random.default_rng(0).integers(
      0, 256, size=(4, base.image_size, base.image_size, 3)).astype(np.uint8)
  tokens = np.random.default_rng(1).integers(
      1, 100, size=(4, base.aug.txt.max_len)).astype(np.int32)
  tokens[:, 5:] = text_lib.PAD_ID
  model = flip_lib.flip_model_from_config(base)
  shapes = jax.eval_shape(lambda x, t: model.init(rngs(), x, t, train=False), images, tokens)
  params = random_params(shapes["params"])
  step_rngs = rngs(seed=10)

  grads, policies, embeddings = {}, {}, {}
  for policy in layers.REMAT_POLICIES + ("anything_else",):
    config = load(SMOKE_CONFIG, overrides + [
        f"model.model_img.transformer.remat_policy={policy}",
        f"model.model_txt.transformer.remat_policy={policy}"])
    remat_model = flip_lib.flip_model_from_config(config)

    def loss(p, m=remat_model):
      out = m.apply({"params": p}, images, tokens, train=True, rngs=step_rngs)
      logits = jnp.exp(out["logit_scale_log"]) * out["img_emb"] @ out["txt_emb"].T
      value = jnp.mean(jax.nn.log_softmax(logits, axis=1).diagonal()) + jnp.sum(logits ** 2) * 1e-3
      return value, out

    grad_fn = jax.grad(loss, has_aux=True)
    policies[policy] = _remat_policies_in(jax.make_jaxpr(grad_fn)(params))
    grads[policy], embeddings[policy] = compile_fast(grad_fn, params)(params)

  assert policies["none"] == []
  assert policies["minimal"] == [jax.checkpoint_policies.dots_with_no_batch_dims_saveable] * 2
  for full in ("full", "actcp", "anything_else"):
    assert policies[full] == [None] * 2, full
  reference = traverse_util.flatten_dict(grads["none"], sep="/")
  assert max(float(jnp.abs(g).max()) for g in reference.values()) > 1e-3  # not a vacuous check
  for policy in ("minimal", "full", "actcp", "anything_else"):
    for key, grad in traverse_util.flatten_dict(grads[policy], sep="/").items():
      np.testing.assert_allclose(np.asarray(grad), np.asarray(reference[key]), rtol=1e-5,
                                 atol=1e-5, err_msg=f"{policy}: {key}")
  for key in ("img_emb", "txt_emb"):
    emb = np.asarray(embeddings["none"][key], np.float64)
    assert emb.shape == (4, base.model.clr.proj_dim_out)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_actcp_is_full_remat_and_saves_less_than_minimal_and_none():
  """FLIP's names: `actcp` (like any name but none/minimal) keeps what full remat keeps.

  What the forward pass keeps for the backward pass is measured as the residuals of `jax.vjp`
  (backend-independent): none > minimal (the weight-matmul outputs) > full == actcp (block inputs).
  XLA's compiled memory analysis of the gradient step is also read, as bench/memory.py reads it:
  actcp's temporaries equal full remat's. They are not below minimal's or none's on XLA's CPU
  backend, which does not use rematerialisation to shorten lifetimes (full remat's temporaries
  come out a few per cent above none's; docs/BENCHMARKS.md), so that comparison is for TPU/GPU.
  """
  images = np.random.default_rng(0).integers(0, 256, size=(8, 32, 32, 3)).astype(np.uint8)
  tokens = np.random.default_rng(1).integers(1, 100, size=(8, 8)).astype(np.int32)
  residual_bytes, residual_shapes, temporaries = {}, {}, {}
  for policy in ("none", "minimal", "full", "actcp"):
    config = load(SMOKE_CONFIG, [f"model.model_img.transformer.remat_policy={policy}",
                                 f"model.model_txt.transformer.remat_policy={policy}",
                                 "aug.txt.max_len=8"])
    assert config.image_size == 32
    model = flip_lib.flip_model_from_config(config)
    params = model.init(rngs(), images, tokens, train=False)["params"]

    def loss(p, m=model):
      out = m.apply({"params": p}, images, tokens, train=True, rngs=rngs(seed=5))
      return jnp.sum(out["img_emb"] @ out["txt_emb"].T)

    _, vjp_fn = jax.vjp(loss, params)
    saved = [leaf for leaf in jax.tree_util.tree_leaves(vjp_fn) if isinstance(leaf, jax.Array)]
    residual_bytes[policy] = sum(leaf.nbytes for leaf in saved)
    residual_shapes[policy] = sorted(leaf.shape for leaf in saved)
    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    temporaries[policy] = compiled.memory_analysis().temp_size_in_bytes
  print(f"vjp residual bytes {residual_bytes}; compiled temporaries {temporaries}")
  assert residual_shapes["actcp"] == residual_shapes["full"]
  assert residual_bytes["none"] > residual_bytes["minimal"] > residual_bytes["full"]
  assert temporaries["actcp"] == temporaries["full"]


# --- FLIP head: temperature, projections, normalisation ------------------------------------------


def test_logit_scale_init_clip_and_fixed_tau():
  config = load(SMOKE_CONFIG)
  model = flip_lib.flip_model_from_config(config)
  params = model.init(rngs(), method=model.log_logit_scale)["params"]
  assert params["logit_scale"].shape == (1,)  # FLIP's layout
  assert float(params["logit_scale"][0]) == pytest.approx(math.log(1 / 0.07), abs=1e-6)

  def clipped(raw):
    return float(model.apply({"params": {"logit_scale": jnp.full((1,), raw, jnp.float32)}},
                             method=model.log_logit_scale))

  assert clipped(10.0) == pytest.approx(math.log(100.0), abs=1e-6)
  assert clipped(-1.0) == 0.0
  assert clipped(2.0) == pytest.approx(2.0)

  fixed = flip_lib.flip_model_from_config(
      load(SMOKE_CONFIG, ["model.clr.tau_learnable=False", "model.clr.tau=0.01"]))
  assert "logit_scale" not in fixed.init(rngs(), method=fixed.log_logit_scale).get("params", {})
  assert float(fixed.apply({}, method=fixed.log_logit_scale)) == pytest.approx(math.log(100.0))


def test_projections_have_no_bias_by_default():
  config = load(SMOKE_CONFIG)
  _, variables = abstract_forward(config)
  assert set(variables["params"]["img_proj"]) == {"kernel"}
  assert set(variables["params"]["txt_proj"]) == {"kernel"}
  with_bias = load(SMOKE_CONFIG, ["model.clr.proj_out_bias=True"])
  _, variables = abstract_forward(with_bias)
  assert set(variables["params"]["img_proj"]) == {"kernel", "bias"}


# --- t5x sees every parameter ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_train_state():
  config = load(SMOKE_CONFIG)
  model = flip_lib.flip_model_from_config(config)
  images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.uint8)
  tokens = jax.ShapeDtypeStruct((1, config.aug.txt.max_len), jnp.int32)
  variables = jax.eval_shape(lambda x, t: model.init(rngs(), x, t, train=False), images, tokens)
  optimizer = t5x_optimizers.OptaxWrapper(optim.make_optimizer(config))
  return variables, jax.eval_shape(
      lambda v: t5x_train_state.FlaxOptimTrainState.create(optimizer, flax.core.freeze(v)),
      variables)


def flat(tree):
  return traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def moment_specs(mesh_axes):
  """{(moment, param path): spec} for the Adam mu/nu leaves of a mesh-axes train state."""
  out = {}
  for key, spec in traverse_util.flatten_dict(mesh_axes.state_dict(), sep="/",
                                              keep_empty_nodes=True).items():
    parts = key.split("/")
    if parts[:2] == ["state", "param_states"] and ("mu" in parts or "nu" in parts):
      moment_at = parts.index("mu") if "mu" in parts else parts.index("nu")
      out[(parts[moment_at], "/".join(parts[moment_at + 1:]))] = spec
  return out


def test_every_parameter_has_logical_axes_of_its_rank(smoke_train_state):
  variables, _ = smoke_train_state
  params = flat(variables["params"])
  axes = {key.removesuffix("_axes"): meta for key, meta in flat(variables["params_axes"]).items()}
  assert set(axes) == set(params)
  for key, leaf in params.items():
    assert len(axes[key].names) == leaf.ndim, key


def test_get_mesh_axes_gives_a_spec_for_every_parameter_and_adam_moment(smoke_train_state):
  variables, state = smoke_train_state
  partitioner = partitioning.FlipPjitPartitioner(num_partitions=1)
  mesh_axes = partitioner.get_mesh_axes(state)
  params = flat(variables["params"])
  param_specs = flat(mesh_axes.params)
  assert set(param_specs) == set(params)
  for key, spec in param_specs.items():
    assert isinstance(spec, PartitionSpec), key
    assert len(spec) == params[key].ndim, key
  moments = moment_specs(mesh_axes)
  assert set(moments) == {(m, key) for m in ("mu", "nu") for key in params}
  for (moment, key), spec in moments.items():
    assert isinstance(spec, PartitionSpec), (moment, key)
    assert len(spec) == params[key].ndim, (moment, key)


def _rule_table():
  """t5x's standard rules (parameter_partitioning_dims=1) as {logical name: mesh axis}."""
  table = {}
  for logical, mesh_axis in t5x_partitioning.standard_logical_axis_rules():
    table.setdefault(logical, mesh_axis)
  return table


def test_mlp_and_attention_kernels_are_sharded_on_model_by_t5x_rules(smoke_train_state):
  variables, state = smoke_train_state
  rules = _rule_table()
  assert rules["mlp"] == rules["heads"] == rules["vocab"] == "model"
  assert rules["embed"] is None
  partitioner = partitioning.FlipPjitPartitioner(num_partitions=2, mesh_shape=(4, 2))
  assert dict(partitioner.mesh.shape) == {"data": 4, "model": 2}
  specs = flat(partitioner.get_mesh_axes(state).params)
  block = "img_encoder/Transformer/encoderblock_00"
  assert specs[f"{block}/MlpBlock_0/Dense_0/kernel"] == PartitionSpec(None, "model")
  assert specs[f"{block}/MlpBlock_0/Dense_1/kernel"] == PartitionSpec("model", None)
  for name in ("query", "key", "value"):
    assert specs[f"{block}/MultiHeadSelfAttention_0/{name}/kernel"] == PartitionSpec(
        None, "model", None)
  assert specs[f"{block}/MultiHeadSelfAttention_0/out/kernel"] == PartitionSpec(
      "model", None, None)
  assert specs["txt_encoder/token_embedding"] == PartitionSpec("model", None)
  # Every spec agrees with the rule table applied to the parameter's logical names.
  for key, meta in flat(variables["params_axes"]).items():
    expected = PartitionSpec(*(rules.get(name) for name in meta.names))
    assert specs[key.removesuffix("_axes")] == expected, key


def _uses_data(spec):
  return any(entry == "data" or (isinstance(entry, tuple) and "data" in entry) for entry in spec)


def test_partition_states_shards_adam_moments_of_kernels_over_data(smoke_train_state):
  variables, state = smoke_train_state
  plain = partitioning.FlipPjitPartitioner(num_partitions=2, mesh_shape=(4, 2))
  zero1 = partitioning.FlipPjitPartitioner(num_partitions=2, mesh_shape=(4, 2),
                                           partition_states=True)
  assert zero1.partition_states
  plain_axes, zero1_axes = plain.get_mesh_axes(state), zero1.get_mesh_axes(state)
  params = flat(variables["params"])
  zero1_params = flat(zero1_axes.params)
  assert zero1_params == flat(plain_axes.params)
  assert not any(_uses_data(spec) for spec in zero1_params.values())
  assert not any(_uses_data(spec) for spec in moment_specs(plain_axes).values())

  kernels = [k for k, v in params.items() if k.endswith("kernel") and v.ndim >= 2]
  assert len(kernels) >= 10
  for (moment, key), spec in moment_specs(zero1_axes).items():
    if key in kernels:
      assert _uses_data(spec), (moment, key, spec)
      # The model-axis sharding of the parameter is kept.
      param_spec = zero1_params[key]
      for entry, param_entry in zip(spec, param_spec):
        if param_entry is not None:
          assert entry == param_entry, (moment, key, spec)
      data_axis = list(spec).index("data")
      assert params[key].shape[data_axis] % 4 == 0
    elif params[key].ndim <= 1:
      assert not _uses_data(spec), (moment, key, spec)


MAE_FAMILY_NAMES = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.py")
                          if p.stem.startswith(MAE_FAMILY_PREFIXES))


@pytest.mark.parametrize("name", MAE_FAMILY_NAMES)
def test_mae_family_configs_build_their_task_model_abstractly(name):
  """Every MAE / M3AE / probe / fine-tune config validates and its task's variables have logical
  axes; the image encoder has the analytic ViT size (M3AE's: plus its modality type embedding)."""
  config = load(name)
  config_lib.validate_config(config)
  task = builders.build_task(config)
  variables = jax.eval_shape(task.init_variables, jax.random.key(0))
  params = traverse_util.flatten_dict(flax.core.unfreeze(variables["params"]), sep="/")
  axes = traverse_util.flatten_dict(flax.core.unfreeze(variables["params_axes"]), sep="/")
  assert params and len(axes) == len(params)
  for key, value in params.items():
    assert len(axes[key + "_axes"].names) == value.ndim, key
  encoder = count(variables["params"]["img_encoder"])
  img = config.model.model_img
  grid_tokens = (config.image_size // img.patches.size[0]) ** 2
  expected = analytic_vit_params(img.patches.size[0], img.hidden_size,
                                 img.transformer.num_layers, img.transformer.mlp_dim,
                                 cls_token=img.use_cls_token,
                                 learned_posemb_tokens=0 if img.sincos else grid_tokens)
  if config.task == "m3ae":
    expected += img.hidden_size  # the image modality's type embedding
  assert encoder == expected, (encoder, expected)
