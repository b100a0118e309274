"""Tests for flip.losses against float64 numpy references written here, finite differences, and
the unsharded loss as the reference for the sharded (pjit / t5x / shard_map) versions."""

import functools
import re

from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
import pytest
from t5x import partitioning as t5x_partitioning

from flip import losses
from flip import partitioning as flip_partitioning

LN_100 = np.log(100.0)
CLIP_INIT_SCALE_LOG = np.log(1 / 0.07)
DATA_RULES = [("batch", "data")]
NUM_DEVICES = 8


# ----------------------------------------------------------------------------------------------
# float64 numpy references
# ----------------------------------------------------------------------------------------------
def np_logsumexp(x, axis):
  peak = np.max(x, axis=axis, keepdims=True)
  return np.squeeze(peak, axis) + np.log(np.sum(np.exp(x - peak), axis=axis))


def np_contrastive(img, txt, scale_log):
  img, txt = np.float64(img), np.float64(txt)
  logits = np.exp(np.float64(scale_log)) * img @ txt.T
  matching = np.diag(logits)
  labels = np.arange(len(img))
  return {
      "loss_i2t": np.mean(np_logsumexp(logits, 1) - matching),
      "loss_t2i": np.mean(np_logsumexp(logits, 0) - matching),
      "acc_i2t": np.mean(np.argmax(logits, 1) == labels),
      "acc_t2i": np.mean(np.argmax(logits, 0) == labels),
  }


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def np_sigmoid_loss(img, txt, scale_log, bias):
  img, txt = np.float64(img), np.float64(txt)
  logits = np.exp(np.float64(scale_log)) * img @ txt.T + bias
  signs = 2.0 * np.eye(len(img)) - 1.0
  return -np.sum(np_log_sigmoid(signs * logits)) / len(img)


def np_mae_loss(pred, target, mask, norm_pix_loss, eps=1e-6):
  pred, target, mask = np.float64(pred), np.float64(target), np.float64(mask)
  if norm_pix_loss:
    target = (target - target.mean(-1, keepdims=True)) / np.sqrt(
        target.var(-1, ddof=1, keepdims=True) + eps)
  per_patch = np.mean((pred - target) ** 2, axis=-1)
  return np.sum(per_patch * mask) / np.sum(mask)


def paired_embeddings(seed, batch, dim, noise=1.0, dtype=np.float32):
  """Unit-norm image/text rows where each caption is a noisy copy of its image (a loss that is
  neither ~0 nor ~log B, so the reference comparison means something)."""
  rng = np.random.default_rng(seed)
  img = rng.standard_normal((batch, dim))
  txt = img + noise * rng.standard_normal((batch, dim))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  return unit(img).astype(dtype), unit(txt).astype(dtype)


def assert_metrics_close(metrics, reference, atol):
  for key, want in reference.items():
    np.testing.assert_allclose(np.asarray(metrics[key]), want, atol=atol, rtol=0, err_msg=key)


# ----------------------------------------------------------------------------------------------
# contrastive loss: values, stability, gradients
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_log", [0.0, CLIP_INIT_SCALE_LOG, LN_100])
def test_contrastive_matches_float64_reference(scale_log):
  img, txt = paired_embeddings(0, batch=48, dim=16)
  loss, metrics = jax.jit(losses.contrastive_loss)(img, txt, jnp.float32(scale_log))
  reference = np_contrastive(img, txt, scale_log)
  assert_metrics_close(metrics, reference, atol=1e-5)
  np.testing.assert_allclose(
      loss, 0.5 * (reference["loss_i2t"] + reference["loss_t2i"]), atol=1e-5, rtol=0)


def test_contrastive_batch_4096_at_scale_100_is_finite_and_exact():
  img, txt = paired_embeddings(1, batch=4096, dim=16, noise=0.5)
  reference = np_contrastive(img, txt, LN_100)
  assert 0.05 < reference["loss_i2t"] < np.log(4096) / 2, "test data should give a mid-range loss"

  # The point of the stable form: exponentiating raw float32 logits at scale 100 overflows.
  raw_logits = np.float32(100.0) * (img @ txt.T)
  with np.errstate(over="ignore", invalid="ignore"):
    naive_exp = np.exp(raw_logits)
    naive_loss = np.mean(np.log(naive_exp.sum(1)) - np.log(np.diag(naive_exp)))
  assert np.isinf(naive_exp).any() and not np.isfinite(naive_loss)

  loss, metrics = jax.jit(losses.contrastive_loss)(img, txt, jnp.float32(LN_100))
  assert np.isfinite(loss)
  assert_metrics_close(metrics, reference, atol=1e-5)


def test_contrastive_bfloat16_inputs_compute_in_float32():
  img, txt = paired_embeddings(2, batch=256, dim=32)
  img_bf16, txt_bf16 = jnp.asarray(img, jnp.bfloat16), jnp.asarray(txt, jnp.bfloat16)
  loss, metrics = jax.jit(losses.contrastive_loss)(img_bf16, txt_bf16, jnp.float32(LN_100))
  assert loss.dtype == jnp.float32
  # Reference on the bfloat16-rounded values: products of bfloat16 are exact in float32, so only
  # float32 accumulation separates the two.
  reference = np_contrastive(np.asarray(img_bf16, np.float64), np.asarray(txt_bf16, np.float64),
                             LN_100)
  assert_metrics_close(metrics, reference, atol=1e-5)


def central_differences(fn, args, index, step=1e-6):
  """d fn / d args[index] by central differences, element by element, in float64."""
  base = np.array(args[index], np.float64)
  grad = np.zeros_like(base)
  for position in np.ndindex(base.shape):
    shifted = []
    for sign in (1.0, -1.0):
      moved = base.copy()
      moved[position] += sign * step
      shifted.append(fn(*args[:index], moved, *args[index + 1:]))
    grad[position] = (shifted[0] - shifted[1]) / (2 * step)
  return grad


def np_contrastive_loss(img, txt, scale_log):
  metrics = np_contrastive(img, txt, scale_log)
  return 0.5 * (metrics["loss_i2t"] + metrics["loss_t2i"])


@pytest.mark.parametrize("loss_name", ["contrastive", "sigmoid"])
def test_gradients_match_finite_differences_in_float64(loss_name):
  img, txt = paired_embeddings(3, batch=4, dim=3, dtype=np.float64)
  scale_log = np.float64(np.log(5.0))
  if loss_name == "contrastive":
    jax_loss = lambda i, t, s: losses.contrastive_loss(i, t, s)[0]
    np_loss = np_contrastive_loss
  else:
    bias = -2.0
    jax_loss = lambda i, t, s: losses.sigmoid_loss(i, t, s, jnp.float64(bias))[0]
    np_loss = lambda i, t, s: np_sigmoid_loss(i, t, s, bias)
  args = (img, txt, scale_log)
  with jax.enable_x64(True):
    grads = jax.grad(jax_loss, argnums=(0, 1, 2))(*map(jnp.asarray, args))
    assert all(g.dtype == jnp.float64 for g in grads)
  for index, grad in enumerate(grads):
    np.testing.assert_allclose(grad, central_differences(np_loss, args, index), atol=1e-8,
                               rtol=1e-6, err_msg=f"argument {index}")


def test_bad_shapes_are_refused_with_the_argument_name():
  img, txt = paired_embeddings(4, batch=4, dim=8)
  with pytest.raises(ValueError, match="txt_emb shape"):
    losses.contrastive_loss(img, txt[:, :4], 0.0)
  with pytest.raises(ValueError, match="logit_scale_log must be a scalar"):
    losses.contrastive_loss(img, txt, np.zeros(1))
  with pytest.raises(ValueError, match="img_emb must be"):
    losses.sigmoid_loss(img[0], txt[0], 0.0, 0.0)
  with pytest.raises(ValueError, match="mask shape"):
    losses.mae_pixel_loss(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), np.zeros((2, 4)), False)


# ----------------------------------------------------------------------------------------------
# SigLIP
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_log,bias", [
    (losses.SIGLIP_INIT_LOGIT_SCALE_LOG, losses.SIGLIP_INIT_LOGIT_BIAS),
    (LN_100, -5.0),
    (0.0, 3.0),
])
def test_sigmoid_matches_float64_reference(scale_log, bias):
  img, txt = paired_embeddings(5, batch=64, dim=16)
  loss, metrics = jax.jit(losses.sigmoid_loss)(img, txt, jnp.float32(scale_log),
                                               jnp.float32(bias))
  reference = np_sigmoid_loss(img, txt, scale_log, bias)
  np.testing.assert_allclose(loss, reference, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["loss_pos"] + metrics["loss_neg"], loss, rtol=1e-6)
  contrastive_reference = np_contrastive(img, txt, scale_log)
  for key in ("acc_i2t", "acc_t2i"):  # argmax ignores the shared bias
    np.testing.assert_allclose(metrics[key], contrastive_reference[key], err_msg=key)


def test_sigmoid_init_constants_are_the_papers():
  assert np.isclose(np.exp(losses.SIGLIP_INIT_LOGIT_SCALE_LOG), 10.0)
  assert losses.SIGLIP_INIT_LOGIT_BIAS == -10.0


# ----------------------------------------------------------------------------------------------
# MAE pixel loss
# ----------------------------------------------------------------------------------------------
def mae_case(seed, batch=3, patches=10, pixels=12):
  rng = np.random.default_rng(seed)
  pred = rng.standard_normal((batch, patches, pixels)).astype(np.float32)
  target = (3.0 + 2.0 * rng.standard_normal((batch, patches, pixels))).astype(np.float32)
  mask = (rng.random((batch, patches)) < 0.75).astype(np.float32)
  mask[:, 0], mask[:, 1] = 1.0, 0.0  # at least one removed and one visible patch per row
  return pred, target, mask


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_mae_loss_matches_float64_reference(norm_pix_loss):
  pred, target, mask = mae_case(6)
  loss = losses.mae_pixel_loss(pred, target, mask, norm_pix_loss)
  np.testing.assert_allclose(loss, np_mae_loss(pred, target, mask, norm_pix_loss), rtol=1e-5)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_mae_loss_ignores_visible_patches(norm_pix_loss):
  pred, target, mask = mae_case(7)
  loss = losses.mae_pixel_loss(pred, target, mask, norm_pix_loss)
  visible_changed, removed_changed = pred.copy(), pred.copy()
  visible_changed[mask == 0] += 100.0
  removed_changed[mask == 1] += 1.0
  assert losses.mae_pixel_loss(visible_changed, target, mask, norm_pix_loss) == loss
  assert abs(losses.mae_pixel_loss(removed_changed, target, mask, norm_pix_loss) - loss) > 0.1


def test_mae_loss_without_removed_patches_is_zero_not_nan():
  pred, target, mask = mae_case(8)
  assert losses.mae_pixel_loss(pred, target, np.zeros_like(mask), True) == 0.0


# ----------------------------------------------------------------------------------------------
# sharded versions: pjit (jax.jit + logical rules), t5x's partitioner, shard_map local loss
# ----------------------------------------------------------------------------------------------
SHARDED_BATCH, SHARDED_DIM = 64, 16


@pytest.fixture(scope="module")
def data_mesh():
  assert jax.device_count() == NUM_DEVICES, "tests/conftest.py should simulate 8 CPU devices"
  return Mesh(np.array(jax.devices()), ("data",))


@pytest.fixture(scope="module")
def sharded_case():
  img, txt = paired_embeddings(9, SHARDED_BATCH, SHARDED_DIM, noise=0.7)
  return jnp.asarray(img), jnp.asarray(txt), jnp.float32(np.log(30.0))


def loss_and_grads(loss_fn):
  """(loss, metrics, (d img, d txt, d scale_log)) of a (loss, metrics) function."""

  def run(img, txt, scale_log):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(
        img, txt, scale_log)
    return loss, metrics, grads

  return run


@pytest.fixture(scope="module")
def unsharded(sharded_case):
  return jax.jit(loss_and_grads(losses.contrastive_loss))(*sharded_case)


def assert_same_loss_and_grads(result, expected):
  loss, metrics, grads = result
  want_loss, want_metrics, want_grads = expected
  np.testing.assert_allclose(loss, want_loss, atol=1e-5, rtol=0)
  assert_metrics_close(metrics, {k: np.asarray(v) for k, v in want_metrics.items()}, atol=1e-5)
  for name, grad, want in zip(("img", "txt", "scale_log"), grads, want_grads):
    np.testing.assert_allclose(grad, want, atol=1e-5, rtol=0, err_msg=name)


def jit_data_parallel(fn, mesh):
  rows = NamedSharding(mesh, PartitionSpec("data", None))
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(fn, in_shardings=(rows, rows, replicated))


def test_pjit_sharded_loss_and_grads_equal_unsharded(data_mesh, sharded_case, unsharded):
  with jax.set_mesh(data_mesh), nn_partitioning.axis_rules(DATA_RULES):
    sharded = jit_data_parallel(loss_and_grads(losses.contrastive_loss), data_mesh)
    result = sharded(*sharded_case)
  assert result[2][0].sharding.spec == PartitionSpec("data", None), "grads follow the batch"
  assert_same_loss_and_grads(result, unsharded)


def matrix_shapes(hlo_text):
  return set(re.findall(r"\b\w+\[(\d+),(\d+)\]", hlo_text))


def assert_no_device_holds_the_full_matrix(per_device_hlo):
  """Post-partitioning HLO has per-device shapes: the [B/8, B] block, never [B, B]."""
  batch, rows_per_device = str(SHARDED_BATCH), str(SHARDED_BATCH // NUM_DEVICES)
  shapes = matrix_shapes(per_device_hlo)
  assert (rows_per_device, batch) in shapes, "the [B/8, B] logits block"
  assert (batch, batch) not in shapes, "a device materialises the full [B, B] matrix"


def test_sharded_logits_never_exceed_b_over_8_rows_per_device(data_mesh, sharded_case):
  # The check's premise: compiled for one device, the program does hold a [B, B] matrix.
  single_device_hlo = jax.jit(loss_and_grads(losses.contrastive_loss)).lower(
      *sharded_case).compile().as_text()
  assert (str(SHARDED_BATCH), str(SHARDED_BATCH)) in matrix_shapes(single_device_hlo)
  with jax.set_mesh(data_mesh), nn_partitioning.axis_rules(DATA_RULES):
    sharded = jit_data_parallel(loss_and_grads(losses.contrastive_loss), data_mesh)
    lowered = sharded.lower(*sharded_case)
    per_device_hlo = lowered.compile().as_text()
  assert "sharding_constraint" in lowered.as_text()
  assert_no_device_holds_the_full_matrix(per_device_hlo)


def test_row_constraint_is_a_noop_without_a_mesh(sharded_case):
  with nn_partitioning.axis_rules(DATA_RULES):
    lowered_rules_only = jax.jit(losses.contrastive_loss).lower(*sharded_case).as_text()
  lowered_plain = jax.jit(losses.contrastive_loss).lower(*sharded_case).as_text()
  assert "sharding_constraint" not in lowered_rules_only
  assert "sharding_constraint" not in lowered_plain


def test_t5x_partitioned_loss_and_grads_equal_unsharded(sharded_case, unsharded):
  partitioner = flip_partitioning.FlipPjitPartitioner(num_partitions=1,
                                                      mesh_shape=(NUM_DEVICES, 1))
  assert isinstance(partitioner, t5x_partitioning.PjitPartitioner)
  batch_spec = partitioner.data_partition_spec
  partitioned = partitioner.partition(
      loss_and_grads(losses.contrastive_loss),
      in_axis_resources=(batch_spec, batch_spec, None),
      out_axis_resources=(None, None, (batch_spec, batch_spec, None)))
  lowered = partitioned.lower(*sharded_case)
  assert "sharding_constraint" in lowered.as_text()
  assert_no_device_holds_the_full_matrix(lowered.compile().as_text())
  assert_same_loss_and_grads(partitioned(*sharded_case), unsharded)


@pytest.mark.parametrize("via_axis_name_argument", [False, True])
def test_shard_map_local_loss_and_grads_equal_unsharded(data_mesh, sharded_case, unsharded,
                                                        via_axis_name_argument):
  if via_axis_name_argument:
    local = functools.partial(losses.contrastive_loss, axis_name="data")
  else:
    local = functools.partial(losses.contrastive_loss_local, axis_name="data")
  mapped = jax.shard_map(
      local, mesh=data_mesh,
      in_specs=(PartitionSpec("data"), PartitionSpec("data"), PartitionSpec()),
      out_specs=PartitionSpec())
  result = jax.jit(loss_and_grads(mapped))(*sharded_case)
  assert_same_loss_and_grads(result, unsharded)
