"""FLIP's contrastive image-text task: random patch dropping, InfoNCE (or SigLIP) loss,
registered as "flip".

Gradient accumulation for a contrastive loss. Summing micro-batch gradients of per-micro-batch
losses would change the objective (fewer negatives per example). `FlipTask` instead computes the
exact gradient of the full-batch loss in `k` micro-batches (the "gradient cache" construction):
(1) embed every micro-batch without keeping activations, (2) compute the full-batch loss and its
gradient with respect to the embeddings and the temperature, (3) re-run each micro-batch and
back-propagate its slice of those embedding gradients. Peak activation memory is one
micro-batch's; the cost is one extra forward pass. Patch masks come from per-example noise drawn
once for the whole batch, so every example is masked identically either way; with dropout or drop
path (zero in FLIP's configs) the micro-batches draw different random numbers than the full batch.
"""

from typing import Any, Dict, Mapping, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from flip import losses
from flip import masking
from flip.models import flip as flip_model_lib
from flip.models import normalization
from flip.tasks import common
from flip.tasks import registry

Array = jax.Array
Params = Mapping[str, Any]
Metrics = Dict[str, Array]

@registry.register_task("flip")
class FlipTask(registry.Task):
  """Contrastive image-text pretraining with random patch dropping (FLIP)."""

  name = "flip"
  capabilities = frozenset({registry.Capability.EMBEDS_IMAGE_TEXT})

  def __init__(self, config: Any):
    super().__init__(config)
    model = flip_model_lib.flip_model_from_config(config)
    self.model = model.clone(img=normalization.with_pixel_stats(model.img, config))
    self.max_len = config.aug.txt.max_len
    self.mask_ratio = config.model.model_img.mask_ratio
    self.num_patches = self.posemb_grid[0] * self.posemb_grid[1]
    self.loss_kind = config.model.clr.loss

  # --- batch layout ---------------------------------------------------------------------------
  def batch_spec(self, batch_size: int) -> Dict[str, jax.ShapeDtypeStruct]:
    return {
        "image": jax.ShapeDtypeStruct((batch_size, self.image_size, self.image_size, 3), jnp.uint8),
        "txt": jax.ShapeDtypeStruct((batch_size, self.max_len), jnp.int32),
    }

  def batch_logical_axes(self) -> Dict[str, Tuple[Any, ...]]:
    return {"image": ("batch", None, None, None), "txt": ("batch", None)}

  def dummy_batch(self, batch_size: int) -> Dict[str, np.ndarray]:
    return {k: np.zeros(v.shape, v.dtype) for k, v in self.batch_spec(batch_size).items()}

  def train_dataset(self, config: Any, shard_index: int, num_shards: int, seed: int):
    """Per-process batches of LAION-format image-text pairs (`config.laion_path`)."""
    from flip.data import laion  # pylint: disable=g-import-not-at-top (keeps tf out of model use)
    return laion.make_train_dataset(config, shard_index, num_shards, seed)

  # --- variables ------------------------------------------------------------------------------
  def init_variables(self, rng: Array) -> flax.core.FrozenDict:
    """Parameters and their logical axes (`params_axes`), as t5x's train state wants them."""
    batch = self.dummy_batch(1)
    variables = self.model.init(common.split_rngs(rng) | {"params": rng}, batch["image"],
                                batch["txt"], train=False)
    return flax.core.freeze(variables)

  # --- training -------------------------------------------------------------------------------
  def loss_from_outputs(self, outputs: Mapping[str, Array]) -> Tuple[Array, Metrics]:
    if self.loss_kind == "sigmoid":
      loss, metrics = losses.sigmoid_loss(outputs["img_emb"], outputs["txt_emb"],
                                          outputs["logit_scale_log"], outputs["logit_bias"])
    else:
      loss, metrics = losses.contrastive_loss(outputs["img_emb"], outputs["txt_emb"],
                                              outputs["logit_scale_log"])
    metrics = dict(metrics)
    metrics["logit_scale"] = jnp.exp(outputs["logit_scale_log"])
    return loss, metrics

  def _mask_noise(self, rng: Array, batch_size: int):
    if self.mask_ratio <= 0.0:
      return None
    return masking.mask_noise(rng, batch_size, self.num_patches)

  def _head_outputs(self, params: Params, img_emb: Array, txt_emb: Array) -> Dict[str, Array]:
    outputs = {"img_emb": img_emb, "txt_emb": txt_emb,
               "logit_scale_log": self.model.apply({"params": params},
                                                   method=self.model.log_logit_scale)}
    if self.loss_kind == "sigmoid":
      outputs["logit_bias"] = params["logit_bias"]
    return outputs

  def compute_grads(self, params: Params, batch: Mapping[str, Array], rng: Array,
                    accum_steps: int = 1) -> Tuple[Array, Metrics, Params]:
    """Loss, metrics and the gradient of the full-batch loss w.r.t. params."""
    batch_size = batch["image"].shape[0]
    noise_rng, model_rng = jax.random.split(rng)
    noise = self._mask_noise(noise_rng, batch_size)

    def embed(p, images, tokens, mask_noise, step_rng):
      return self.model.apply({"params": p}, images, tokens, train=True, mask_noise=mask_noise,
                              rngs=common.split_rngs(step_rng), method=self.model.embed)

    if accum_steps == 1:
      def loss_fn(p):
        img_emb, txt_emb = embed(p, batch["image"], batch["txt"], noise, model_rng)
        return self.loss_from_outputs(self._head_outputs(p, img_emb, txt_emb))

      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      return loss, metrics, grads

    micro = common.to_microbatches(
        {"image": batch["image"], "txt": batch["txt"], "noise": noise}, accum_steps)
    micro_rngs = jax.random.split(model_rng, accum_steps)

    def embed_micro(p, xs):
      mb, r = xs
      return embed(p, mb["image"], mb["txt"], mb["noise"], r)

    img_emb, txt_emb = jax.lax.map(lambda xs: embed_micro(params, xs), (micro, micro_rngs))
    flat = lambda e: e.reshape((batch_size,) + e.shape[2:])

    def head_loss(img, txt, p):
      return self.loss_from_outputs(self._head_outputs(p, img, txt))

    (loss, metrics), (d_img, d_txt, head_grads) = jax.value_and_grad(
        head_loss, argnums=(0, 1, 2), has_aux=True)(flat(img_emb), flat(txt_emb), params)
    d_img = d_img.reshape(img_emb.shape)
    d_txt = d_txt.reshape(txt_emb.shape)

    def backprop_micro(grads_so_far, xs):
      mb, r, g_img, g_txt = xs
      _, vjp = jax.vjp(lambda p: embed_micro(p, (mb, r)), params)
      (g,) = vjp((g_img.astype(img_emb.dtype), g_txt.astype(txt_emb.dtype)))
      return jax.tree.map(jnp.add, grads_so_far, g), None

    grads, _ = jax.lax.scan(backprop_micro, head_grads, (micro, micro_rngs, d_img, d_txt))
    return loss, metrics, grads

  # --- evaluation -----------------------------------------------------------------------------
  def encode_image(self, params: Params, images: Array) -> Array:
    """Unmasked, normalised image embeddings (evaluation)."""
    return self.model.apply({"params": params}, images, train=False, mask_ratio=0.0,
                            method=self.model.encode_image)

  def encode_text(self, params: Params, tokens: Array) -> Array:
    return self.model.apply({"params": params}, tokens, train=False,
                            method=self.model.encode_text)
