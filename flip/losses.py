"""Training losses: contrastive InfoNCE (global and shard-local), SigLIP, MAE pixel loss.

This module owns the loss functions only; the towers produce the L2-normalised embeddings and the
(already clipped) log logit scale, and the task decides which loss to call.

Contrastive loss (CLIP/FLIP). Symmetric InfoNCE: the mean of the image->text and text->image
cross-entropies over the in-batch similarity matrix `exp(logit_scale_log) * img @ txt.T`, with the
matching pair (the diagonal) as the target. Decisions:
- Numerics: logits and every softmax are float32 for float32 or bfloat16 embeddings (bfloat16
  rows are cast up before the product; float64 inputs under x64 stay float64), and
  cross-entropies go through the max-shifted `logsumexp`, so logit scale 100 never overflows
  (FLIP's official code exponentiated raw logits). The matmul uses HIGHEST precision: TPU's
  default single bfloat16 pass keeps 8 significant bits, which at scale 100 can move a logit by
  ~0.4.
- The target logit of row i is computed as `scale * <img_i, txt_i>` from the two row-aligned
  embeddings rather than read off the diagonal of the matrix: it needs no gather across devices.
- The scale multiplies the [b, D] embeddings before the product, not the [b, B] logits: the
  backward pass then never keeps the unscaled [b, B] product for d/d(scale) (a third less
  temporary memory in the measurement below).
- Two sharded formulations, same value and gradients:
  * `contrastive_loss` (axis_name=None): written for jit/pjit with the batch sharded over the data
    axis (t5x's partitioner; logical rule 'batch' -> 'data'). The one [B, B] matrix `img @ txt.T`
    is constrained to ('batch', None), so a device holds only its B/d rows. Image->text reduces
    along a row (local); text->image reduces down a column, which the SPMD partitioner splits into
    a local reduction plus an all-reduce of [B] vectors (max, sum of exp, argmax), so no device
    ever holds the whole matrix; the backward pass is element-wise on the same row blocks. This was
    chosen over a second, transposed product `txt @ img.T` (also row-sharded): half the loss
    matmul flops and less memory. `bench/loss_memory.py` (8 simulated CPU devices, B=4096, D=64,
    loss and gradients) measures per-device temporaries of 17.2 MiB for this form, 19.0 MiB with
    two products, 18.1 MiB for the shard_map local loss, against 128 MiB on one device. The
    constraint pins the row layout instead of leaving it to sharding propagation (which picked
    the same layout unaided in that measurement). Outside a mesh, or without logical axis rules,
    it is a no-op and this is the plain single-device loss.
  * `contrastive_loss_local` (or `contrastive_loss(..., axis_name=...)`): open_clip's "local loss"
    for use inside `jax.shard_map` (or pmap): each device all-gathers both towers' embeddings,
    computes its own rows of image->text and of text->image (two [b, B] products, since a column
    is spread over every device), and the per-device means are averaged over the axis. The
    all-gather's transpose (a reduce-scatter) gives exact global gradients.
- Metrics: the two directional losses and the in-batch top-1 retrieval accuracies (argmax of a row
  equals its own index; ties, which need exactly equal float32 logits, resolve to the first index).

SigLIP loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"):
`-(1/B) sum_ij log sigmoid(z_ij * (t * <x_i, y_j> + b))`, z = +1 on the diagonal and -1 off it,
t = exp(logit_scale_log), computed with `jax.nn.log_sigmoid` in float32 and the same row sharding
constraint. The paper's initial values are the module constants below.

MAE pixel loss (He et al. 2022): per-patch mean squared error averaged over the removed patches
only. With `norm_pix_loss` the target patch is normalised by its own mean and
`(var + eps) ** 0.5`, where var is the unbiased variance over the patch's pixels (MAE's code uses
torch's default `Tensor.var`, which applies Bessel's correction; JAX ports that use `jnp.var`
divide by P instead). A batch with no removed patch gives loss 0 instead of 0/0.
"""

import math
from typing import Optional, Sequence, Union

from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp

Array = jax.Array
Metrics = dict[str, Array]
AxisName = Union[str, Sequence[str]]

# SigLIP initialisation (Zhai et al. 2023, Sec. 3 and Algorithm 1): t' = log 10, b = -10.
SIGLIP_INIT_LOGIT_SCALE_LOG = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0

# MAE's norm_pix_loss epsilon (models_mae.py forward_loss) and its torch.var default (unbiased).
MAE_NORM_PIX_EPS = 1e-6
MAE_NORM_PIX_VARIANCE_DDOF = 1

# Logical axes of a [B, B] logits matrix: rows follow the batch sharding, columns replicated.
LOGITS_AXES = ("batch", None)
# Logits and softmax are computed in at least float32 (float64 inputs stay float64 under x64).
MIN_LOGITS_DTYPE = jnp.float32
LOGITS_MATMUL_PRECISION = jax.lax.Precision.HIGHEST


def _check_embeddings(fn_name: str, img_emb: Array, txt_emb: Array, logit_scale_log: Array):
  if img_emb.ndim != 2:
    raise ValueError(f"{fn_name}: img_emb must be [batch, dim], got shape {img_emb.shape}")
  if txt_emb.shape != img_emb.shape:
    raise ValueError(
        f"{fn_name}: txt_emb shape {txt_emb.shape} differs from img_emb shape {img_emb.shape}")
  if jnp.ndim(logit_scale_log) != 0:
    raise ValueError(
        f"{fn_name}: logit_scale_log must be a scalar, got shape {jnp.shape(logit_scale_log)}")


def _logits_dtype(emb: Array) -> jnp.dtype:
  return jnp.promote_types(emb.dtype, MIN_LOGITS_DTYPE)


def similarity(rows: Array, cols: Array) -> Array:
  """[b, D] x [n, D] -> [b, n] dot products, accumulated and returned in the logits dtype."""
  return jnp.einsum("id,jd->ij", rows, cols, precision=LOGITS_MATMUL_PRECISION,
                    preferred_element_type=_logits_dtype(rows))


def paired_similarity(img_emb: Array, txt_emb: Array) -> Array:
  """<img_i, txt_i> for every row, in the logits dtype."""
  dtype = _logits_dtype(img_emb)
  return jnp.sum(img_emb.astype(dtype) * txt_emb.astype(dtype), axis=-1)


def _scale(logit_scale_log: Array, emb: Array) -> Array:
  return jnp.exp(jnp.asarray(logit_scale_log, _logits_dtype(emb)))


def scaled(emb: Array, scale: Array) -> Array:
  """scale * emb in the logits dtype; the scale goes on the [b, D] rows, not the [b, B] product."""
  return scale * emb.astype(scale.dtype)


def _constrain_rows(logits: Array) -> Array:
  return nn_partitioning.with_sharding_constraint(logits, LOGITS_AXES)


def _row_cross_entropy(logits: Array, target_logit: Array) -> Array:
  """-log softmax(logits)[target] per row, via the max-shifted log-sum-exp."""
  return jax.nn.logsumexp(logits, axis=-1) - target_logit


def top1_accuracy(logits: Array, target_index: Array, axis: int) -> Array:
  """Fraction of rows (axis=1) or columns (axis=0) whose largest logit is the target's."""
  hits = jnp.argmax(logits, axis=axis) == target_index
  return jnp.mean(hits.astype(jnp.float32))


def contrastive_loss(img_emb: Array, txt_emb: Array, logit_scale_log: Array, *,
                     axis_name: Optional[AxisName] = None) -> tuple[Array, Metrics]:
  """Symmetric InfoNCE over the batch.

  Args:
    img_emb: [B, D] L2-normalised image embeddings (float32 or bfloat16).
    txt_emb: [B, D] L2-normalised text embeddings; row i is the caption of image i.
    logit_scale_log: scalar log of the logit scale, already clipped by the caller.
    axis_name: None for the global (jit/pjit) formulation; a mesh axis name (or names) to compute
      the shard-local loss inside `jax.shard_map`, where B is the per-device batch
      (see `contrastive_loss_local`).

  Returns:
    (loss, metrics) with metrics `loss_i2t`, `loss_t2i`, `acc_i2t`, `acc_t2i` (scalars).
  """
  if axis_name is not None:
    return contrastive_loss_local(img_emb, txt_emb, logit_scale_log, axis_name=axis_name)
  _check_embeddings("contrastive_loss", img_emb, txt_emb, logit_scale_log)
  scale = _scale(logit_scale_log, img_emb)
  logits = _constrain_rows(similarity(scaled(img_emb, scale), txt_emb))
  target_logit = scale * paired_similarity(img_emb, txt_emb)
  own_index = jnp.arange(img_emb.shape[0])
  loss_i2t = jnp.mean(jax.nn.logsumexp(logits, axis=1) - target_logit)
  loss_t2i = jnp.mean(jax.nn.logsumexp(logits, axis=0) - target_logit)
  metrics = {
      "loss_i2t": loss_i2t,
      "loss_t2i": loss_t2i,
      "acc_i2t": top1_accuracy(logits, own_index, axis=1),
      "acc_t2i": top1_accuracy(logits, own_index, axis=0),
  }
  return 0.5 * (loss_i2t + loss_t2i), metrics


def contrastive_loss_local(img_emb: Array, txt_emb: Array, logit_scale_log: Array, *,
                           axis_name: AxisName) -> tuple[Array, Metrics]:
  """Shard-local symmetric InfoNCE, to be called inside `jax.shard_map` over `axis_name`.

  Args:
    img_emb: [b, D] this device's image embeddings (b = global batch / axis size).
    txt_emb: [b, D] this device's text embeddings, row-aligned with img_emb.
    logit_scale_log: scalar (replicated) log logit scale, already clipped by the caller.
    axis_name: the mesh axis (or axes) the batch is split over.

  Returns:
    (loss, metrics) of the whole global batch, identical on every device (same keys as
    `contrastive_loss`).
  """
  _check_embeddings("contrastive_loss_local", img_emb, txt_emb, logit_scale_log)
  local_batch = img_emb.shape[0]
  all_img = jax.lax.all_gather(img_emb, axis_name, tiled=True)
  all_txt = jax.lax.all_gather(txt_emb, axis_name, tiled=True)
  scale = _scale(logit_scale_log, img_emb)
  logits_i2t = similarity(scaled(img_emb, scale), all_txt)
  logits_t2i = similarity(scaled(txt_emb, scale), all_img)
  target_logit = scale * paired_similarity(img_emb, txt_emb)
  own_index = jax.lax.axis_index(axis_name) * local_batch + jnp.arange(local_batch)

  loss_i2t = jax.lax.pmean(jnp.mean(_row_cross_entropy(logits_i2t, target_logit)), axis_name)
  loss_t2i = jax.lax.pmean(jnp.mean(_row_cross_entropy(logits_t2i, target_logit)), axis_name)
  metrics = {
      "loss_i2t": loss_i2t,
      "loss_t2i": loss_t2i,
      "acc_i2t": jax.lax.pmean(top1_accuracy(logits_i2t, own_index, axis=1), axis_name),
      "acc_t2i": jax.lax.pmean(top1_accuracy(logits_t2i, own_index, axis=1), axis_name),
  }
  return 0.5 * (loss_i2t + loss_t2i), metrics


def sigmoid_loss(img_emb: Array, txt_emb: Array, logit_scale_log: Array,
                 logit_bias: Array) -> tuple[Array, Metrics]:
  """SigLIP pairwise sigmoid loss, normalised by the batch size as in the paper.

  Args:
    img_emb: [B, D] L2-normalised image embeddings (float32 or bfloat16).
    txt_emb: [B, D] L2-normalised text embeddings; row i is the caption of image i.
    logit_scale_log: scalar t' with temperature t = exp(t') (init `SIGLIP_INIT_LOGIT_SCALE_LOG`).
    logit_bias: scalar bias b (init `SIGLIP_INIT_LOGIT_BIAS`).

  Returns:
    (loss, metrics) with metrics `loss_pos` and `loss_neg` (the matching-pair and non-matching-pair
    parts of the loss, each divided by B; they sum to the loss), `acc_i2t`, `acc_t2i`.
  """
  _check_embeddings("sigmoid_loss", img_emb, txt_emb, logit_scale_log)
  if jnp.ndim(logit_bias) != 0:
    raise ValueError(
        f"sigmoid_loss: logit_bias must be a scalar, got shape {jnp.shape(logit_bias)}")
  batch = img_emb.shape[0]
  scale = _scale(logit_scale_log, img_emb)
  bias = jnp.asarray(logit_bias, scale.dtype)
  logits = _constrain_rows(similarity(scaled(img_emb, scale), txt_emb) + bias)
  is_pair = jnp.arange(batch)[:, None] == jnp.arange(batch)[None, :]
  pair_log_lik = jnp.where(is_pair, jax.nn.log_sigmoid(logits), 0.0)
  nonpair_log_lik = jnp.where(is_pair, 0.0, jax.nn.log_sigmoid(-logits))
  loss_pos = -jnp.sum(pair_log_lik) / batch
  loss_neg = -jnp.sum(nonpair_log_lik) / batch
  own_index = jnp.arange(batch)
  metrics = {
      "loss_pos": loss_pos,
      "loss_neg": loss_neg,
      "acc_i2t": top1_accuracy(logits, own_index, axis=1),
      "acc_t2i": top1_accuracy(logits, own_index, axis=0),
  }
  return loss_pos + loss_neg, metrics


def mae_pixel_loss(pred: Array, target_patches: Array, mask: Array, norm_pix_loss: bool,
                   eps: float = MAE_NORM_PIX_EPS) -> Array:
  """MAE reconstruction loss: per-patch MSE averaged over the removed patches only.

  Args:
    pred: [B, N, P] predicted pixels per patch.
    target_patches: [B, N, P] patchified target image.
    mask: [B, N], 1 where the patch was removed from the encoder input, 0 where it was visible.
    norm_pix_loss: normalise each target patch by its mean and (unbiased var + eps) ** 0.5.
    eps: the variance epsilon of the normalisation.

  Returns:
    The scalar loss, in float32 (float64 for float64 inputs).
  """
  if pred.shape != target_patches.shape or pred.ndim != 3:
    raise ValueError(f"mae_pixel_loss: pred shape {pred.shape} and target_patches shape "
                     f"{target_patches.shape} must be the same [batch, patches, pixels]")
  if mask.shape != pred.shape[:-1]:
    raise ValueError(f"mae_pixel_loss: mask shape {mask.shape} must be [batch, patches] = "
                     f"{pred.shape[:-1]}")
  dtype = jnp.promote_types(pred.dtype, jnp.float32)
  target = target_patches.astype(dtype)
  if norm_pix_loss:
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True, ddof=MAE_NORM_PIX_VARIANCE_DDOF)
    target = (target - mean) / jnp.sqrt(var + eps)
  per_patch = jnp.mean(jnp.square(pred.astype(dtype) - target), axis=-1)
  removed = mask.astype(dtype)
  return jnp.sum(per_patch * removed) / jnp.maximum(jnp.sum(removed), 1.0)
