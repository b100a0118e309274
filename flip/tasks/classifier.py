"""Classifier tasks of the one training loop: linear probe ("linprobe") and fine-tuning
("finetune") of a ViT encoder (docs/MAE.md has the recipes).

`ClassifierTask`: softmax cross-entropy of `flip.models.classifier.ViTClassifier` against smoothed
(`config.classifier.label_smoothing`), mixed (`config.aug.mixup`) one-hot targets, after random
erasing (`config.aug.reprob`) of the batch; accuracy is reported against the unmixed labels. The
probe freezes the encoder: its parameters are labelled "frozen" in an `optax.multi_transform`
whose frozen branch is `optax.set_to_zero()` (no update, no weight decay, no optimizer state), and
the encoder runs in inference mode behind `stop_gradient`. BatchNorm statistics of the probe head
travel in the train state's `flax_mutables` (MUTABLE_COLLECTIONS); with gradient accumulation each
micro-batch is normalised by its own statistics (as PyTorch's `accum_iter` does) and the running
statistics are updated once per micro-batch. Fine-tuning scales each parameter's update by the
layer-wise lr decay `config.classifier.layer_decay ** (num_layers + 1 - layer_id)` (`layer_id`:
embeddings, position embedding and class token 0; transformer block i (0-based) i + 1; the final
encoder norm and the head num_layers + 1), MAE's `param_groups_lrd`.

Pretrained weights (`config.pretrain_dir`): the `img_encoder` parameters of an MAE, FLIP, probe or
fine-tuned checkpoint, checked against the model and position-embedding-resized; the head stays
freshly initialised. Evaluation: the classification evaluator (held-out top-1/top-5 via `logits`).
"""

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import optax

from flip import augment
from flip import config as config_lib
from flip import optim
from flip.models import classifier as classifier_lib
from flip.models import normalization
from flip.tasks import common
from flip.tasks import registry

Array = jax.Array
Params = Mapping[str, Any]
Metrics = Dict[str, Array]

TRAINED = "trained"
FROZEN = "frozen"
BLOCK_PREFIX = "encoderblock_"
EMBEDDING_NAMES = ("embedding", "pos_embedding", "cls")  # layer 0 of the layer-wise lr decay
LABEL_AXES = ("batch",)


def vit_layer_id(names: Sequence[str], num_layers: int) -> int:
  """MAE's layer id of a classifier parameter for layer-wise lr decay (see the module doc)."""
  if names[0] != common.ENCODER:
    return num_layers + 1
  for name in names:
    if name.startswith(BLOCK_PREFIX):
      return int(name[len(BLOCK_PREFIX):]) + 1
  if len(names) > 1 and names[1] in EMBEDDING_NAMES:
    return 0
  return num_layers + 1


class ClassifierTask(common.ImageModelTask):
  """Supervised classification of `config.data.train` with a ViT (probe or fine-tuning)."""

  name = "classifier"
  capabilities = frozenset({registry.Capability.CLASSIFIES, registry.Capability.OWN_OPTIMIZER,
                            registry.Capability.MUTABLE_COLLECTIONS,
                            registry.Capability.LOADS_PRETRAINED_SUBSET})
  requires_frozen_encoder: Optional[bool] = None

  def __init__(self, config: Any):
    super().__init__(config)
    common.refuse_zeroshot(config, self.name)
    frozen = bool(config.classifier.frozen_encoder)
    if self.requires_frozen_encoder is not None and frozen != self.requires_frozen_encoder:
      raise config_lib.ConfigError(
          f"task {self.name!r} needs config.classifier.frozen_encoder="
          f"{self.requires_frozen_encoder}, got {frozen}")
    model = classifier_lib.classifier_from_config(config)
    self.model = model.clone(img=normalization.with_pixel_stats(model.img, config))
    self.num_classes = int(config.data.num_classes)
    self.frozen_encoder = frozen
    self.num_layers = int(config.model.model_img.transformer.num_layers)
    self.layer_decay = float(config.classifier.layer_decay)
    if not 0.0 < self.layer_decay <= 1.0:
      raise config_lib.ConfigError(f"config.classifier.layer_decay must be in (0, 1], got "
                                   f"{self.layer_decay}")
    self.label_smoothing = float(config.classifier.label_smoothing)
    mix = config.aug.mixup
    self.mix = augment.MixSettings(mixup_alpha=float(mix.mixup_alpha),
                                   cutmix_alpha=float(mix.cutmix_alpha), prob=float(mix.prob),
                                   switch_prob=float(mix.switch_prob))
    self.reprob = float(config.aug.reprob)
    self.pixel_mean, self.pixel_std = normalization.pixel_stats(config)

  # --- batch layout ---------------------------------------------------------------------------
  def batch_spec(self, batch_size: int) -> Dict[str, jax.ShapeDtypeStruct]:
    return dict(super().batch_spec(batch_size),
                label=jax.ShapeDtypeStruct((batch_size,), jnp.int32))

  def batch_logical_axes(self) -> Dict[str, Tuple[Any, ...]]:
    return {"image": common.IMAGE_AXES, "label": LABEL_AXES}

  def train_dataset(self, config: Any, shard_index: int, num_shards: int, seed: int):
    from flip.data import classification  # pylint: disable=g-import-not-at-top (tf)
    return classification.make_train_dataset(config, shard_index, num_shards, seed)

  # --- variables and optimizer ----------------------------------------------------------------
  def load_pretrained_params(self, path: str, params_shapes: Mapping[str, Any]) -> Dict[str, Any]:
    return common.load_modules(path, params_shapes, required=(common.ENCODER,),
                               posemb_grid=self.posemb_grid)

  def layer_decay_multipliers(self, params: Params) -> Any:
    return optim.layer_decay_multipliers(
        params, self.num_layers, self.layer_decay,
        lambda names: vit_layer_id(names, self.num_layers))

  def param_labels(self, params: Params) -> Any:
    """FROZEN for the encoder's parameters when the encoder is frozen, else TRAINED."""
    def label(path, _):
      names = optim.param_path_names(path)
      return FROZEN if self.frozen_encoder and names[0] == common.ENCODER else TRAINED
    return jax.tree_util.tree_map_with_path(label, params)

  def make_optimizer(self, config: Any, start_step: int = 0,
                     start_epoch: float = 0.0) -> optax.GradientTransformation:
    multipliers = self.layer_decay_multipliers if self.layer_decay < 1.0 else None
    trained = optim.make_optimizer(config, start_step=start_step, start_epoch=start_epoch,
                                   lr_multipliers=multipliers)
    if not self.frozen_encoder:
      return trained
    return optax.multi_transform({TRAINED: trained, FROZEN: optax.set_to_zero()},
                                 self.param_labels)

  # --- forward and loss -----------------------------------------------------------------------
  def logits(self, params: Params, flax_mutables: Mapping[str, Any], images: Array) -> Array:
    """Evaluation logits [B, C] (running BatchNorm statistics, no dropout)."""
    return self.model.apply({"params": params, **flax_mutables}, images, train=False)

  def augment_batch(self, rng: Array, images: Array,
                    labels: Array) -> Tuple[Array, Array]:
    """uint8 images, int labels -> float pixel images (erased, mixed), soft targets [B, C]."""
    erase_rng, mix_rng = jax.random.split(rng)
    images = images.astype(jnp.float32)
    images = augment.random_erasing(erase_rng, images, self.reprob, self.pixel_mean,
                                    self.pixel_std)
    targets = augment.smooth_labels(labels, self.num_classes, self.label_smoothing)
    images, targets, _ = augment.mixup_cutmix(mix_rng, images, targets, self.mix)
    return images, targets

  def compute_grads(self, params: Params, batch: Mapping[str, Array], rng: Array,
                    accum_steps: int = 1, flax_mutables: Mapping[str, Any] = flax.core.FrozenDict()
                    ) -> Tuple[Array, Metrics, Params, Any]:
    """Loss, metrics, gradient of the full-batch loss and the updated BatchNorm statistics."""
    aug_rng, model_rng = jax.random.split(rng)
    images, targets = self.augment_batch(aug_rng, batch["image"], batch["label"])
    mutable = list(flax_mutables.keys())

    def loss_fn(p, mutables, mb_images, mb_targets, mb_labels, step_rng):
      variables = {"params": p, **mutables}
      rngs = common.split_rngs(step_rng)
      if mutable:
        logits, updated = self.model.apply(variables, mb_images, train=True, rngs=rngs,
                                           mutable=mutable)
      else:
        logits, updated = self.model.apply(variables, mb_images, train=True, rngs=rngs), mutables
      loss = jnp.mean(optax.softmax_cross_entropy(logits, mb_targets))
      top1 = jnp.mean((jnp.argmax(logits, axis=-1) == mb_labels).astype(jnp.float32))
      return loss, (top1, flax.core.freeze(updated))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
      (loss, (top1, mutables)), grads = grad_fn(params, flax_mutables, images, targets,
                                                batch["label"], model_rng)
      return loss, {"train_top1": top1}, grads, mutables

    micro = common.to_microbatches({"image": images, "target": targets, "label": batch["label"]},
                             accum_steps)
    micro_rngs = jax.random.split(model_rng, accum_steps)

    def accumulate(carry, xs):
      loss_sum, top1_sum, grad_sum, mutables = carry
      mb, step_rng = xs
      (loss, (top1, mutables)), grads = grad_fn(params, mutables, mb["image"], mb["target"],
                                                mb["label"], step_rng)
      return (loss_sum + loss, top1_sum + top1, jax.tree.map(jnp.add, grad_sum, grads),
              mutables), None

    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero, jax.tree.map(jnp.zeros_like, params), flax.core.freeze(flax_mutables))
    (loss_sum, top1_sum, grad_sum, mutables), _ = jax.lax.scan(accumulate, init,
                                                               (micro, micro_rngs))
    return (loss_sum / accum_steps, {"train_top1": top1_sum / accum_steps},
            jax.tree.map(lambda g: g / accum_steps, grad_sum), mutables)


@registry.register_task("linprobe")
class LinearProbeTask(ClassifierTask):
  """Linear probe: frozen encoder, BatchNorm without affine, linear head (MAE's recipe)."""

  name = "linprobe"
  requires_frozen_encoder = True


@registry.register_task("finetune")
class FinetuneTask(ClassifierTask):
  """End-to-end fine-tuning with layer-wise lr decay, drop path, mixup/cutmix, erasing."""

  name = "finetune"
  requires_frozen_encoder = False
