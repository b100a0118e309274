"""Numerics of flip.models.precision (the matmul primitives and the mixed-precision policy).

Every primitive's forward pass and both gradients in bfloat16 against a float64 NumPy reference:
- against the reference computed from the same bfloat16-rounded operands (and the incoming
  gradient rounded to bfloat16, as the backward pass does): only the float32 accumulation and the
  final rounding differ, so the tolerance is tight (float32 results within 1e-5 of the norm,
  results rounded to bfloat16 within 2^-8). A bfloat16 accumulation, or a weight gradient rounded
  to bfloat16, misses it by two orders of magnitude;
- against the exact float64 reference of the unrounded operands: bfloat16's tolerance (operands
  rounded to 8 significant bits: 2^-8 of the norm with room for the sum).
The float32 compute path is the plain float32 einsum / dot, bit for bit. On the demo model the
bfloat16 step's loss and gradients are within stated tolerances of float32's, and every matmul of
the bfloat16 step takes bfloat16 operands and accumulates in float32 (the loss's float32 logits
excepted, by policy).
"""

import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cfg_demo
from flip import builders
from flip.models import attention
from flip.models import layers
from flip.models import precision

BF16 = jnp.bfloat16
F32 = jnp.float32
TIGHT = 1e-5  # float32 result from bfloat16 operands vs float64 of the same operands
ROUNDED = 2.0 ** -8  # a result rounded to bfloat16 (relative half-ulp 2^-9, with room)
BF16_VS_EXACT = 2.0 ** -6  # any result vs float64 of the unrounded operands


def rel_err(got, want):
  got = np.asarray(got, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def bf16_round(x):
  return np.asarray(jnp.asarray(x, F32).astype(BF16).astype(F32), np.float64)


def draw(rng, *shape):
  return rng.standard_normal(shape).astype(np.float32)


def vjp_mixed(fn, *args):
  """fn(*args) and the gradient of <fn(*args), g> for a random float32 g."""
  out, vjp = jax.vjp(fn, *args)
  g = np.random.RandomState(7).standard_normal(out.shape).astype(np.float32)
  return out, g, vjp(jnp.asarray(g, out.dtype))


# (spec, x shape, kernel shape): the layers' weight matmuls and the patch embedding.
CONTRACTIONS = [
    ("bld,dm->blm", (3, 10, 48), (48, 40)),  # Dense on [B, L, D] (MLP, projections)
    ("bd,dm->bm", (24, 48), (48, 16)),  # Dense on pooled [B, D] (img_proj / txt_proj)
    ("bld,dshk->sblhk", (3, 10, 48), (48, 3, 4, 12)),  # a transposed output
    ("bld,dshk->blshk", (3, 10, 48), (48, 3, 4, 12)),  # fused q/k/v
    ("bld,dhk->blhk", (3, 10, 48), (48, 4, 12)),  # separate q, k or v
    ("blhk,hkd->bld", (3, 10, 4, 12), (4, 12, 48)),  # attention output
    ("bpc,cd->bpd", (3, 16, 48), (48, 32)),  # patch embedding (patchified)
]


@pytest.mark.parametrize("spec,x_shape,k_shape", CONTRACTIONS)
def test_contract_forward_and_both_gradients_against_float64(spec, x_shape, k_shape):
  rng = np.random.RandomState(0)
  x, kernel = draw(rng, *x_shape), draw(rng, *k_shape)
  out, g, (dx, dk) = vjp_mixed(
      lambda a, b: precision.contract(spec, a, b, BF16), jnp.asarray(x, BF16), jnp.asarray(kernel))
  assert out.dtype == F32 and dx.dtype == BF16 and dk.dtype == F32  # kernel gradient not rounded
  xr, kr, gr = bf16_round(x), bf16_round(kernel), bf16_round(g)
  inputs, out_axes = spec.split("->")
  x_axes, k_axes = inputs.split(",")
  ref = np.einsum(spec, xr, kr)
  ref_dx = np.einsum(f"{out_axes},{k_axes}->{x_axes}", gr, kr)
  ref_dk = np.einsum(f"{x_axes},{out_axes}->{k_axes}", xr, gr)
  assert rel_err(out, ref) < TIGHT
  assert rel_err(dk, ref_dk) < TIGHT
  assert rel_err(dx, ref_dx) < ROUNDED
  exact = np.einsum(spec, x.astype(np.float64), kernel.astype(np.float64))
  assert rel_err(out, exact) < BF16_VS_EXACT
  exact_dk = np.einsum(f"{x_axes},{out_axes}->{k_axes}", x.astype(np.float64), g)
  assert rel_err(dk, exact_dk) < BF16_VS_EXACT


# (spec, x shape, kernel shape) of the matmuls that carry a bias (their output keeps the kernel's
# axes last, in order).
AFFINE = [c for c in CONTRACTIONS if c[0] != "bld,dshk->sblhk"]


@pytest.mark.parametrize("spec,x_shape,k_shape", AFFINE)
def test_contract_with_bias_rounds_once_and_keeps_the_cotangent_in_bfloat16(spec, x_shape,
                                                                            k_shape):
  rng = np.random.RandomState(3)
  x, kernel = draw(rng, *x_shape), draw(rng, *k_shape)
  inputs, out_axes = spec.split("->")
  x_axes, k_axes = inputs.split(",")
  n_shared = sum(a in k_axes for a in x_axes)
  bias = draw(rng, *k_shape[n_shared:])
  out, vjp = jax.vjp(lambda a, b, c: precision.contract(spec, a, b, BF16, c),
                     jnp.asarray(x, BF16), jnp.asarray(kernel), jnp.asarray(bias))
  g = np.random.RandomState(7).standard_normal(out.shape).astype(np.float32)
  dx, dk, db = vjp(jnp.asarray(g, BF16))
  assert out.dtype == BF16 and dx.dtype == BF16 and dk.dtype == F32 and db.dtype == F32
  xr, kr, gr = bf16_round(x), bf16_round(kernel), bf16_round(g)
  ref = np.einsum(spec, xr, kr) + bias
  assert rel_err(out, ref) < ROUNDED
  # One rounding: the bfloat16 rounding of the exact sum, except where float32 accumulation
  # lands on the other side of a rounding boundary (rare); rounding the matmul before adding
  # the bias would differ in a large fraction of the elements.
  once = np.asarray(jnp.asarray(ref, F32).astype(BF16), np.float32)
  assert np.mean(np.asarray(out, np.float32) != once) < 0.005
  assert rel_err(dk, np.einsum(f"{x_axes},{out_axes}->{k_axes}", xr, gr)) < TIGHT
  assert rel_err(dx, np.einsum(f"{out_axes},{k_axes}->{x_axes}", gr, kr)) < ROUNDED
  lead = tuple(range(len(out_axes) - (len(k_axes) - n_shared)))
  assert rel_err(db, gr.sum(axis=lead)) < TIGHT


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_contract_with_bias_refuses_a_transposed_output(dtype):
  x, kernel = jnp.ones((2, 3, 8), dtype), jnp.ones((8, 3, 2, 4))
  with pytest.raises(ValueError, match="kernel's axes last"):
    precision.contract("bld,dshk->sblhk", x, kernel, dtype, jnp.ones((3, 2, 4)))


def test_dense_is_contract_on_the_last_axis():
  rng = np.random.RandomState(1)
  x, kernel = jnp.asarray(draw(rng, 2, 5, 3, 16), BF16), jnp.asarray(draw(rng, 16, 8))
  np.testing.assert_array_equal(precision.dense(x, kernel, BF16),
                                precision.contract("abck,kn->abcn", x, kernel, BF16))


def test_attention_logits_forward_and_both_gradients_against_float64():
  rng = np.random.RandomState(2)
  q, k = draw(rng, 2, 7, 3, 16), draw(rng, 2, 9, 3, 16)
  out, g, (dq, dk) = vjp_mixed(lambda a, b: precision.attention_logits(a, b, BF16),
                               jnp.asarray(q, BF16), jnp.asarray(k, BF16))
  assert out.dtype == F32 and dq.dtype == BF16 and dk.dtype == BF16
  qr, kr, gr = bf16_round(q), bf16_round(k), bf16_round(g)
  assert rel_err(out, np.einsum("bqhk,bthk->bhqt", qr, kr)) < TIGHT
  assert rel_err(dq, np.einsum("bhqt,bthk->bqhk", gr, kr)) < ROUNDED
  assert rel_err(dk, np.einsum("bhqt,bqhk->bthk", gr, qr)) < ROUNDED
  assert rel_err(out, np.einsum("bqhk,bthk->bhqt", q.astype(np.float64), k)) < BF16_VS_EXACT


def test_attention_values_forward_and_both_gradients_against_float64():
  rng = np.random.RandomState(3)
  w, v = draw(rng, 2, 3, 7, 9), draw(rng, 2, 9, 3, 16)
  out_f32, g, (dw, dv) = vjp_mixed(
      lambda a, b: precision.attention_values(a, b, BF16).astype(F32),
      jnp.asarray(w, BF16), jnp.asarray(v, BF16))
  wr, vr, gr = bf16_round(w), bf16_round(v), bf16_round(g)
  assert precision.attention_values(jnp.asarray(w, BF16), jnp.asarray(v, BF16), BF16).dtype == BF16
  assert rel_err(out_f32, np.einsum("bhqt,bthk->bqhk", wr, vr)) < ROUNDED
  assert rel_err(dw, np.einsum("bqhk,bthk->bhqt", gr, vr)) < ROUNDED
  assert rel_err(dv, np.einsum("bhqt,bqhk->bthk", wr, gr)) < ROUNDED


def test_self_attention_gradient_runs_when_the_loss_reads_the_attention_output():
  # One array as query, key and value, the loss straight from the attention output: XLA once
  # folded a transpose into a backward dot here and failed at run time (bfloat16 x bfloat16 ->
  # float32 outside the YNNPACK fusion). Checked against float64 of the same rounded operands.
  x = draw(np.random.RandomState(4), 4, 50, 6, 64)

  def loss(a):
    weights = jax.nn.softmax(precision.attention_logits(a, a, BF16)).astype(BF16)
    return jnp.sum(precision.attention_values(weights, a, BF16).astype(F32) ** 2)

  got = jax.jit(jax.grad(loss))(jnp.asarray(x, BF16))

  def loss64(a):
    a = jnp.asarray(a, jnp.float64)
    weights = jax.nn.softmax(jnp.einsum("bqhk,bthk->bhqt", a, a))
    return jnp.sum(jnp.einsum("bhqt,bthk->bqhk", weights, a) ** 2)

  with jax.enable_x64(True):
    want = np.asarray(jax.grad(loss64)(bf16_round(x)))
  assert rel_err(got, want) < BF16_VS_EXACT


def test_accumulation_is_float32_not_bfloat16():
  """A long sum of bfloat16 products: a bfloat16 accumulator loses the small terms."""
  k = 4096
  x = np.full((8, k), 1.0, np.float32)
  x[:, 0] = 256.0  # the running sum passes 256, where a bfloat16 accumulator stops adding 1s
  kernel = np.ones((k, 8), np.float32)
  out = precision.dense(jnp.asarray(x, BF16), jnp.asarray(kernel), BF16)
  np.testing.assert_array_equal(np.asarray(out), np.full((8, 8), 256.0 + k - 1))


def test_add_param_reduces_the_parameter_gradient_in_float32():
  """The bias gradient is the batch sum of the incoming gradient, summed in float32."""
  rng = np.random.RandomState(4)
  y = jnp.asarray(draw(rng, 512, 8), F32)
  bias = jnp.asarray(draw(rng, 8))
  g = (1.0 + rng.random_sample((512, 8)) * 2.0 ** -7).astype(np.float32)
  g = bf16_round(g).astype(np.float32)  # the gradient arrives in bfloat16
  _, vjp = jax.vjp(lambda b: precision.add_param(y, b, BF16), bias)
  (dbias,) = vjp(jnp.asarray(g, BF16))
  assert dbias.dtype == F32
  np.testing.assert_allclose(np.asarray(dbias), g.astype(np.float64).sum(0), rtol=1e-6)


@pytest.mark.parametrize("spec,x_shape,k_shape", CONTRACTIONS)
def test_float32_compute_is_the_plain_einsum_bit_for_bit(spec, x_shape, k_shape):
  rng = np.random.RandomState(5)
  x, kernel = jnp.asarray(draw(rng, *x_shape)), jnp.asarray(draw(rng, *k_shape))
  fn = lambda a, b: precision.contract(spec, a, b, F32)
  assert str(jax.make_jaxpr(fn)(x, kernel)) == str(
      jax.make_jaxpr(lambda a, b: jnp.einsum(spec, a, b))(x, kernel))
  np.testing.assert_array_equal(jax.jit(fn)(x, kernel), jax.jit(
      lambda a, b: jnp.einsum(spec, a, b))(x, kernel))


def test_float32_dense_layer_and_attention_are_the_plain_float32_programs():
  rng = np.random.RandomState(6)
  x = jnp.asarray(draw(rng, 2, 5, 16))
  dense = layers.Dense(8, ("embed", "mlp"))
  variables = dense.init(jax.random.PRNGKey(0), x)
  kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]
  bias = bias + 0.5
  got = dense.apply({"params": {"kernel": kernel, "bias": bias}}, x)
  np.testing.assert_array_equal(got, jax.jit(lambda a: jnp.dot(a, kernel) + bias)(x))
  q, k = jnp.asarray(draw(rng, 2, 5, 2, 8)), jnp.asarray(draw(rng, 2, 5, 2, 8))
  np.testing.assert_array_equal(
      precision.attention_logits(q, k, F32),
      jnp.einsum("bqhk,bthk->bhqt", q, k, preferred_element_type=F32))
  w = jax.nn.softmax(precision.attention_logits(q, k, F32))
  np.testing.assert_array_equal(precision.attention_values(w, k, F32),
                                jnp.einsum("bhqt,bthk->bqhk", w, k))


def test_mixed_dense_layer_rounds_its_output_to_the_compute_dtype():
  x = jnp.ones((2, 3, 16), BF16)
  dense = layers.Dense(8, ("embed", "mlp"), dtype=BF16)
  variables = dense.init(jax.random.PRNGKey(0), x)
  assert dense.apply(variables, x).dtype == BF16
  assert variables["params"]["kernel"].dtype == F32


def test_mixed_dense_layer_keeps_the_float32_accumulator_when_asked():
  rng = np.random.RandomState(8)
  x = jnp.asarray(draw(rng, 2, 3, 16)).astype(BF16)
  dense = layers.Dense(8, ("embed", "mlp"), dtype=BF16, round_output=False)
  variables = dense.init(jax.random.PRNGKey(0), x)
  kernel = bf16_round(variables["params"]["kernel"])
  bias = np.full((8,), 0.3)
  got = dense.apply({"params": {"kernel": variables["params"]["kernel"],
                                "bias": jnp.asarray(bias, F32)}}, x)
  assert got.dtype == F32
  want = np.asarray(x, np.float64) @ kernel + bias
  assert rel_err(got, want) < TIGHT


def _gelu64(x):
  from scipy import special  # pylint: disable=g-import-not-at-top
  x = np.asarray(x, np.float64)
  return 0.5 * x * (1.0 + special.erf(x / np.sqrt(2.0)))


def test_gelu_erf_form_and_erfc_form_against_float64():
  x = np.linspace(-8.0, 8.0, 20001).astype(np.float32)
  want = _gelu64(x)
  erf_form = np.asarray(jax.jit(lambda v: layers.gelu(v, "exact", erf_form=True))(x))
  erfc_form = np.asarray(jax.jit(lambda v: layers.gelu(v, "exact"))(x))
  # torch's exact GELU is within 1.1e-6 of float64 on this range; the erfc form within 4e-7.
  assert np.abs(erf_form - want).max() < 2e-6
  assert np.abs(erfc_form - want).max() < 6e-7


def test_mixed_mlp_block_applies_gelu_to_the_float32_accumulator_and_rounds_once():
  rng = np.random.RandomState(9)
  x = jnp.asarray(draw(rng, 2, 5, 16)).astype(BF16)
  block = layers.MlpBlock(32, dtype=BF16)
  variables = block.init(jax.random.PRNGKey(0), x, deterministic=True)
  params = jax.tree.map(lambda v: v + 0.1, variables["params"])
  got = block.apply({"params": params}, x, deterministic=True)
  k0, b0 = (np.asarray(params["Dense_0"][n], np.float64) for n in ("kernel", "bias"))
  k1, b1 = (np.asarray(params["Dense_1"][n], np.float64) for n in ("kernel", "bias"))
  hidden = bf16_round(_gelu64(np.asarray(x, np.float64) @ bf16_round(k0) + b0))
  want = bf16_round(hidden @ bf16_round(k1) + b1)
  assert got.dtype == BF16
  assert rel_err(got, want) < ROUNDED


def _demo_grads(dtype, batch_size=16):
  config = cfg_demo.get_config()
  config.batch_size = batch_size
  config.dtype = dtype
  task = builders.build_task(config)
  rng = np.random.RandomState(0)
  batch = {k: rng.randint(1, 200, v.shape).astype(v.dtype)
           for k, v in task.batch_spec(batch_size).items()}
  params = task.init_variables(jax.random.PRNGKey(0))["params"]
  step = jax.jit(lambda p, b: task.compute_grads(p, b, jax.random.PRNGKey(1)))
  loss, _, grads = step(params, batch)
  return task, params, batch, float(loss), grads


@pytest.fixture(scope="module")
def demo_pair():
  return _demo_grads("float32"), _demo_grads("bfloat16")


# The demo model's bfloat16 step against float32's (one random batch, fresh parameters): the
# residual stream and every activation between layer norms is bfloat16, so each gradient leaf
# carries a few percent of relative rounding noise (measured: docs/BENCHMARKS.md, "Mixed
# precision"); the bounds leave about 3x room.
DEMO_LOSS_RTOL = 1e-3
DEMO_GLOBAL_GRAD_RTOL = 0.05
DEMO_LEAF_GRAD_RTOL = 0.08
NEGLIGIBLE_LEAF = 1e-4  # leaves whose float32 gradient is below this fraction of the total norm
# (the key biases: their exact gradient is zero, float32's is rounding noise)


def test_demo_step_bfloat16_loss_and_gradients_against_float32(demo_pair):
  (_, _, _, loss32, g32), (_, _, _, loss16, g16) = demo_pair
  assert abs(loss16 - loss32) <= DEMO_LOSS_RTOL * abs(loss32)
  leaves32 = [np.asarray(l, np.float64) for l in jax.tree.leaves(g32)]
  leaves16 = jax.tree.leaves(g16)
  assert all(l.dtype == F32 for l in leaves16)  # gradients (and so the update) in float32
  leaves16 = [np.asarray(l, np.float64) for l in leaves16]
  total = np.sqrt(sum(np.sum(l ** 2) for l in leaves32))
  diff = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(leaves32, leaves16)))
  assert diff / total < DEMO_GLOBAL_GRAD_RTOL
  checked = 0
  for a, b in zip(leaves32, leaves16):
    if np.linalg.norm(a) > NEGLIGIBLE_LEAF * total:
      assert rel_err(b, a) < DEMO_LEAF_GRAD_RTOL
      checked += 1
  assert checked >= len(leaves32) - 6  # only the key biases (one per block) are left out


def _dot_generals(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, "eqns"):
          yield from _dot_generals(sub)


def test_every_matmul_of_the_bfloat16_step_is_bfloat16_with_float32_accumulation(demo_pair):
  task, params, batch, _, _ = demo_pair[1]
  jaxpr = jax.make_jaxpr(lambda p, b: task.compute_grads(p, b, jax.random.PRNGKey(1)))(
      params, batch).jaxpr
  eqns = list(_dot_generals(jaxpr))
  assert len(eqns) > 40
  loss_dots = 0
  for eqn in eqns:
    dtypes = tuple(v.aval.dtype for v in eqn.invars)
    if dtypes == (F32, F32):
      # The contrastive loss's logits: float32 by policy, at the highest precision.
      assert eqn.params["precision"] is not None and "HIGHEST" in str(eqn.params["precision"])
      loss_dots += 1
    else:
      assert dtypes == (BF16, BF16), eqn
      assert eqn.params["preferred_element_type"] == F32, eqn
  assert loss_dots <= 6


def test_precision_dots_bench_runs_and_every_mixed_dot_stays_bfloat16_on_cpu(capsys):
  """bench/precision_dots.py at tiny shapes: it prints its table, and on XLA:CPU every dot of the
  primitives (forward, both gradients, attention) is a bfloat16 dot, none upcast to float32."""
  os.environ.setdefault("FLIP_BENCH_CACHE_DIR", "")  # no persistent cache from tests
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
  import precision_dots  # pylint: disable=g-import-not-at-top
  result = precision_dots.run(precision_dots.parse_args(["--small", "--rounds", "1"]))
  assert "after/before" in capsys.readouterr().out and result["peak"] > 0
  assert len(result["table"]) == 2 * 3 + 4
  for matmul, pass_name, _, kinds in result["table"]:
    assert kinds["after"] == "ynn-bf16", (matmul, pass_name, kinds)
