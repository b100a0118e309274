"""M3AE training input: paired HDF5 files (`config.data.train`) optionally mixed with text-only
HDF5 files (`config.data.text_only`) through a seqio Mixture, as per-host batches.

    make_train_dataset(config, shard_index, num_shards, seed) -> tf.data.Dataset of
      {"image": uint8 [b, S, S, 3], "text": int32 [b, L], "paired": int32 [b],
       "skipped": {reason: int64 scalar}}

with b = config.batch_size // num_shards, L = flip.tasks.m3ae.text_length(config) and "skipped"
the cumulative counts since the start of training per reason (`flip.data.laion_contract`'s names,
the ones the loop logs for LAION), summed over the sources.

Each source is `flip.data.hdf5.record_dataset` (per-host row sharding, per-epoch permutation,
exact resume), then: validation (captions / texts that are empty or blank -> `empty_caption`, not
UTF-8 -> `invalid_utf8`), image decoding + `flip.data.transforms.train_transform` (corrupt bytes
raise and are dropped by `ignore_errors`; the gaps in the numbering are `undecodable_image`), BERT
uncased WordPiece without special tokens (`flip.data.text`; the vocabulary file is
`config.model.m3ae.vocab_file`, by default the package's BERT file), truncated to
`config.model.m3ae.text_max_len` (paired, M3AE's 64) or `unpaired_text_max_len` (text-only, 256)
and padded to L. A text-only example has a zero image and `paired` = 0. Each source is a seqio
Task; with a text-only source the two form a seqio Mixture with rates
(1 - `config.data.text_only_rate`, `config.data.text_only_rate`). Everything is deterministic and
checkpointable: `tf.train.Checkpoint(iterator=iter(ds))` restores the exact stream.
"""

import functools
from typing import Callable, List, Tuple

import ml_collections
import seqio
import tensorflow as tf

from flip.data import checkpointable
from flip.data import hdf5
from flip.data import laion_preprocessors
from flip.data import text as text_lib
from flip.data import transforms
from flip.data.laion_contract import graph
from flip.data.laion_contract import NUM_REASONS
from flip.data.laion_contract import Reason
from flip.data.laion_contract import SKIP_REASON_NAMES
from flip.data.laion_contract import SKIP_REASONS
from flip.data.laion_contract import stable_hash

SPLIT = "train"
PASSTHROUGH_FEATURES = ("skipped", "source_id")
MAX_CHARS_PER_TOKEN = laion_preprocessors.MAX_CAPTION_CHARS_PER_TOKEN


def text_length(config: ml_collections.ConfigDict) -> int:
  """Tokens per row: the paired length, or the text-only one when a text-only source is mixed."""
  settings = config.model.m3ae
  length = int(settings.text_max_len)
  if config.data.get("text_only"):
    length = max(length, int(settings.unpaired_text_max_len))
  return length


@functools.lru_cache(maxsize=None)
def _bert_vocabulary(path: str) -> text_lib.BertUncasedVocabulary:
  return text_lib.BertUncasedVocabulary(path or None, cls_token=False)


def vocabulary(config: ml_collections.ConfigDict) -> text_lib.BertUncasedVocabulary:
  """BERT uncased WordPiece on `config.model.m3ae.vocab_file` ("" = the package's BERT file),
  checked to fit the token table (`config.model.m3ae.vocab_size` rows)."""
  path = str(config.model.m3ae.get("vocab_file", "") or "")
  try:
    vocab = _bert_vocabulary(path)
  except (OSError, ValueError) as err:
    raise hdf5.Hdf5DataError(f"config.model.m3ae.vocab_file: {err}") from None
  if vocab.vocab_size > int(config.model.m3ae.vocab_size):
    raise hdf5.Hdf5DataError(
        f"config.model.m3ae.vocab_file {vocab} has {vocab.vocab_size} entries, more than "
        f"config.model.m3ae.vocab_size={config.model.m3ae.vocab_size}")
  return vocab


def vocab_entries(config: ml_collections.ConfigDict) -> List[str]:
  """The entries of `vocabulary(config)`'s file, indexed by token id."""
  path = str(config.model.m3ae.get("vocab_file", "") or "") or text_lib.bert_vocab_path()
  vocabulary(config)  # the same checks
  with tf.io.gfile.GFile(path, "r") as f:
    return [line.rstrip("\n") for line in f]


def _reason(caption: tf.Tensor) -> tf.Tensor:
  valid_utf8 = tf.equal(
      tf.strings.unicode_transcode(caption, "UTF-8", "UTF-8", errors="replace"), caption)
  blank = tf.strings.regex_full_match(caption, r"[\s\p{Z}]*")
  return tf.where(~valid_utf8, int(Reason.INVALID_UTF8),
                  tf.where(blank, int(Reason.EMPTY_CAPTION), int(Reason.OK)))


def _count_and_drop(source_id: int) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
  """Cumulative counts per reason (gaps in "seq" = undecodable images), then valid rows only."""
  one_hot = tf.eye(NUM_REASONS, dtype=tf.int64)
  skip_mask = tf.constant([1 if r in SKIP_REASONS else 0 for r in Reason], tf.int64)

  def step(state, ex):
    last_seq, counts = state
    gap = ex["seq"] - last_seq - 1
    counts = counts + gap * one_hot[Reason.UNDECODABLE_IMAGE] + one_hot[ex["reason"]] * skip_mask
    out = {"image": ex["image"], "text": ex["text"], "paired": ex["paired"], "skipped": counts,
           "source_id": tf.constant(source_id, tf.int32),
           "keep": tf.equal(ex["reason"], int(Reason.OK))}
    return (ex["seq"], counts), out

  def preprocess(dataset):
    initial = (tf.constant(-1, tf.int64), tf.zeros([NUM_REASONS], tf.int64))
    return dataset.scan(initial, graph(step)).filter(graph(lambda ex: ex["keep"]))

  return preprocess


def source_examples(config: ml_collections.ConfigDict, layout: str, source_id: int,
                    shard_index: int, num_shards: int, seed: int, num_epochs: int = 0,
                    shuffle: bool = True) -> tf.data.Dataset:
  """Validated, decoded, tokenized examples of one source (paired or text-only layout)."""
  key = "config.data.train" if layout == hdf5.PAIRED else "config.data.text_only"
  files = hdf5.list_files(config.data.train if layout == hdf5.PAIRED else config.data.text_only,
                          key)
  records, _ = hdf5.record_dataset(files, hdf5.LAYOUTS[layout], shard_index, num_shards, seed,
                                   shuffle=shuffle, num_epochs=num_epochs)
  settings = config.model.m3ae
  own_len = int(settings.text_max_len if layout == hdf5.PAIRED else
                settings.unpaired_text_max_len)
  length, size = text_length(config), int(config.image_size)
  vocab = vocabulary(config)
  augment_seed = stable_hash(seed, layout, shard_index, "aug")
  caption_key = "caption" if layout == hdf5.PAIRED else "text"

  def decode(seq, ex):
    caption = ex[caption_key]
    reason = _reason(caption)
    ok = tf.equal(reason, int(Reason.OK))
    blank = tf.zeros([size, size, transforms.RGB_CHANNELS], tf.uint8)
    if layout == hdf5.PAIRED:
      seed_pair = tf.stack([tf.constant(augment_seed, tf.int64), seq])
      image = tf.cond(ok, lambda: transforms.train_transform(ex["image"], seed_pair, config),
                      lambda: blank)
    else:
      image = blank
    caption = tf.strings.substr(tf.where(ok, caption, b""), 0, own_len * MAX_CHARS_PER_TOKEN,
                                unit="UTF8_CHAR")
    return {"image": image, "caption": caption, "reason": reason, "seq": seq,
            "paired": tf.constant(int(layout == hdf5.PAIRED), tf.int32)}

  def tokenize(ex):
    ex = dict(ex)
    tokens = text_lib.tokenize(vocab, ex.pop("caption"), own_len)[0]
    ex["text"] = tf.pad(tokens, [[0, length - own_len]])
    return ex

  ds = records.enumerate().map(graph(decode), num_parallel_calls=tf.data.AUTOTUNE,
                               deterministic=True).ignore_errors()
  ds = ds.map(graph(tokenize), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _count_and_drop(source_id)(ds)


def _register(config, shard_index: int, num_shards: int, seed: int, num_epochs: int,
              shuffle: bool) -> Tuple[List[str], List[float]]:
  layouts = [hdf5.PAIRED] + ([hdf5.TEXT] if config.data.get("text_only") else [])
  rate = float(config.data.get("text_only_rate", 0.0))
  if len(layouts) > 1 and not 0.0 < rate < 1.0:
    raise hdf5.Hdf5DataError(f"config.data.text_only_rate must be in (0, 1), got {rate}")
  vocab = vocabulary(config)
  output_features = {
      "image": seqio.ContinuousFeature(dtype=tf.uint8, rank=3),
      "text": seqio.Feature(vocabulary=vocab, add_eos=False, dtype=tf.int32, rank=1),
      "paired": seqio.ContinuousFeature(dtype=tf.int32, rank=0),
  }
  names = []
  for source_id, layout in enumerate(layouts):
    fingerprint = stable_hash(layout, config.to_json_best_effort(sort_keys=True), shard_index,
                              num_shards, seed, num_epochs, shuffle)
    name = f"flip_m3ae_{layout}_{fingerprint:08x}"

    def dataset_fn(split, shuffle_files, seed=None, layout=layout, source_id=source_id):
      del split, shuffle_files, seed
      return source_examples(config, layout, source_id, shard_index, num_shards,
                             stable_hash(config.seed_tf, layout), num_epochs, shuffle)

    if name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add_provider(name, seqio.Task(
        name, source=seqio.FunctionDataSource(dataset_fn, splits=[SPLIT]),
        output_features=output_features, preprocessors=[], shuffle_buffer_size=None))
    names.append(name)
  return names, ([1.0 - rate, rate] if len(layouts) > 1 else [1.0])


def make_example_dataset(config: ml_collections.ConfigDict, shard_index: int, num_shards: int,
                         seed: int, num_epochs: int = 0, shuffle: bool = True) -> tf.data.Dataset:
  """Per-example stream {"image", "text", "paired", "skipped": int64 [NUM_REASONS] totals};
  `shuffle=False` reads each host's rows in file order."""
  names, rates = _register(config, shard_index, num_shards, seed, num_epochs, shuffle)
  common = dict(sequence_length={"text": text_length(config)}, split=SPLIT, shuffle=False,
                seed=seed, num_epochs=1)
  ds = laion_preprocessors.task_or_mixture_dataset("flip_m3ae_mix", names, rates,
                                                   PASSTHROUGH_FEATURES, **common)
  return ds.with_options(checkpointable.options())


def make_train_dataset(config: ml_collections.ConfigDict, shard_index: int, num_shards: int,
                       seed: int, num_epochs: int = 0) -> tf.data.Dataset:
  """Per-host batches (module doc); repeats forever unless `num_epochs` is given."""
  if config.batch_size % num_shards:
    raise hdf5.Hdf5DataError(f"config.batch_size={config.batch_size} is not divisible by the "
                             f"{num_shards} input shards")
  ds = make_example_dataset(config, shard_index, num_shards, seed, num_epochs)
  ds = ds.map(graph(lambda ex: {k: ex[k] for k in ("image", "text", "paired", "skipped")}))
  ds = ds.batch(config.batch_size // num_shards, drop_remainder=True)

  def to_contract(batch):
    last = batch["skipped"][-1]
    return {"image": batch["image"], "text": batch["text"], "paired": batch["paired"],
            "skipped": {name: last[reason] for name, reason in zip(SKIP_REASON_NAMES,
                                                                   SKIP_REASONS)}}

  ds = ds.map(graph(to_contract)).prefetch(checkpointable.PREFETCH_BATCHES)
  return ds.with_options(checkpointable.options())
