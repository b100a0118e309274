"""The masked-autoencoder family as tasks of the one training loop: MAE pretraining, linear probe,
fine-tuning (registered in `flip.tasks.LAZY_TASKS` as "mae", "linprobe", "finetune"; selected by
`config.task` or gin's `train.build_task.task_name`). docs/MAE.md has the recipes and commands.

`MaeTask`: pixel reconstruction of the removed patches (`flip.models.mae`, `flip.losses.
mae_pixel_loss` with `config.model.norm_pix_loss`). Masks are per example: noise [B, N] is drawn
once per step for the whole global batch from the step's rng, so micro-batches (gradient
accumulation) see exactly the masks of the full batch. Every example has the same number of
removed patches, so the full-batch loss is the mean of equal-sized micro-batch losses and the
accumulated gradient (the mean of micro-batch gradients) is exactly the full-batch gradient.
Its eval hook (`flip.visualize.ReconstructionHook`) logs a reconstruction grid and the held-out
reconstruction loss of fixed images with fixed masks.

`ClassifierTask` (`LinearProbeTask`, `FinetuneTask`): softmax cross-entropy of
`flip.models.classifier.ViTClassifier` against smoothed (`config.classifier.label_smoothing`),
mixed (`config.aug.mixup`) one-hot targets, after random erasing (`config.aug.reprob`) of the
batch; accuracy is reported against the unmixed labels. The probe freezes the encoder: its
parameters are labelled "frozen" in an `optax.multi_transform` whose frozen branch is
`optax.set_to_zero()` (no update, no weight decay, no optimizer state), and the encoder runs in
inference mode behind `stop_gradient`. BatchNorm statistics of the probe head travel in the
train state's `flax_mutables` (`uses_flax_mutables`); with gradient accumulation each micro-batch
is normalised by its own statistics (as PyTorch's `accum_iter` does) and the running statistics
are updated once per micro-batch. Fine-tuning scales each parameter's update by the layer-wise lr
decay `config.classifier.layer_decay ** (num_layers + 1 - layer_id)` (`layer_id`: embeddings,
position embedding and class token 0; transformer block i (0-based) i + 1; the final encoder norm
and the head num_layers + 1), MAE's `param_groups_lrd`.

Pretrained weights (`config.pretrain_dir`): the `img_encoder` parameters of an MAE, FLIP, probe or
fine-tuned checkpoint (the same sub-tree name in every model), checked against the model and
position-embedding-resized by `flip.checkpoints.match_params`; heads stay freshly initialised
(`load_pretrained_params`, merged into the train state by the loop). MAE pretraining also takes
the decoder when the checkpoint has one.

Zero-shot evaluation (`config.eval_dataset`) needs a text tower: these tasks refuse a non-empty
`config.eval_dataset` in one line and evaluate `config.data.eval` with their own hooks instead.
"""

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flip import augment
from flip import checkpoints
from flip import config as config_lib
from flip import losses
from flip import masking
from flip import optim
from flip import tasks as tasks_lib
from flip.models import classifier as classifier_lib
from flip.models import mae as mae_lib
from flip.models import vit as vit_lib

Array = jax.Array
Params = Mapping[str, Any]
Metrics = Dict[str, Array]

ENCODER = "img_encoder"
DECODER = "mae_decoder"
TRAINED = "trained"
FROZEN = "frozen"
BLOCK_PREFIX = "encoderblock_"
EMBEDDING_NAMES = ("embedding", "pos_embedding", "cls")  # layer 0 of the layer-wise lr decay
IMAGE_AXES = ("batch", None, None, None)
LABEL_AXES = ("batch",)


def _refuse_zeroshot(config: Any, task_name: str) -> None:
  if config.get("eval_dataset"):
    raise config_lib.ConfigError(
        f"config.eval_dataset={config.eval_dataset!r} asks for zero-shot evaluation, which needs "
        f"a text tower; task {task_name!r} evaluates config.data.eval: set "
        "--config.eval_dataset=")


def _to_microbatches(tree: Any, num: int) -> Any:
  return jax.tree.map(lambda x: x.reshape((num, x.shape[0] // num) + x.shape[1:]), tree)


def _image_size_and_grid(config: Any) -> Tuple[int, Tuple[int, int]]:
  patch = tuple(config.model.model_img.patches.size)
  size = int(config.image_size)
  return size, (size // patch[0], size // patch[1])


def load_modules(path: str, params_shapes: Mapping[str, Any], required: Sequence[str],
                 optional: Sequence[str] = (),
                 posemb_grid: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
  """The `required` (and present `optional`) top-level modules of a checkpoint's parameters,
  checked against `params_shapes` (one-line CheckpointError naming the path or keys)."""
  ckpt_dir = checkpoints.find_checkpoint_dir(path)
  loaded = checkpoints.load_params_tree(ckpt_dir)
  missing = [name for name in required if name not in loaded]
  if missing:
    raise checkpoints.CheckpointError(
        f"{ckpt_dir} has no {', '.join(missing)} parameters (top-level modules: "
        f"{', '.join(sorted(loaded))})")
  names = list(required) + [name for name in optional if name in loaded]
  return checkpoints.match_params({name: loaded[name] for name in names},
                                  {name: params_shapes[name] for name in names},
                                  posemb_grid=posemb_grid, source=ckpt_dir)


# --- MAE pretraining ----------------------------------------------------------------------------

class MaeTask:
  """Masked-autoencoder pretraining on the images of `config.data.train`."""

  name = "mae"

  def __init__(self, config: Any):
    _refuse_zeroshot(config, self.name)
    ratio = config.model.model_img.mask_ratio
    if not 0.0 < ratio < 1.0:
      raise config_lib.ConfigError(f"config.model.model_img.mask_ratio must be in (0, 1) for "
                                   f"MAE, got {ratio}")
    self.config = config
    self.model = mae_lib.mae_from_config(config)
    self.image_size, self.grid = _image_size_and_grid(config)
    self.num_patches = self.grid[0] * self.grid[1]
    self.mask_ratio = ratio
    self.norm_pix_loss = bool(config.model.norm_pix_loss)

  # --- batch layout ---------------------------------------------------------------------------
  def batch_spec(self, batch_size: int) -> Dict[str, jax.ShapeDtypeStruct]:
    return {"image": jax.ShapeDtypeStruct((batch_size, self.image_size, self.image_size, 3),
                                          jnp.uint8)}

  def batch_logical_axes(self) -> Dict[str, Tuple[Any, ...]]:
    return {"image": IMAGE_AXES}

  def dummy_batch(self, batch_size: int) -> Dict[str, np.ndarray]:
    return {k: np.zeros(v.shape, v.dtype) for k, v in self.batch_spec(batch_size).items()}

  def train_dataset(self, config: Any, shard_index: int, num_shards: int, seed: int):
    from flip.data import classification  # pylint: disable=g-import-not-at-top (tf)
    return classification.make_train_dataset(config, shard_index, num_shards, seed,
                                             with_labels=False)

  # --- variables ------------------------------------------------------------------------------
  def init_variables(self, rng: Array) -> flax.core.FrozenDict:
    images = self.dummy_batch(1)["image"]
    variables = self.model.init(tasks_lib.split_rngs(rng) | {"params": rng}, images, train=False)
    return flax.core.freeze(variables)

  def load_pretrained_params(self, path: str, params_shapes: Mapping[str, Any]) -> Dict[str, Any]:
    return load_modules(path, params_shapes, required=(ENCODER,), optional=(DECODER,),
                        posemb_grid=self.grid)

  # --- forward and loss -----------------------------------------------------------------------
  def mask_noise(self, rng: Array, batch_size: int) -> Array:
    return masking.mask_noise(rng, batch_size, self.num_patches)

  def forward(self, params: Params, images: Array, mask_noise: Array, rng: Optional[Array] = None,
              train: bool = False) -> Dict[str, Array]:
    """{"pred", "target", "mask"} (flip.models.mae) for the masks given by `mask_noise`."""
    rngs = tasks_lib.split_rngs(rng) if rng is not None else {}
    return self.model.apply({"params": params}, images, train=train, mask_noise=mask_noise,
                            rngs=rngs)

  def loss_from_outputs(self, outputs: Mapping[str, Array]) -> Array:
    return losses.mae_pixel_loss(outputs["pred"], outputs["target"], outputs["mask"],
                                 self.norm_pix_loss)

  def compute_grads(self, params: Params, batch: Mapping[str, Array], rng: Array,
                    accum_steps: int = 1) -> Tuple[Array, Metrics, Params]:
    """Loss, metrics and the gradient of the full-batch reconstruction loss."""
    batch_size = batch["image"].shape[0]
    noise_rng, model_rng = jax.random.split(rng)
    noise = self.mask_noise(noise_rng, batch_size)

    def loss_fn(p, images, mask_noise, step_rng):
      return self.loss_from_outputs(self.forward(p, images, mask_noise, step_rng, train=True))

    if accum_steps == 1:
      loss, grads = jax.value_and_grad(loss_fn)(params, batch["image"], noise, model_rng)
      return loss, {}, grads

    micro = _to_microbatches({"image": batch["image"], "noise": noise}, accum_steps)
    micro_rngs = jax.random.split(model_rng, accum_steps)

    def accumulate(carry, xs):
      loss_sum, grad_sum = carry
      mb, step_rng = xs
      loss, grads = jax.value_and_grad(loss_fn)(params, mb["image"], mb["noise"], step_rng)
      return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros),
                                           (micro, micro_rngs))
    return (loss_sum / accum_steps, {},
            jax.tree.map(lambda g: g / accum_steps, grad_sum))

  # --- evaluation -----------------------------------------------------------------------------
  def eval_hooks(self, workdir: str) -> List[Any]:
    from flip import visualize  # pylint: disable=g-import-not-at-top (tf, PIL)
    hook = visualize.ReconstructionHook.from_config(self.config, workdir)
    return [hook] if hook is not None else []


# --- linear probe and fine-tuning ---------------------------------------------------------------

def vit_layer_id(names: Sequence[str], num_layers: int) -> int:
  """MAE's layer id of a classifier parameter for layer-wise lr decay (see the module doc)."""
  if names[0] != ENCODER:
    return num_layers + 1
  for name in names:
    if name.startswith(BLOCK_PREFIX):
      return int(name[len(BLOCK_PREFIX):]) + 1
  if len(names) > 1 and names[1] in EMBEDDING_NAMES:
    return 0
  return num_layers + 1


class ClassifierTask:
  """Supervised classification of `config.data.train` with a ViT (probe or fine-tuning)."""

  name = "classifier"
  uses_flax_mutables = True
  requires_frozen_encoder: Optional[bool] = None

  def __init__(self, config: Any):
    _refuse_zeroshot(config, self.name)
    frozen = bool(config.classifier.frozen_encoder)
    if self.requires_frozen_encoder is not None and frozen != self.requires_frozen_encoder:
      raise config_lib.ConfigError(
          f"task {self.name!r} needs config.classifier.frozen_encoder="
          f"{self.requires_frozen_encoder}, got {frozen}")
    self.config = config
    self.model = classifier_lib.classifier_from_config(config)
    self.image_size, self.grid = _image_size_and_grid(config)
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
    self.pixel_mean = vit_lib.IMAGENET_MEAN_RGB
    self.pixel_std = vit_lib.IMAGENET_STD_RGB

  # --- batch layout ---------------------------------------------------------------------------
  def batch_spec(self, batch_size: int) -> Dict[str, jax.ShapeDtypeStruct]:
    return {"image": jax.ShapeDtypeStruct((batch_size, self.image_size, self.image_size, 3),
                                          jnp.uint8),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

  def batch_logical_axes(self) -> Dict[str, Tuple[Any, ...]]:
    return {"image": IMAGE_AXES, "label": LABEL_AXES}

  def dummy_batch(self, batch_size: int) -> Dict[str, np.ndarray]:
    return {k: np.zeros(v.shape, v.dtype) for k, v in self.batch_spec(batch_size).items()}

  def train_dataset(self, config: Any, shard_index: int, num_shards: int, seed: int):
    from flip.data import classification  # pylint: disable=g-import-not-at-top (tf)
    return classification.make_train_dataset(config, shard_index, num_shards, seed)

  # --- variables and optimizer ----------------------------------------------------------------
  def init_variables(self, rng: Array) -> flax.core.FrozenDict:
    images = self.dummy_batch(1)["image"]
    variables = self.model.init(tasks_lib.split_rngs(rng) | {"params": rng}, images, train=False)
    return flax.core.freeze(variables)

  def load_pretrained_params(self, path: str, params_shapes: Mapping[str, Any]) -> Dict[str, Any]:
    return load_modules(path, params_shapes, required=(ENCODER,), posemb_grid=self.grid)

  def layer_decay_multipliers(self, params: Params) -> Any:
    return optim.layer_decay_multipliers(
        params, self.num_layers, self.layer_decay,
        lambda names: vit_layer_id(names, self.num_layers))

  def param_labels(self, params: Params) -> Any:
    """FROZEN for the encoder's parameters when the encoder is frozen, else TRAINED."""
    def label(path, _):
      names = optim.param_path_names(path)
      return FROZEN if self.frozen_encoder and names[0] == ENCODER else TRAINED
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
      rngs = tasks_lib.split_rngs(step_rng)
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

    micro = _to_microbatches({"image": images, "target": targets, "label": batch["label"]},
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

  # --- evaluation -----------------------------------------------------------------------------
  def eval_hooks(self, workdir: str) -> List[Any]:
    del workdir
    from flip import classification_eval  # pylint: disable=g-import-not-at-top (tf)
    hook = classification_eval.ClassificationEval.from_config(self.config)
    return [hook] if hook is not None else []


class LinearProbeTask(ClassifierTask):
  """Linear probe: frozen encoder, BatchNorm without affine, linear head (MAE's recipe)."""

  name = "linprobe"
  requires_frozen_encoder = True


class FinetuneTask(ClassifierTask):
  """End-to-end fine-tuning with layer-wise lr decay, drop path, mixup/cutmix, erasing."""

  name = "finetune"
  requires_frozen_encoder = False
