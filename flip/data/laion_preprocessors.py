"""The seqio Task preprocessors of a LAION source: decode + augment + tokenize, then skip
accounting (cumulative counts per reason, kept in the iterator state), and the sum of the counts
over the sources of a mixture.

Every example arrives with a reason code (`flip.data.laion_contract.Reason`) instead of being
dropped where the problem is found. Image decoding can only fail by raising, so it is followed by
`ignore_errors`, and the gaps it leaves in `seq_parsed` (numbered before decoding) are counted as
`undecodable_image`; the remaining gaps in `seq_read` (numbered before Example parsing) as
`bad_record`. A `Dataset.scan` accumulates the counts per reason and then drops the invalid
examples. An epoch without a single valid example on a host raises an error naming the source
and shard instead of spinning forever (e.g. fewer examples than hosts).

Decoding, random crop, flip and resize are `flip.data.transforms`, in a parallel deterministic
map; captions are tokenized (`flip.data.text`) TOKENIZE_BATCH per call.
"""

from typing import Sequence

import ml_collections
import seqio
import tensorflow as tf

from flip.data import text
from flip.data import transforms
from flip.data.laion_contract import graph
from flip.data.laion_contract import NUM_REASONS
from flip.data.laion_contract import Reason
from flip.data.laion_contract import SKIP_REASONS

AUTOTUNE = tf.data.AUTOTUNE
# Captions tokenized per call: amortises tensorflow-text's per-call cost.
TOKENIZE_BATCH = 64
# Only the first characters of a caption are tokenized: max_len tokens of BERT WordPiece need far
# fewer, and 100 kB captions exist in LAION.
MAX_CAPTION_CHARS_PER_TOKEN = 64


def decode_and_tokenize(config: ml_collections.ConfigDict, vocab: seqio.Vocabulary,
                        augment_seed: int):
  """Numbers the parsed stream (`seq_parsed`), decodes + augments valid images in parallel (corrupt
  ones raise and are dropped by `ignore_errors`), then tokenizes captions TOKENIZE_BATCH at a time.
  """
  image_size = int(config.image_size)
  max_len = int(config.aug.txt.max_len)
  max_chars = max_len * MAX_CAPTION_CHARS_PER_TOKEN

  def decode(seq_parsed, ex):
    ok = tf.equal(ex["reason"], int(Reason.OK))
    seed = tf.stack([tf.constant(augment_seed, tf.int64), ex["seq_read"]])
    image = tf.cond(ok, lambda: transforms.train_transform(ex["image"], seed, config),
                    lambda: tf.zeros([image_size, image_size, transforms.RGB_CHANNELS], tf.uint8))
    # Invalid captions (possibly not UTF-8) are never tokenized.
    caption = tf.strings.substr(tf.where(ok, ex["caption"], b""), 0, max_chars, unit="UTF8_CHAR")
    return {"image": image, "caption": caption, "reason": ex["reason"],
            "seq_read": ex["seq_read"], "seq_parsed": seq_parsed}

  def tokenize(batch):
    batch = dict(batch)
    batch["txt"] = text.tokenize(vocab, batch.pop("caption"), max_len)
    return batch

  def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
    dataset = dataset.enumerate().map(graph(decode), num_parallel_calls=AUTOTUNE,
                                      deterministic=True).ignore_errors()
    return dataset.batch(TOKENIZE_BATCH).map(graph(tokenize), num_parallel_calls=AUTOTUNE,
                                             deterministic=True).unbatch()

  return preprocess


def count_and_drop(source_id: int, source_name: str, shard_index: int, num_shards: int,
                   unreadable_files: int):
  """Cumulative skip counts per reason (scan state), then only valid examples and epoch markers.

  Examples missing from the stream were dropped by `ignore_errors`: gaps in `seq_parsed` are
  image decoding failures, the rest of the gaps in `seq_read` are Example parsing failures.
  """
  initial_counts = [0] * NUM_REASONS
  initial_counts[Reason.UNREADABLE_FILE] = unreadable_files
  one_hot = tf.eye(NUM_REASONS, dtype=tf.int64)
  skip_mask = tf.constant([1 if r in SKIP_REASONS else 0 for r in Reason], tf.int64)

  def step(state, ex):
    last_read, last_parsed, counts, valid_in_epoch, epoch = state
    gap_read = ex["seq_read"] - last_read - 1
    gap_parsed = ex["seq_parsed"] - last_parsed - 1
    counts = (counts + (gap_read - gap_parsed) * one_hot[Reason.BAD_RECORD]
              + gap_parsed * one_hot[Reason.UNDECODABLE_IMAGE]
              + one_hot[ex["reason"]] * skip_mask)
    is_ok = tf.equal(ex["reason"], int(Reason.OK))
    is_end = tf.equal(ex["reason"], int(Reason.EPOCH_END))
    check = tf.debugging.Assert(
        ~is_end | (valid_in_epoch > 0),
        [f"LAION source {source_name!r}, shard {shard_index} of {num_shards}: epoch", epoch,
         "produced no valid example (fewer valid examples than shards, or every record is bad). "
         "Skip counts by reason " + ", ".join(r.name.lower() for r in Reason) + ":", counts],
        summarize=NUM_REASONS)
    with tf.control_dependencies([check]):
      counts = tf.identity(counts)
    new_state = (ex["seq_read"], ex["seq_parsed"], counts,
                 tf.where(is_end, tf.constant(0, tf.int64),
                          valid_in_epoch + tf.cast(is_ok, tf.int64)),
                 epoch + tf.cast(is_end, tf.int64))
    out = {"image": ex["image"], "txt": ex["txt"], "skipped": counts,
           "is_epoch_end": is_end, "source_id": tf.constant(source_id, tf.int32),
           "keep": is_ok | is_end}  # dropped by the next filter; removed by `sum_over_sources`
    return new_state, out

  def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
    initial = (tf.constant(-1, tf.int64), tf.constant(-1, tf.int64),
               tf.constant(initial_counts, tf.int64), tf.constant(0, tf.int64),
               tf.constant(0, tf.int64))
    return dataset.scan(initial, graph(step)).filter(graph(lambda ex: ex["keep"]))

  return preprocess


def sum_over_sources(dataset: tf.data.Dataset, num_sources: int) -> tf.data.Dataset:
  """Replaces each example's "skipped" (its source's counts) by the totals over all sources, and
  removes the "keep" flag of `count_and_drop`."""

  def total_counts(state, ex):
    state = tf.tensor_scatter_nd_update(state, [[ex["source_id"]]], [ex["skipped"]])
    out = {k: v for k, v in ex.items() if k != "keep"}
    return state, dict(out, skipped=tf.reduce_sum(state, axis=0))

  return dataset.scan(tf.zeros([num_sources, NUM_REASONS], tf.int64), graph(total_counts))


def task_or_mixture_dataset(prefix: str, names: Sequence[str], rates: Sequence[float],
                            passthrough_features: Sequence[str], **get_dataset_kwargs):
  """The dataset of one registered seqio task, or of a Mixture of several at `rates` (registered
  afresh as `<prefix>_<suffixes>`), with the skip counts summed over the sources."""
  if len(names) == 1:
    ds = seqio.get_mixture_or_task(names[0]).get_dataset(**get_dataset_kwargs)
  else:
    mixture_name = prefix + "_" + "_".join(n.rsplit("_", 1)[-1] for n in names)
    if mixture_name in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.remove(mixture_name)
    seqio.MixtureRegistry.add_provider(mixture_name, seqio.Mixture(
        mixture_name, list(zip(names, rates))))
    ds = seqio.get_mixture_or_task(mixture_name).get_dataset(
        **get_dataset_kwargs, passthrough_features=list(passthrough_features))
  return sum_over_sources(ds, len(names))
