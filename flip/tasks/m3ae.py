"""M3AE pretraining as a task of the one training loop (registered as "m3ae"; docs/M3AE.md).

`M3aeTask`: the multimodal masked autoencoder of `flip.models.m3ae` on batches of images, captions
and a `paired` flag per row (1 = image and caption, 0 = a text-only example whose image slot is
ignored). Loss = `image_loss_weight` x image loss + `text_loss_weight` x text loss of the paired
rows + `unpaired_text_loss_weight` x text loss of the text-only rows (`config.model.m3ae`).
- Image loss: per-patch MSE against the normalised pixels (`config.model.norm_pix_loss`: each
  target patch normalised by its mean and unbiased variance, MAE's), averaged over the removed
  patches of paired rows, or over all their patches with `loss_all_patches`; with discretised
  targets (`discretized_image`) the per-patch term is the cross-entropy of the image head's logits
  against the code of a frozen VQGAN tokenizer (flip.models.vqgan, weights from
  `config.model.m3ae.vqgan.weights`), whose code grid must be the patch grid.
- Text losses: token cross-entropy averaged over masked real tokens (never padding); the model
  computes the token logits at those positions only (gathered into static-size rows with a
  validity mask, flip.models.m3ae), which is the same sum as over full-length logits.
Text-only rows therefore add nothing to the image loss, and their image tokens are out of every
attention (flip.models.m3ae), so they give the image-side parameters no gradient.

Masks are per example and per modality, drawn once per step for the whole global batch from the
step's rng. Each term's denominator (how many patches / tokens it averages over) is counted on
the full batch before the forward pass, so with gradient accumulation the micro-batch losses sum
to exactly the full-batch loss and the accumulated gradient is exactly its gradient.

Pretrained weights (`config.pretrain_dir`): the `img_encoder` of an M3AE checkpoint (required) and
its `text_embed` and `m3ae_decoder` when present. The probe and fine-tuning tasks load the same
`img_encoder` (flip.tasks.common.load_modules folds the image type embedding into the patch bias).
"""

from typing import Any, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flip import config as config_lib
from flip import losses
from flip import masking
from flip.models import m3ae as m3ae_lib
from flip.models import normalization
from flip.models import vqgan
from flip.tasks import common
from flip.tasks import registry

Array = jax.Array
Params = Mapping[str, Any]
Metrics = Dict[str, Array]

TEXT_EMBED = "text_embed"
DECODER = "m3ae_decoder"
TERMS = ("image", "text", "unpaired_text")
TEXT_AXES = ("batch", None)
PAIRED_AXES = ("batch",)


def per_patch_pixel_error(pred: Array, target: Array, norm_pix_loss: bool) -> Array:
  """[B, N] mean squared error per patch (MAE's target normalisation with norm_pix_loss)."""
  target = target.astype(jnp.float32)
  if norm_pix_loss:
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True, ddof=losses.MAE_NORM_PIX_VARIANCE_DDOF)
    target = (target - mean) / jnp.sqrt(var + losses.MAE_NORM_PIX_EPS)
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)


def term_weights(image_mask: Array, text_mask: Array, paired: Array,
                 loss_all_patches: bool) -> Dict[str, Array]:
  """Per-position weights (0/1) of each loss term: image [B, N], text terms [B, L]."""
  paired = paired.astype(jnp.float32)
  image = jnp.ones_like(image_mask) if loss_all_patches else image_mask
  return {"image": image * paired[:, None], "text": text_mask * paired[:, None],
          "unpaired_text": text_mask * (1.0 - paired)[:, None]}


@registry.register_task("m3ae")
class M3aeTask(registry.Task):
  """Multimodal masked-autoencoder pretraining on paired (and optional text-only) examples."""

  name = "m3ae"
  capabilities = frozenset({registry.Capability.RECONSTRUCTS,
                            registry.Capability.RECONSTRUCTS_TEXT,
                            registry.Capability.LOADS_PRETRAINED_SUBSET})

  def __init__(self, config: Any):
    super().__init__(config)
    common.refuse_zeroshot(config, self.name)
    settings = config.model.m3ae
    for key in ("image_mask_ratio", "text_mask_ratio"):
      if not 0.0 < settings[key] < 1.0:
        raise config_lib.ConfigError(f"config.model.m3ae.{key} must be in (0, 1), got "
                                     f"{settings[key]}")
    self.image_mask_ratio = float(settings.image_mask_ratio)
    self.text_mask_ratio = float(settings.text_mask_ratio)
    self.weights = {"image": float(settings.image_loss_weight),
                    "text": float(settings.text_loss_weight),
                    "unpaired_text": float(settings.unpaired_text_loss_weight)}
    self.loss_all_patches = bool(settings.loss_all_patches)
    self.norm_pix_loss = bool(config.model.norm_pix_loss)
    self.text_len = text_length(config)
    self.patch_size = tuple(config.model.model_img.patches.size)
    self.num_patches = self.posemb_grid[0] * self.posemb_grid[1]
    self.discretized = bool(settings.discretized_image)
    self.tokenizer, self.tokenizer_params = None, None
    if self.discretized:
      self.tokenizer = vqgan.tokenizer_from_config(settings.vqgan)
      if self.tokenizer.grid(self.image_size) != self.posemb_grid:
        raise config_lib.ConfigError(
            f"config.model.m3ae.vqgan gives a {self.tokenizer.grid(self.image_size)} code grid "
            f"at image_size={self.image_size}; the patch grid is {self.posemb_grid}")
      try:
        self.tokenizer_params = vqgan.load_params(settings.vqgan.weights, self.tokenizer,
                                                  self.image_size)
      except (ValueError, OSError) as err:
        raise config_lib.ConfigError(str(err)) from None
    self.model = m3ae_lib.m3ae_from_config(
        config, num_image_codes=self.tokenizer.codebook_size if self.discretized else 0,
        pixel_stats=normalization.pixel_stats(config))

  # --- batch layout ---------------------------------------------------------------------------
  def batch_spec(self, batch_size: int) -> Dict[str, jax.ShapeDtypeStruct]:
    return {"image": jax.ShapeDtypeStruct((batch_size, self.image_size, self.image_size, 3),
                                          jnp.uint8),
            "text": jax.ShapeDtypeStruct((batch_size, self.text_len), jnp.int32),
            "paired": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

  def batch_logical_axes(self) -> Dict[str, Tuple[Any, ...]]:
    return {"image": common.IMAGE_AXES, "text": TEXT_AXES, "paired": PAIRED_AXES}

  def dummy_batch(self, batch_size: int) -> Dict[str, np.ndarray]:
    return {k: np.zeros(v.shape, v.dtype) for k, v in self.batch_spec(batch_size).items()}

  def train_dataset(self, config: Any, shard_index: int, num_shards: int, seed: int):
    from flip.data import m3ae_input  # pylint: disable=g-import-not-at-top (tf)
    return m3ae_input.make_train_dataset(config, shard_index, num_shards, seed)

  # --- variables ------------------------------------------------------------------------------
  def init_variables(self, rng: Array) -> flax.core.FrozenDict:
    batch = self.dummy_batch(1)
    noise = self.mask_noise(rng, 1), jnp.zeros((1, self.text_len), jnp.float32)
    variables = self.model.init(common.split_rngs(rng) | {"params": rng}, batch["image"],
                                batch["text"], batch["paired"], *noise,
                                image_mask_ratio=self.image_mask_ratio,
                                text_mask_ratio=self.text_mask_ratio, train=False)
    return flax.core.freeze(variables)

  def load_pretrained_params(self, path: str, params_shapes: Mapping[str, Any]) -> Dict[str, Any]:
    return common.load_modules(path, params_shapes, required=(common.ENCODER,),
                               optional=(TEXT_EMBED, DECODER), posemb_grid=self.posemb_grid)

  # --- forward and loss -----------------------------------------------------------------------
  def mask_noise(self, rng: Array, batch_size: int) -> Array:
    return masking.mask_noise(rng, batch_size, self.num_patches)

  def text_noise(self, rng: Array, batch_size: int, length: Optional[int] = None) -> Array:
    return masking.mask_noise(rng, batch_size, self.text_len if length is None else length)

  def forward(self, params: Params, batch: Mapping[str, Array], image_noise: Array,
              text_noise: Array, rng: Optional[Array] = None,
              train: bool = False) -> Dict[str, Array]:
    """Model outputs (flip.models.m3ae) for the masks given by the two noises."""
    rngs = common.split_rngs(rng) if rng is not None else {}
    return self.model.apply({"params": params}, batch["image"], batch["text"], batch["paired"],
                            image_noise, text_noise, image_mask_ratio=self.image_mask_ratio,
                            text_mask_ratio=self.text_mask_ratio, train=train, rngs=rngs)

  def image_codes(self, images: Array) -> Array:
    """The frozen tokenizer's codes [B, N] (patch order) of uint8 images."""
    codes = self.tokenizer.apply({"params": self.tokenizer_params}, images)
    return jax.lax.stop_gradient(codes.reshape(codes.shape[0], -1))

  def image_targets(self, params: Params, images: Array, outputs: Mapping[str, Array]) -> Array:
    """What the image head predicts per patch: normalised pixels, or the tokenizer's codes."""
    del params
    return self.image_codes(images) if self.discretized else outputs["target"]

  def per_patch_image_loss(self, pred: Array, targets: Array) -> Array:
    if self.discretized:
      return optax.softmax_cross_entropy_with_integer_labels(pred, targets)
    return per_patch_pixel_error(pred, targets, self.norm_pix_loss)

  def weights_for(self, image_noise: Array, text_noise: Array,
                  batch: Mapping[str, Array]) -> Dict[str, Array]:
    """Each term's per-position weights, from the noises alone (no forward pass)."""
    image_mask = masking.token_mask_from_noise(image_noise, self.image_mask_ratio).mask
    text_mask = m3ae_lib.text_mask_from_noise(text_noise, batch["text"], self.text_mask_ratio).mask
    return term_weights(image_mask, text_mask, batch["paired"], self.loss_all_patches)

  def term_sums(self, params: Params, batch: Mapping[str, Array],
                outputs: Mapping[str, Array]) -> Dict[str, Array]:
    """Each term's weighted sum of per-position losses over the batch (not yet averaged)."""
    weights = term_weights(outputs["mask"], outputs["text_mask"], batch["paired"],
                           self.loss_all_patches)
    per_patch = self.per_patch_image_loss(outputs["pred"],
                                          self.image_targets(params, batch["image"], outputs))
    positions = outputs["text_positions"]
    labels = jnp.take_along_axis(batch["text"], positions, axis=1)
    per_token = optax.softmax_cross_entropy_with_integer_labels(outputs["text_logits"], labels)
    valid = outputs["text_position_valid"].astype(jnp.float32)

    def text_sum(term):
      return jnp.sum(per_token * valid * jnp.take_along_axis(weights[term], positions, axis=1))

    return {"image": jnp.sum(per_patch * weights["image"]), "text": text_sum("text"),
            "unpaired_text": text_sum("unpaired_text")}

  def combine(self, sums: Mapping[str, Array],
              counts: Mapping[str, Array]) -> Tuple[Array, Metrics]:
    terms = {k: sums[k] / jnp.maximum(counts[k], 1.0) for k in TERMS}
    loss = sum(self.weights[k] * terms[k] for k in TERMS)
    return loss, {f"{k}_loss": v for k, v in terms.items()}

  def reconstruct(self, params: Params, images: Array,
                  mask_noise: Array) -> Tuple[Dict[str, Array], Array]:
    """Image reconstruction without a caption (inference mode) and its image loss."""
    if self.discretized:
      raise config_lib.ConfigError("the reconstruction grid needs pixel targets: "
                                   "config.model.m3ae.discretized_image=True predicts codes")
    batch = {"image": images, "text": jnp.zeros((images.shape[0], 1), jnp.int32),
             "paired": jnp.ones((images.shape[0],), jnp.int32)}
    outputs = self.forward(params, batch, mask_noise, jnp.zeros((images.shape[0], 1)))
    sums = self.term_sums(params, batch, outputs)
    count = jnp.sum(term_weights(outputs["mask"], outputs["text_mask"], batch["paired"],
                                 self.loss_all_patches)["image"])
    return ({k: outputs[k] for k in ("pred", "target", "mask")},
            sums["image"] / jnp.maximum(count, 1.0))

  def reconstruct_text(self, params: Params, images: Array, text: Array, paired: Array,
                       image_noise: Array, text_noise: Array) -> Dict[str, Array]:
    """Captions with their masked tokens replaced by the token head's argmax (inference mode):
    {"predicted": int32 [B, L], "text_mask": [B, L] (1 = masked real token)}."""
    batch = {"image": images, "text": text, "paired": paired}
    outputs = self.forward(params, batch, image_noise, text_noise)
    guesses = jnp.argmax(outputs["text_logits"], axis=-1).astype(jnp.int32)
    guesses = jnp.where(outputs["text_position_valid"], guesses, 0)
    rows = jnp.arange(text.shape[0])[:, None]
    # Unused slots add 0, so a position they repeat keeps its one real guess.
    at_masked = jnp.zeros_like(text).at[rows, outputs["text_positions"]].add(guesses)
    masked = outputs["text_mask"] > 0
    return {"predicted": jnp.where(masked, at_masked, text).astype(jnp.int32),
            "text_mask": outputs["text_mask"]}

  def draw_noise(self, rng: Array, batch: Mapping[str, Array]) -> Tuple[Array, Array, Array]:
    """A step's image noise [B, N], text noise [B, L] (independent streams) and model rng."""
    image_rng, text_rng, model_rng = jax.random.split(rng, 3)
    batch_size, length = batch["text"].shape
    return (self.mask_noise(image_rng, batch_size), self.text_noise(text_rng, batch_size, length),
            model_rng)

  def compute_grads(self, params: Params, batch: Mapping[str, Array], rng: Array,
                    accum_steps: int = 1) -> Tuple[Array, Metrics, Params]:
    """Loss, per-term metrics and the gradient of the full-batch loss."""
    image_noise, text_noise, model_rng = self.draw_noise(rng, batch)
    counts = {k: jnp.sum(v) for k, v in self.weights_for(image_noise, text_noise, batch).items()}

    def loss_fn(p, mb, step_rng):
      outputs = self.forward(p, mb, mb["image_noise"], mb["text_noise"], step_rng, train=True)
      return self.combine(self.term_sums(p, mb, outputs), counts)

    full = dict(batch, image_noise=image_noise, text_noise=text_noise)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
      (loss, metrics), grads = grad_fn(params, full, model_rng)
      return loss, metrics, grads

    micro = common.to_microbatches(full, accum_steps)
    micro_rngs = jax.random.split(model_rng, accum_steps)

    def accumulate(carry, xs):
      (loss, metrics), grads = grad_fn(params, *xs)
      return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

    zero = jnp.zeros((), jnp.float32)
    init = (zero, {f"{k}_loss": zero for k in TERMS}, jax.tree.map(jnp.zeros_like, params))
    (loss, metrics, grads), _ = jax.lax.scan(accumulate, init, (micro, micro_rngs))
    return loss, metrics, grads


def text_length(config: Any) -> int:
  """Tokens per batch row: the paired caption length, or the text-only one when a text-only
  source is mixed in (rows of both kinds share one batch)."""
  settings = config.model.m3ae
  length = int(settings.text_max_len)
  if config.data.get("text_only"):
    length = max(length, int(settings.unpaired_text_max_len))
  return length
