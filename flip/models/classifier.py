"""Image classifiers on the project's ViT: the linear probe and the fine-tuned model (MAE's recipes).

`ViTClassifier` = `img_encoder` (the same `flip.models.vit.VisionTransformer`, under the same name
as in the FLIP and MAE models, so their checkpoints load into it), the pooled feature
(`config.model.model_img.pool`: average of the encoded patch tokens, FLIP's and MAE's fine-tuning
"global pool", or the class token, MAE's linear probe), an optional `FeatureBatchNorm` and a
linear `head` to the classes.

Linear probe (MAE, Appendix A.2): the encoder is frozen (run in inference mode, its output behind
`stop_gradient`; the task's optimizer also leaves its parameters untouched), and the feature goes
through a BatchNorm *without* affine parameters before the linear head (MAE's
`BatchNorm1d(affine=False, eps=1e-6)`), which normalises features whose scales differ by orders of
magnitude between pretraining methods. The head kernel starts from N(0, 0.01) (MAE's probe) or
N(0, 2e-5) (MAE's fine-tuning), `head_init_std` in the config; its bias from zero.

`FeatureBatchNorm` follows PyTorch's `BatchNorm1d` (which MAE uses): in training, features are
normalised with the batch mean and the biased batch variance (over the global batch: under pjit
the mean is an all-reduce over the data axis), and the running statistics move by
`1 - momentum` towards the batch mean and the *unbiased* batch variance; in evaluation the running
statistics are used. `momentum` is flax's convention (0.9 = PyTorch's momentum 0.1). The statistics
live in the `batch_stats` collection with logical axes in `batch_stats_axes`, which t5x's train
state keeps as `flax_mutables`.
"""

from typing import Any, Dict

import flax.linen as nn
from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp

from flip.models import layers
from flip.models import vit as vit_lib

Array = jax.Array

BATCH_STATS = "batch_stats"
PROBE_HEAD_INIT_STD = 0.01  # MAE main_linprobe.py: trunc_normal_(head.weight, std=0.01)
FINETUNE_HEAD_INIT_STD = 2e-5  # MAE main_finetune.py: trunc_normal_(head.weight, std=2e-5)
BATCHNORM_EPS = 1e-6  # MAE main_linprobe.py: BatchNorm1d(..., affine=False, eps=1e-6)
BATCHNORM_MOMENTUM = 0.9  # PyTorch's default momentum 0.1, in flax's convention


class FeatureBatchNorm(nn.Module):
  """BatchNorm over the batch axis of [B, D] features, without scale or bias (see module doc)."""

  epsilon: float = BATCHNORM_EPS
  momentum: float = BATCHNORM_MOMENTUM

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    features = x.shape[-1]
    running_mean = nn_partitioning.variable_with_axes(
        BATCH_STATS, "mean", jnp.zeros, (features,), jnp.float32, axes=("embed",))
    running_var = nn_partitioning.variable_with_axes(
        BATCH_STATS, "var", jnp.ones, (features,), jnp.float32, axes=("embed",))
    x = x.astype(jnp.float32)
    if train:
      batch = x.shape[0]
      mean = jnp.mean(x, axis=0)
      var = jnp.mean(jnp.square(x - mean), axis=0)
      if not self.is_initializing():
        unbiased = var * (batch / max(batch - 1, 1))
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1 - self.momentum) * unbiased
    else:
      mean, var = running_mean.value, running_var.value
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon)


class ViTClassifier(nn.Module):
  """ViT encoder -> pooled feature -> [BatchNorm without affine] -> linear head."""

  img: Dict[str, Any]
  num_classes: int
  head_init_std: float = FINETUNE_HEAD_INIT_STD
  feature_batchnorm: bool = False
  frozen_encoder: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    self.img_encoder = vit_lib.VisionTransformer(**{**self.img, "dtype": self.dtype})
    if self.feature_batchnorm:
      self.head_norm = FeatureBatchNorm()
    self.head = layers.Dense(self.num_classes, ("embed", "classes"), dtype=jnp.float32,
                             kernel_init=nn.initializers.normal(stddev=self.head_init_std))

  def features(self, images: Array, *, train: bool) -> Array:
    """The pooled encoder feature [B, D] (float32), unmasked; frozen: inference mode, no grad."""
    encoder_train = train and not self.frozen_encoder
    pooled = self.img_encoder(images, train=encoder_train, mask_ratio=0.0)["pooled"]
    pooled = pooled.astype(jnp.float32)
    return jax.lax.stop_gradient(pooled) if self.frozen_encoder else pooled

  def __call__(self, images: Array, *, train: bool) -> Array:
    """images: [B, H, W, C] in 0..255 (uint8 or float) -> logits [B, num_classes] (float32)."""
    x = self.features(images, train=train)
    if self.feature_batchnorm:
      x = self.head_norm(x, train=train)
    return self.head(x)


def classifier_from_config(config: Any) -> ViTClassifier:
  """`config.model.model_img` + `config.classifier` -> the classifier."""
  return ViTClassifier(img=vit_lib.vit_kwargs_from_config(config.model.model_img),
                       num_classes=config.data.num_classes,
                       head_init_std=config.classifier.head_init_std,
                       feature_batchnorm=config.classifier.feature_batchnorm,
                       frozen_encoder=config.classifier.frozen_encoder,
                       dtype=layers.as_dtype(config.dtype))
