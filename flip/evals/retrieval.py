"""Image-text retrieval (evaluator type "retrieval").

The data (`dataset`) is a held-out caption set in the LAION (img2dataset) TFRecord layout, one
caption per image (`flip.data.eval_sources.caption_source`): a directory, a file pattern or a
comma-separated list. Recall@1/5/10 for image->text and text->image, by cosine similarity of the
unmasked, normalised embeddings, with the tie rule of zero-shot (a pair counts at k when fewer
than k other candidates score at least as high as it), under `retrieval/<set>/i2t_r1` ...
`t2i_r10`, plus `retrieval/<set>/num_pairs` and `num_skipped` (pairs whose image could not be
decoded). Captions always get the training text preprocessing (`flip.evals.zeroshot.
make_tokenizer`). Images and tokens are sharded over the data axis like training batches; the
embeddings are gathered and ranked on the host in blocks of query rows.
"""

from typing import Any, Callable, Dict, Mapping, Sequence

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from flip.evals import core
from flip.evals import registry
from flip.evals import zeroshot

Array = jax.Array
Metrics = Dict[str, float]

RETRIEVAL_KS = (1, 5, 10)  # CLIP/open_clip retrieval recalls
_RANK_CHUNK = 1024  # query rows per block when ranking retrieval candidates on the host


def pair_ranks(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
  """For query i, how many candidates j != i score at least as high as its pair candidate i."""
  queries = np.asarray(queries, np.float32)
  candidates = np.asarray(candidates, np.float32)
  ranks = np.empty(len(queries), np.int64)
  for start in range(0, len(queries), _RANK_CHUNK):
    stop = min(start + _RANK_CHUNK, len(queries))
    scores = queries[start:stop] @ candidates.T
    rows = np.arange(stop - start)
    true = scores[rows, np.arange(start, stop)]
    ranks[start:stop] = np.sum(scores >= true[:, None], axis=1) - 1
  return ranks


def retrieval_metrics(img_emb: np.ndarray, txt_emb: np.ndarray,
                      ks: Sequence[int] = RETRIEVAL_KS) -> Metrics:
  """Recall@k both ways for paired rows of image and text embeddings (cosine similarity)."""
  img = core.l2_normalize(np.asarray(img_emb, np.float32))
  txt = core.l2_normalize(np.asarray(txt_emb, np.float32))
  i2t, t2i = pair_ranks(img, txt), pair_ranks(txt, img)
  metrics = {}
  for k in ks:
    metrics[f"i2t_r{k}"] = float(np.mean(i2t < k))
    metrics[f"t2i_r{k}"] = float(np.mean(t2i < k))
  return metrics


class Retrieval:
  """Partitioned pair embedding over per-process shards of a caption set."""

  def __init__(self, partitioner: Any, encode_image: Callable, encode_text: Callable,
               params_axes: Any, tokenize: zeroshot.Tokenizer, image_size: int, batch_size: int,
               crop_fraction: Any = None, key: str = "config.evals.retrieval.batch_size"):
    self.sharded = s = core.ShardedEval(partitioner, batch_size, image_size, crop_fraction, key)
    self.tokenize = tokenize

    def pairs(params, images, tokens, valid):
      return (encode_image(params, images).astype(jnp.float32),
              encode_text(params, tokens).astype(jnp.float32), valid)

    self._p_pairs = partitioner.partition(
        pairs, in_axis_resources=(params_axes, s.image_spec, s.token_spec, s.vector_spec),
        out_axis_resources=(s.replicated,) * 3)

  def retrieval(self, params: Any, source: Any) -> Metrics:
    """Recall@1/5/10 both ways on a held-out caption set (training text preprocessing)."""
    params = flax.core.unfreeze(params)
    s = self.sharded
    _, batches = s.local_batches(source)
    img_parts, txt_parts = [], []
    for batch in batches:
      captions = [c.decode("utf-8") for c in batch["caption"]]
      img, txt, valid = self._p_pairs(
          params, s.to_global(batch["image"], s.image_spec),
          s.to_global(self.tokenize(captions), s.token_spec),
          s.to_global(batch["valid"], s.vector_spec))
      img, txt, valid = jax.device_get((img, txt, valid))
      img_parts.append(np.asarray(img)[valid])
      txt_parts.append(np.asarray(txt)[valid])
    img_emb, txt_emb = np.concatenate(img_parts), np.concatenate(txt_parts)
    skipped = source.num_examples - len(img_emb)  # undecodable images (CaptionSource drops them)
    if skipped < 0 or not len(img_emb):
      s.check_count(source, len(img_emb))
    if skipped:
      logging.warning("retrieval %s: %d of %d images could not be decoded and were skipped",
                      source.name, skipped, source.num_examples)
    prefix = f"retrieval/{source.name}"
    metrics = {f"{prefix}/{key}": value
               for key, value in retrieval_metrics(img_emb, txt_emb).items()}
    metrics[f"{prefix}/num_pairs"] = float(len(img_emb))
    metrics[f"{prefix}/num_skipped"] = float(skipped)
    return metrics


@registry.register_evaluator("retrieval")
class RetrievalEvaluator(registry.Evaluator):
  """Image<->text recall@1/5/10 of an image-text task on a held-out caption set."""

  requires = frozenset({registry.Capability.EMBEDS_IMAGE_TEXT})
  defaults = {"max_images": 0}  # evaluate only the first N pairs; 0 = all

  def __init__(self, name: str, settings: Mapping[str, Any], context: registry.EvalContext):
    super().__init__(name, settings, context)
    from flip.data import eval_sources  # pylint: disable=g-import-not-at-top (tf only when evaluating)
    s = self.settings
    try:
      self.source = eval_sources.caption_source(s["dataset"], int(s["max_images"]))
    except eval_sources.EvalDataError as err:
      raise core.EvalError(str(err)) from None
    config, task = context.config, context.task
    self.retriever = Retrieval(
        context.partitioner, task.encode_image, task.encode_text, context.params_axes,
        tokenize=zeroshot.make_tokenizer(config), image_size=task.image_size,
        batch_size=int(s["batch_size"]), crop_fraction=config.aug.get("eval_crop_fraction"),
        key=f"{self.key}.batch_size")

  def evaluate(self, params: Any, flax_mutables: Any, step: int) -> Metrics:
    del flax_mutables, step
    return self.retriever.retrieval(params, self.source)
