"""M3AE caption reconstructions as text in tensorboard (evaluator type "caption_reconstruction").

For the first `num_captions` usable rows of the entry's `dataset` (HDF5 files in M3AE's paired
layout, `jpg` + `caption`, or its text-only layout, `text`; paths or globs, comma-separated, an
optional `hdf5:` prefix), the task masks image and caption with fixed noise (`seed`, so successive
runs show the same masks) and predicts the masked tokens. One markdown table is written to the
context's writer (clu's `write_texts`, tensorboard tag `m3ae/captions`): per caption the original,
the masked caption (each masked token shown as [MASK], glued to the previous word when it is a
`##` continuation piece) and the predicted caption (the original with each masked token replaced
by the token head's argmax; the other tokens are the input's). Tokens are joined back into text as
BERT does (word pieces `##x` glued to the previous piece); a predicted id beyond the vocabulary
file (a token-table row no caption uses) is shown as `[id N]`. The metric is the share of masked
tokens predicted exactly (`m3ae/caption_token_accuracy`).

Rows are read in file order: blank captions and images that do not decode are passed over. Images
get the evaluation resize and centre crop; a text-only row has a blank image and `paired` = 0, as
in training. Captions are tokenised like the training input (flip.data.m3ae_input.vocabulary).
"""

from typing import Any, Dict, List, Mapping, Sequence, Tuple

import flax
import jax
import numpy as np

from flip.evals import core
from flip.evals import registry

MASK_TOKEN = "[MASK]"
TENSORBOARD_TAG = "m3ae/captions"
ACCURACY_TAG = "m3ae/caption_token_accuracy"
DEFAULT_NUM_CAPTIONS = 8
HDF5_PREFIX = "hdf5:"
PIECE_PREFIX = "##"
PAD_ID = 0


def join_pieces(pieces: Sequence[str]) -> str:
  """WordPiece tokens -> text: spaces between words, `##` continuations glued on (BERT's)."""
  return " ".join(pieces).replace(" " + PIECE_PREFIX, "").strip()


def _entry(entries: Sequence[str], token: int) -> str:
  """A predicted id's piece; ids of token-table rows beyond the vocabulary file as [id N]."""
  return entries[token] if token < len(entries) else f"[id {token}]"


def _masked_piece(piece: str) -> str:
  """[MASK] in place of a piece; glued to the previous word where the piece continued it."""
  return PIECE_PREFIX + MASK_TOKEN if piece.startswith(PIECE_PREFIX) else MASK_TOKEN


def caption_texts(text: np.ndarray, predicted: np.ndarray, mask: np.ndarray,
                  entries: Sequence[str]) -> List[Tuple[str, str, str]]:
  """(original, masked, predicted) strings per row of ids [B, L] (padding, id 0, left out)."""
  rows = []
  for ids, guess, masked in zip(np.asarray(text), np.asarray(predicted), np.asarray(mask) > 0):
    real = ids != PAD_ID
    original = [entries[i] for i in ids[real]]
    shown = [_masked_piece(entries[i]) if m else entries[i]
             for i, m in zip(ids[real], masked[real])]
    rows.append((join_pieces(original), join_pieces(shown),
                 join_pieces([_entry(entries, i) for i in guess[real]])))
  return rows


def markdown_table(rows: Sequence[Tuple[str, str, str]]) -> str:
  escape = lambda s: s.replace("|", "\\|")
  lines = ["| original | masked | predicted |", "| --- | --- | --- |"]
  lines += [f"| {escape(a)} | {escape(b)} | {escape(c)} |" for a, b, c in rows]
  return "\n".join(lines)


def load_examples(config: Any, spec: str, num: int, text_len: int,
                  key: str) -> Dict[str, np.ndarray]:
  """The first `num` usable rows of `spec` as {"image", "text", "paired"} host arrays."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top (tf only when evaluating)
  from flip.data import hdf5  # pylint: disable=g-import-not-at-top
  from flip.data import m3ae_input  # pylint: disable=g-import-not-at-top
  from flip.data import text as text_lib  # pylint: disable=g-import-not-at-top
  from flip.data import transforms  # pylint: disable=g-import-not-at-top
  spec = spec[len(HDF5_PREFIX):] if spec.startswith(HDF5_PREFIX) else spec
  size, crop = int(config.image_size), config.aug.get("eval_crop_fraction") or 1.0
  blank = np.zeros((size, size, transforms.RGB_CHANNELS), np.uint8)
  try:
    files = hdf5.list_files(spec, key)
    vocab = m3ae_input.vocabulary(config)
    images, captions, paired = [], [], []
    for path in files:
      handle = hdf5.open_file(path)
      if "jpg" in handle and "caption" in handle:
        image_column, caption_column = handle["jpg"], handle["caption"]
        max_len = int(config.model.m3ae.text_max_len)
      elif "text" in handle:
        image_column, caption_column = None, handle["text"]
        max_len = int(config.model.m3ae.unpaired_text_max_len)
      else:
        raise hdf5.Hdf5DataError(f"{key}: HDF5 file {path} has neither `jpg` + `caption` "
                                 f"(paired) nor `text` (text-only)")
      for row in range(len(caption_column)):
        if len(captions) == num:
          break
        caption = hdf5.cell_bytes(caption_column[row]).decode("utf-8", errors="replace")
        if not caption.strip():
          continue
        image = blank
        if image_column is not None:
          try:
            image = transforms.eval_transform(
                tf.constant(hdf5.cell_bytes(image_column[row])), size, crop).numpy()
          except tf.errors.OpError:
            continue
        tokens = np.asarray(text_lib.tokenize(vocab, [caption], min(max_len, text_len)))[0]
        captions.append(np.pad(tokens, (0, text_len - len(tokens))))
        images.append(image)
        paired.append(int(image_column is not None))
  except hdf5.Hdf5DataError as err:
    raise core.EvalError(str(err)) from None
  if not captions:
    raise core.EvalError(f"{key}: no usable caption in {spec}")
  return {"image": np.stack(images), "text": np.stack(captions).astype(np.int32),
          "paired": np.asarray(paired, np.int32)}


def vocab_entries(config: Any) -> List[str]:
  from flip.data import m3ae_input  # pylint: disable=g-import-not-at-top (tf)
  return m3ae_input.vocab_entries(config)


@registry.register_evaluator("caption_reconstruction")
class CaptionReconstructionEvaluator(registry.Evaluator):
  """Original / masked / predicted captions to the writer, masked-token accuracy to the metrics."""

  requires = frozenset({registry.Capability.RECONSTRUCTS_TEXT})
  defaults = {
      "num_captions": DEFAULT_NUM_CAPTIONS,  # captions shown (one forward pass; no batch_size)
      "seed": 0,  # seed of the image and text masks
  }

  def __init__(self, name: str, settings: Mapping[str, Any], context: registry.EvalContext):
    super().__init__(name, settings, context)
    num = int(self.settings["num_captions"])
    if num <= 0:
      raise core.EvalConfigError(f"{self.key}.num_captions must be > 0, got {num}")
    task = context.task
    self.batch = load_examples(context.config, self.settings["dataset"], num, task.text_len,
                               f"{self.key}.dataset")
    self.entries = vocab_entries(context.config)
    count, length = self.batch["text"].shape
    image_rng, text_rng = jax.random.split(jax.random.PRNGKey(int(self.settings["seed"])))
    self.noise = (np.asarray(task.mask_noise(image_rng, count)),
                  np.asarray(task.text_noise(text_rng, count, length)))
    replicated = jax.sharding.PartitionSpec()
    self._forward = context.partitioner.partition(
        task.reconstruct_text,
        in_axis_resources=(context.params_axes,) + (replicated,) * 5,
        out_axis_resources=replicated)

  def predict(self, params: Any) -> Dict[str, np.ndarray]:
    mesh = self.context.partitioner.mesh
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    place = lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    b = self.batch
    outputs = self._forward(flax.core.unfreeze(params), place(b["image"]), place(b["text"]),
                            place(b["paired"]), *(place(n) for n in self.noise))
    return jax.tree.map(np.asarray, jax.device_get(outputs))

  def evaluate(self, params: Any, flax_mutables: Any, step: int) -> Dict[str, float]:
    del flax_mutables
    outputs = self.predict(params)
    text, mask = self.batch["text"], outputs["text_mask"] > 0
    rows = caption_texts(text, outputs["predicted"], mask, self.entries)
    writer = self.context.writer
    if writer is not None:
      writer.write_texts(step, {TENSORBOARD_TAG: markdown_table(rows)})
      writer.flush()
    correct = np.sum((outputs["predicted"] == text) & mask)
    return {ACCURACY_TAG: float(correct / max(int(np.sum(mask)), 1))}

  def summary(self, metrics: Mapping[str, float]) -> str:
    return f"{ACCURACY_TAG} {100 * metrics[ACCURACY_TAG]:.2f}%"
