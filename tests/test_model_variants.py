"""The model switches that host open_clip's and timm's weights (QuickGELU, causal attention,
LayerScale, ln_pre, patch bias, class-token position row, fc_norm, EOT pooling), each against a
float64 numpy forward written here from the published definitions.

The converters' own tests compare whole imported models with open_clip and timm; this file pins
each switch on its own, so a regression names the switch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flip.models import layers
from flip.models import text as text_lib
from flip.models import vit as vit_lib


def f64(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def np_layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu(x, kind):
  if kind == "quick":
    return x / (1.0 + np.exp(-1.702 * x))
  from scipy import special  # pylint: disable=import-outside-toplevel
  return 0.5 * x * (1.0 + special.erf(x / np.sqrt(2.0)))


def np_attention(x, p, heads, causal, key_mask=None):
  b, n, d = x.shape
  qkv = np.einsum("bld,dshk->sblhk", x, p["qkv_kernel"]) + p["qkv_bias"][:, None, None]
  q, k, v = qkv
  logits = np.einsum("bqhk,bthk->bhqt", q * (d // heads) ** -0.5, k)
  allowed = np.ones((b, 1, n, n), bool)
  if causal:
    allowed &= np.tril(np.ones((n, n), bool))[None, None]
  if key_mask is not None:
    allowed &= key_mask[:, None, None, :]
  logits = np.where(allowed, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("bhqt,bthk->bqhk", weights, v)
  return np.einsum("blhk,hkd->bld", out, p["out_kernel"]) + p["out_bias"]


def np_encoder(x, p, *, heads, depth, gelu, causal, final_norm=True, key_mask=None):
  for layer in range(depth):
    blk = p[f"encoderblock_{layer:02d}"]
    y = np_attention(np_layer_norm(x, blk["LayerNorm_0"]), blk["MultiHeadSelfAttention_0"], heads,
                     causal, key_mask)
    if "layerscale_msa" in blk:
      y = y * blk["layerscale_msa"]["scale"]
    x = x + y
    mlp = blk["MlpBlock_0"]
    h = np_layer_norm(x, blk["LayerNorm_1"]) @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"]
    y = np_gelu(h, gelu) @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]
    if "layerscale_mlp" in blk:
      y = y * blk["layerscale_mlp"]["scale"]
    x = x + y
  return np_layer_norm(x, p["encoder_norm"]) if final_norm else x


def randomized(params, seed):
  """Every parameter replaced by N(0, 0.3) (LayerNorm scales around 1), so no switch hides
  behind a zero or unit initialisation."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    noise = rng.normal(0.0, 0.3, leaf.shape)
    if str(path[-1].key) == "scale":
      noise = noise + 1.0
    out.append(jnp.asarray(noise, jnp.float32))
  return jax.tree_util.tree_unflatten(treedef, out)


def test_quick_gelu_is_openais_definition():
  x = np.linspace(-6, 6, 101)
  np.testing.assert_allclose(np.asarray(layers.gelu(jnp.asarray(x, jnp.float32), "quick")),
                             np_gelu(x, "quick"), atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layer_scale_init", [None, 0.1])
def test_encoder_switches_match_the_numpy_forward(causal, layer_scale_init):
  encoder = layers.Encoder(num_layers=2, num_heads=2, mlp_dim=32, gelu="quick", causal=causal,
                           layer_scale_init=layer_scale_init, qkv_layout="fused")
  x = np.random.default_rng(0).normal(size=(3, 5, 16)).astype(np.float32)
  key_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
  params = encoder.init(jax.random.PRNGKey(0), x, train=False)["params"]
  if layer_scale_init is not None:
    np.testing.assert_array_equal(
        params["encoderblock_00"]["layerscale_msa"]["scale"], np.full(16, 0.1, np.float32))
  else:
    assert "layerscale_msa" not in params["encoderblock_00"]
  params = randomized(params, 1)
  got = encoder.apply({"params": params}, x, jnp.asarray(key_mask), train=False)
  want = np_encoder(x.astype(np.float64), f64(params), heads=2, depth=2, gelu="quick",
                    causal=causal, key_mask=key_mask)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_causal_attention_ignores_later_tokens():
  encoder = layers.Encoder(num_layers=2, num_heads=2, mlp_dim=32, causal=True)
  x = np.random.default_rng(0).normal(size=(2, 6, 16)).astype(np.float32)
  params = encoder.init(jax.random.PRNGKey(0), x, train=False)
  changed = x.copy()
  changed[:, 4:] += np.random.default_rng(1).normal(size=changed[:, 4:].shape).astype(np.float32)
  a = np.asarray(encoder.apply(params, x, train=False))
  b = np.asarray(encoder.apply(params, changed, train=False))
  np.testing.assert_array_equal(a[:, :4], b[:, :4])
  assert np.abs(a[:, 4:] - b[:, 4:]).max() > 1e-2


def np_vit(p, images, *, patch, heads, depth, gelu, pool, ln_pre, pooled_norm, mean, std):
  b, h, w, c = images.shape
  x = (images - np.asarray(mean)) / np.asarray(std)
  grid = (h // patch, w // patch)
  x = x.reshape(b, grid[0], patch, grid[1], patch, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, grid[0] * grid[1], patch * patch * c)
  x = x @ p["embedding"]["kernel"].reshape(-1, p["embedding"]["kernel"].shape[-1])
  if "bias" in p["embedding"]:
    x = x + p["embedding"]["bias"]
  x = np.concatenate([np.broadcast_to(p["cls"], (b, 1, x.shape[-1])), x], axis=1)
  x = x + p["pos_embedding"]  # the class token's row first, as timm and open_clip store it
  if ln_pre:
    x = np_layer_norm(x, p["ln_pre"])
  x = np_encoder(x, p["Transformer"], heads=heads, depth=depth, gelu=gelu, causal=False,
                 final_norm=not pooled_norm)
  pooled = x[:, 0] if pool == "cls" else x[:, 1:].mean(1)
  return np_layer_norm(pooled, p["fc_norm"]) if pooled_norm else pooled


@pytest.mark.parametrize("style", ["open_clip", "timm_fc_norm"])
def test_vit_switches_match_the_numpy_forward(style):
  open_clip_style = style == "open_clip"
  vit = vit_lib.VisionTransformer(
      num_layers=2, num_heads=2, mlp_dim=32, hidden_size=16, patch_size=(4, 4), sincos=False,
      use_cls_token=True, cls_posemb=True, gelu="quick" if open_clip_style else "exact",
      pool="cls" if open_clip_style else "avg", ln_pre=open_clip_style,
      patch_bias=not open_clip_style, pooled_norm=not open_clip_style, layer_scale_init=0.5,
      qkv_layout="fused")
  images = np.random.default_rng(0).uniform(0, 255, (2, 8, 12, 3)).astype(np.float32)
  params = vit.init(jax.random.PRNGKey(0), images, train=False)["params"]
  assert params["pos_embedding"].shape == (1, 1 + 2 * 3, 16)
  assert ("bias" in params["embedding"]) == (not open_clip_style)
  assert ("ln_pre" in params) == open_clip_style
  assert ("fc_norm" in params) == ("encoder_norm" not in params["Transformer"]) == (
      not open_clip_style)
  params = randomized(params, 2)
  got = vit.apply({"params": params}, images, train=False)["pooled"]
  want = np_vit(f64(params), images.astype(np.float64), patch=4, heads=2, depth=2,
                gelu=vit.gelu, pool=vit.pool, ln_pre=vit.ln_pre, pooled_norm=vit.pooled_norm,
                mean=vit.pixel_mean, std=vit.pixel_std)
  np.testing.assert_allclose(np.asarray(got), want, atol=5e-5, rtol=5e-5)


def test_cls_posemb_needs_a_learned_table_and_a_class_token():
  vit = vit_lib.VisionTransformer(num_layers=1, num_heads=2, mlp_dim=8, hidden_size=8,
                                  patch_size=(4, 4), sincos=True, use_cls_token=True,
                                  cls_posemb=True)
  with pytest.raises(ValueError, match="cls_posemb=True needs a learned table"):
    vit.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)


def test_eot_pooling_takes_the_largest_id_position():
  tower = text_lib.TextTransformer(num_layers=1, num_heads=2, mlp_dim=16, hidden_size=8,
                                   vocab_size=50, max_len=6, pool="eot", pad_mask=False,
                                   causal=True)
  tokens = jnp.asarray([[48, 5, 7, 49, 0, 0], [48, 49, 0, 0, 0, 0], [48, 3, 4, 5, 6, 49]])
  out = tower.apply(tower.init(jax.random.PRNGKey(0), tokens, train=False), tokens, train=False)
  for row, position in enumerate([3, 1, 5]):
    np.testing.assert_array_equal(np.asarray(out["pooled"][row]),
                                  np.asarray(out["tokens"][row, position]))
