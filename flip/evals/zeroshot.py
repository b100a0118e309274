"""Zero-shot classification (evaluator type "zeroshot"; FLIP's evaluation).

Zero-shot classifier (CLIP's recipe, as FLIP and open_clip use it). For every class, each prompt
template is filled with the class name ("{}" placeholder), encoded by the text tower, L2-normalised;
the template embeddings are averaged and the mean is renormalised: the class weight. An image is
scored by the cosine similarity of its unmasked, normalised embedding with every class weight.
Top-k uses the tie rule of `flip.evals.core.topk_counts` (ties count against the model, so a
constant model scores 0 top-1); k is capped by the number of classes. Metrics are fractions in
[0, 1] under `zeroshot/<dataset>/top1|top5` (the "top5" key holds top-min(5, C)) plus
`zeroshot/<dataset>/num_images`.

Prompt text preprocessing. By default prompts go through exactly the training tokenizer (BERT
uncased WordPiece: lower-cases and splits punctuation into tokens). Reported numbers use this
default. `canonicalize=True` first applies big_vision-style canonicalisation (lower-case, remove
punctuation characters, collapse runs of whitespace, strip): "a photo of the t-shirt." -> "a photo
of the tshirt".

The data (`dataset`, one of the forms `flip.data.eval_sources` accepts: a tfds name such as
"imagenet2012:5.*.*", an image folder, or "demo:<dir>") comes with its class names and templates
(`templates`, a key of flip/assets/imagenet_zeroshot.json, for tfds and folders; `classnames_file`
for folders). In FLIP's configs the entry's dataset is `config.eval_dataset` itself. Prompts are
known to every process; they are sharded over the data axis too, and the task's encoders run
under the partitioner with the training sharding of the parameters.
"""

import re
import unicodedata
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flip.evals import core
from flip.evals import registry

Array = jax.Array
Params = Any
Metrics = Dict[str, float]
ImageEncoder = Callable[[Params, Array], Array]  # (params, uint8 [B, S, S, 3]) -> [B, D]
TextEncoder = Callable[[Params, Array], Array]  # (params, int32 [B, L]) -> [B, D]
Tokenizer = Callable[[Sequence[str]], np.ndarray]  # strings -> int32 [N, L]


# --- prompts ------------------------------------------------------------------------------------

def canonicalize_text(text: str) -> str:
  """Lower-case, drop punctuation (Unicode category P*), collapse whitespace, strip."""
  lowered = text.lower()
  kept = "".join(ch for ch in lowered if not unicodedata.category(ch).startswith("P"))
  return re.sub(r"\s+", " ", kept).strip()


def class_prompts(classnames: Sequence[str], templates: Sequence[str],
                  canonicalize: bool = False) -> List[str]:
  """Prompts in class-major order: class 0 with every template, then class 1, ..."""
  prompts = [template.replace("{}", name) for name in classnames for template in templates]
  return [canonicalize_text(p) for p in prompts] if canonicalize else prompts


def make_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
  """The training tokenizer (`flip.data.text`) as strings -> int32 [N, config.aug.txt.max_len]."""
  from flip.data import text  # pylint: disable=g-import-not-at-top (tf only when evaluating)
  vocab = text.get_vocabulary(config.aug.txt)
  max_len = config.aug.txt.max_len
  return lambda strings: np.asarray(text.tokenize(vocab, list(strings), max_len), np.int32)


# --- the sharded classifier ---------------------------------------------------------------------

class ZeroShotClassifier:
  """Partitioned encoders and the zero-shot loop over per-process data shards."""

  def __init__(self, partitioner: Any, encode_image: ImageEncoder, encode_text: TextEncoder,
               params_axes: Any, tokenize: Tokenizer, image_size: int, batch_size: int,
               canonicalize: bool = False, crop_fraction: Optional[float] = None,
               key: str = "config.evals.zeroshot.batch_size"):
    self.sharded = core.ShardedEval(partitioner, batch_size, image_size, crop_fraction, key)
    self.tokenize = tokenize
    self.canonicalize = canonicalize
    self._encode_image = encode_image
    self._encode_text = encode_text
    self._params_axes = params_axes
    sharded = self.sharded
    self._p_text = partitioner.partition(
        lambda params, tokens: encode_text(params, tokens).astype(jnp.float32),
        in_axis_resources=(params_axes, sharded.token_spec),
        out_axis_resources=sharded.replicated)
    self._p_classify: Dict[int, Any] = {}
    self._prompt_tokens: Dict[Tuple[Tuple[str, ...], Tuple[str, ...]], np.ndarray] = {}

  def _classify_fn(self, k: int):
    """(params, weights [D, C], images, labels, valid) -> topk_counts of the batch."""
    if k not in self._p_classify:
      def step(params, weights, images, labels, valid):
        emb = self._encode_image(params, images).astype(jnp.float32)
        emb = emb * jax.lax.rsqrt(jnp.maximum(jnp.sum(emb * emb, -1, keepdims=True),
                                              jnp.finfo(jnp.float32).tiny))
        logits = jnp.dot(emb, weights, precision=jax.lax.Precision.HIGHEST)
        return core.topk_counts(logits, labels, valid, k)
      s = self.sharded
      self._p_classify[k] = s.partitioner.partition(
          step, in_axis_resources=(self._params_axes, s.replicated, s.image_spec, s.vector_spec,
                                   s.vector_spec),
          out_axis_resources=(s.replicated,) * 3)
    return self._p_classify[k]

  def encode_texts(self, params: Any, tokens: np.ndarray) -> Iterator[Tuple[int, np.ndarray]]:
    """Yields (start row, embeddings [rows, D]) over `tokens` in global batches."""
    params = flax.core.unfreeze(params)
    batch_size = self.sharded.batch_size
    for start in range(0, len(tokens), batch_size):
      chunk = tokens[start:start + batch_size]
      rows = len(chunk)
      if rows < batch_size:
        chunk = np.concatenate([chunk, np.zeros((batch_size - rows,) + chunk.shape[1:],
                                                chunk.dtype)])
      emb = self._p_text(params, self.sharded.full_to_global(chunk, self.sharded.token_spec))
      yield start, np.asarray(jax.device_get(emb))[:rows]

  def classifier_weights(self, params: Any, classnames: Sequence[str],
                         templates: Sequence[str]) -> np.ndarray:
    """Zero-shot class weights [D, C]: mean of normalised template embeddings, renormalised."""
    key = (tuple(classnames), tuple(templates))
    if key not in self._prompt_tokens:  # tokenised once; the weights change with the params
      self._prompt_tokens[key] = self.tokenize(class_prompts(classnames, templates,
                                                             self.canonicalize))
    tokens = self._prompt_tokens[key]
    num_templates = len(templates)
    sums = None
    for start, emb in self.encode_texts(params, tokens):
      emb = core.l2_normalize(emb.astype(np.float64))
      if sums is None:
        sums = np.zeros((len(classnames), emb.shape[-1]), np.float64)
      np.add.at(sums, (start + np.arange(len(emb))) // num_templates, emb)
    weights = core.l2_normalize(sums / num_templates)
    return weights.T.astype(np.float32)

  def zeroshot(self, params: Any, source: Any) -> Metrics:
    """Top-1/top-5 of the zero-shot classifier built from `source`'s class names and templates."""
    k = min(core.TOPK, len(source.classnames))
    weights = self.classifier_weights(params, source.classnames, source.templates)
    weights = self.sharded.full_to_global(weights, self.sharded.replicated)
    classify = self._classify_fn(k)
    params = flax.core.unfreeze(params)
    return self.sharded.topk_accuracy(
        source, f"zeroshot/{source.name}",
        lambda images, labels, valid: classify(params, weights, images, labels, valid))


# --- the evaluator ------------------------------------------------------------------------------

@registry.register_evaluator("zeroshot")
class ZeroShotEvaluator(registry.Evaluator):
  """Zero-shot top-1/top-5 of an image-text task on a labelled data set."""

  requires = frozenset({registry.Capability.EMBEDS_IMAGE_TEXT})
  defaults = {
      "templates": "templates_full",  # key in flip/assets/imagenet_zeroshot.json (CLIP's 80)
      "canonicalize": False,  # big_vision-style prompt canonicalisation before tokenising
      "classnames_file": "",  # image folders: default <dir>/classnames.txt
      "max_images": 0,  # evaluate only the first N images; 0 = all
  }

  def __init__(self, name: str, settings: Mapping[str, Any], context: registry.EvalContext):
    super().__init__(name, settings, context)
    from flip.data import eval_sources  # pylint: disable=g-import-not-at-top (tf only when evaluating)
    s = self.settings
    known_templates = sorted(k for k in eval_sources.load_imagenet_zeroshot()
                             if k.startswith("templates"))
    if s["templates"] not in known_templates:
      raise core.EvalConfigError(f"{self.key}.templates={s['templates']!r} is not one of "
                                 f"{', '.join(known_templates)}")
    try:
      self.source = eval_sources.classification_source(s["dataset"], s["templates"],
                                                   s["classnames_file"], int(s["max_images"]))
    except eval_sources.EvalDataError as err:
      raise core.EvalError(str(err)) from None
    config, task = context.config, context.task
    self.classifier = ZeroShotClassifier(
        context.partitioner, task.encode_image, task.encode_text, context.params_axes,
        tokenize=make_tokenizer(config), image_size=task.image_size,
        batch_size=int(s["batch_size"]), canonicalize=bool(s["canonicalize"]),
        crop_fraction=config.aug.get("eval_crop_fraction"), key=f"{self.key}.batch_size")

  def evaluate(self, params: Any, flax_mutables: Any, step: int) -> Metrics:
    del flax_mutables, step
    return self.classifier.zeroshot(params, self.source)
