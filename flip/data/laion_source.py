"""One `config.laion_path` entry as a seqio DataSource: its files, per-host sharding, the
per-epoch shuffles, and the parsing + validation that gives every example its reason code.

Sources. Each entry of `config.laion_path` (a directory, a glob pattern or a file, on any
tf.io.gfile filesystem) is one source. Other files than shards (img2dataset's `_stats.json`,
parquet) are ignored. A file that cannot be opened is logged by name and skipped at start-up
(`unreadable_file`); file sizes are probed once then, for the chunked reader
(`flip.data.record_framing`).

Per epoch (seeds derived from (seed, source, epoch)): the host's files are shuffled, read by a
deterministic parallel interleave, encoded examples are shuffled in a buffer
(`config.shuffle_buffer_size`), then an epoch-end marker closes the epoch; epochs repeat forever
for training. Per-host sharding: with at least as many files as hosts each host reads the files
`sorted_files[shard_index::num_shards]`; otherwise every host reads all files in the same order
and keeps examples `shard_index::num_shards`. After the shuffle every example is parsed and
validated; the checks apply in this order: missing image, missing caption, empty image bytes,
invalid UTF-8, empty caption, the filter (`flip.data.laion_filters`). Example parsing can only fail
by raising, so it is followed by `ignore_errors`; the gaps it leaves in `seq_read` (numbered before
parsing) are counted as `bad_record` downstream.

Optional config keys (defaults in `PipelineOptions`): laion_filter, shuffle_buffer_size,
laion_cycle_length, laion_read_chunk_bytes.
"""

import concurrent.futures
import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import ml_collections
import seqio
import tensorflow as tf

from flip import paths
from flip.data import checkpointable
from flip.data import laion_filters
from flip.data import record_framing
from flip.data.laion_contract import CAPTION_KEY
from flip.data.laion_contract import FORMAT_TFRECORD
from flip.data.laion_contract import format_of
from flip.data.laion_contract import graph
from flip.data.laion_contract import IMAGE_KEYS
from flip.data.laion_contract import KEY_KEY
from flip.data.laion_contract import LaionDataError
from flip.data.laion_contract import Reason
from flip.data.laion_contract import stable_hash
from flip.data.laion_filters import Condition

AUTOTUNE = tf.data.AUTOTUNE
TRAIN_SPLIT = "train"
# Defaults of the optional config keys.
DEFAULT_SHUFFLE_BUFFER = checkpointable.DEFAULT_SHUFFLE_BUFFER
DEFAULT_CYCLE_LENGTH = 16  # files read in parallel per host
DEFAULT_READ_CHUNK_BYTES = 256 * 1024  # amortises tf.data's per-element cost over many records
PROBE_THREADS = 32  # parallel size probes at start-up (network filesystems)


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
  """Settings of one source's reader (from optional config keys)."""
  shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER
  cycle_length: int = DEFAULT_CYCLE_LENGTH
  read_chunk_bytes: int = DEFAULT_READ_CHUNK_BYTES
  filters: Tuple[Condition, ...] = ()
  num_epochs: Optional[int] = None  # None: repeat forever (training)
  shuffle: bool = True

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, **overrides) -> "PipelineOptions":
    options = cls(
        shuffle_buffer_size=int(config.get("shuffle_buffer_size", DEFAULT_SHUFFLE_BUFFER)),
        cycle_length=int(config.get("laion_cycle_length", DEFAULT_CYCLE_LENGTH)),
        read_chunk_bytes=int(config.get("laion_read_chunk_bytes", DEFAULT_READ_CHUNK_BYTES)),
        filters=laion_filters.parse_filter(config.get("laion_filter", "")))
    options = dataclasses.replace(options, **overrides)
    for name in ("shuffle_buffer_size", "cycle_length", "read_chunk_bytes"):
      if getattr(options, name) < 1:
        raise LaionDataError(f"{name} must be at least 1, got {getattr(options, name)}")
    return options


# --- files ----------------------------------------------------------------------------------------


def list_files(entry: str) -> Tuple[List[str], str]:
  """Sorted shard files of one laion_path entry and their format ("tfrecord" or "webdataset")."""
  if tf.io.gfile.isdir(entry):
    candidates = [paths.join(entry, name) for name in tf.io.gfile.listdir(entry)]
  else:
    candidates = tf.io.gfile.glob(entry)
  files = sorted({f for f in candidates if format_of(f)})
  if not files:
    raise LaionDataError(f"config.laion_path entry {entry!r}: no *.tfrecord or *.tar files found")
  formats = {format_of(f) for f in files}
  if len(formats) > 1:
    raise LaionDataError(f"config.laion_path entry {entry!r} mixes tfrecord and tar files; give "
                         "each format its own entry (comma-separated)")
  return files, formats.pop()


def _probe(path: str) -> Tuple[str, Optional[int], str]:
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      size = f.size()
      f.read(1)
    return path, int(size), ""
  except (tf.errors.OpError, OSError) as e:
    return path, None, str(e).splitlines()[0] if str(e) else type(e).__name__


def probe_files(paths: Sequence[str]) -> Tuple[List[Tuple[str, int]], List[str]]:
  """(readable (path, size) pairs, unreadable paths); logs every unreadable file by name."""
  if not paths:
    return [], []
  with concurrent.futures.ThreadPoolExecutor(min(PROBE_THREADS, len(paths))) as pool:
    results = list(pool.map(_probe, paths))
  readable, unreadable = [], []
  for path, size, error in results:
    if size is None:
      logging.warning("LAION shard cannot be opened, skipping it: %s (%s)", path, error)
      unreadable.append(path)
    else:
      readable.append((path, size))
  return readable, unreadable


# --- parsing and validation -----------------------------------------------------------------------


def _first_or_empty(values: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  present = tf.size(values) > 0
  return tf.concat([values, [b""]], 0)[0], present


def _validated(image: tf.Tensor, caption: tf.Tensor, has_image: tf.Tensor, has_caption: tf.Tensor,
               passes_filter: tf.Tensor, reason: tf.Tensor) -> tf.Tensor:
  """The first reason that applies, in a fixed order; `reason` if it is already set."""
  valid_utf8 = tf.equal(
      tf.strings.unicode_transcode(caption, "UTF-8", "UTF-8", errors="replace"), caption)
  blank = tf.strings.regex_full_match(caption, r"[\s\p{Z}]*")
  checks = [
      (~has_image, Reason.MISSING_IMAGE),
      (~has_caption, Reason.MISSING_CAPTION),
      (tf.equal(tf.strings.length(image), 0), Reason.UNDECODABLE_IMAGE),
      (~valid_utf8, Reason.INVALID_UTF8),
      (blank, Reason.EMPTY_CAPTION),
      (~passes_filter, Reason.FILTERED),
  ]
  result = tf.constant(int(Reason.OK))
  for failed, why in reversed(checks):
    result = tf.where(failed, int(why), result)
  return tf.where(tf.equal(reason, int(Reason.OK)), result, reason)


def _parse_tfrecord(record: tf.Tensor, reason: tf.Tensor, conditions: Sequence[Condition],
                    filter_specs: Dict[str, Any]) -> Dict[str, tf.Tensor]:
  """Parses one img2dataset Example (raises on a malformed proto: counted as bad_record)."""
  spec = {k: tf.io.VarLenFeature(tf.string) for k in IMAGE_KEYS + (CAPTION_KEY, KEY_KEY)}
  spec.update(filter_specs)

  def column_dtype(key):
    return laion_filters.column_dtype(key, conditions)

  def parse():
    features = tf.io.parse_single_example(record, spec)
    return {k: tf.cast(tf.sparse.to_dense(v), column_dtype(k)) if v.dtype != tf.string
            else tf.sparse.to_dense(v) for k, v in features.items()}

  def empty():  # markers carry no record
    return {k: tf.zeros([0], column_dtype(k)) for k in spec}

  features = tf.cond(tf.equal(reason, int(Reason.OK)), parse, empty)
  image, has_image = tf.constant(b""), tf.constant(False)
  for key in reversed(IMAGE_KEYS):  # the first present key wins
    value, present = _first_or_empty(features[key])
    image = tf.where(present, value, image)
    has_image = has_image | present
  caption, has_caption = _first_or_empty(features[CAPTION_KEY])
  key, _ = _first_or_empty(features[KEY_KEY])
  passes = laion_filters.tfrecord_passes(features, conditions)
  reason = _validated(image, caption, has_image, has_caption, passes, reason)
  return {"image": image, "caption": caption, "key": key, "reason": reason}


def _parse_webdataset(sample: Dict[str, tf.Tensor],
                      conditions: Sequence[Condition]) -> Dict[str, tf.Tensor]:
  passes = laion_filters.webdataset_passes(sample["json"], conditions)
  reason = _validated(sample["image"], sample["caption"], sample["has_image"],
                      sample["has_caption"], passes, sample["reason"])
  return {"image": sample["image"], "caption": sample["caption"], "key": sample["key"],
          "reason": reason}


# --- the seqio source -----------------------------------------------------------------------------


class LaionDataSource(seqio.DataSource):
  """One laion_path entry as a seqio DataSource with per-host file sharding and epoch shuffling.

  `get_dataset` yields encoded, validated examples {"image": bytes, "caption": bytes, "key",
  "reason": int32, "seq_read": int64} in a deterministic order, including invalid ones
  (reason != OK) and one EPOCH_END marker per epoch. `seq_read` numbers the stream before Example
  parsing, so that records dropped by a raising parse can be counted downstream from the gaps.
  """

  def __init__(self, entry: str, options: PipelineOptions, name: str = ""):
    super().__init__(splits=[TRAIN_SPLIT], num_input_examples=None, caching_permitted=False,
                     performs_internal_shuffling=True)
    self.entry = entry
    self.name = name or entry
    self.options = options
    self.files, self.format = list_files(entry)
    self._filter_specs: Optional[Dict[str, Any]] = None
    # Per shard layout: (readable (path, size) pairs, number of unreadable files).
    self._probed: Dict[Tuple[int, int], Tuple[List[Tuple[str, int]], int]] = {}

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True  # file-level sharding, or example-level when there are fewer files than shards

  def list_shards(self, split: str) -> Sequence[str]:
    return list(self.files)

  def shard_files(self, shard_index: int, num_shards: int) -> Tuple[List[str], bool]:
    """(files this shard reads, whether examples are sharded as well)."""
    if not 0 <= shard_index < num_shards:
      raise LaionDataError(f"shard_index {shard_index} is not in [0, {num_shards})")
    if len(self.files) >= num_shards:
      return self.files[shard_index::num_shards], False
    return list(self.files), num_shards > 1

  def probed_files(self, shard_index: int, num_shards: int) -> Tuple[List[Tuple[str, int]], int]:
    """Readable (path, size) pairs of a shard and its number of unreadable files (cached)."""
    layout = (shard_index, num_shards)
    if layout not in self._probed:
      files, examples_sharded = self.shard_files(shard_index, num_shards)
      readable, unreadable = probe_files(files)
      if not readable:
        raise LaionDataError(f"LAION source {self.entry!r}: none of the {len(files)} files of "
                             f"shard {shard_index}/{num_shards} can be opened")
      # With example-level sharding every host reads all files: count unreadable ones once.
      num_unreadable = len(unreadable) if (not examples_sharded or shard_index == 0) else 0
      self._probed[layout] = (readable, num_unreadable)
    return self._probed[layout]

  def _marker(self) -> Dict[str, tf.Tensor]:
    """An element of this format's raw structure with reason EPOCH_END."""
    if self.format == FORMAT_TFRECORD:
      return {"record": tf.constant(b""), "reason": tf.constant(int(Reason.EPOCH_END))}
    marker = {k: tf.constant(v)
              for k, v in zip(record_framing.SAMPLE_FIELDS, record_framing.EMPTY_SAMPLE)}
    return dict(marker, reason=tf.constant(int(Reason.EPOCH_END)))

  def _read_file(self, path: tf.Tensor, size: tf.Tensor) -> tf.data.Dataset:
    chunk = self.options.read_chunk_bytes
    if self.format == FORMAT_TFRECORD:
      return record_framing.tfrecord_records(path, size, chunk)
    return record_framing.webdataset_samples(path, size, chunk)

  def get_dataset(self, split: str = TRAIN_SPLIT, shuffle: bool = True,
                  seed: Optional[int] = None, shard_info: Optional[seqio.ShardInfo] = None,
                  *, sequence_length=None, use_cached=False, num_epochs=1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # epochs are self.options.num_epochs
    if split != TRAIN_SPLIT:
      raise LaionDataError(f"LAION source {self.entry!r} has only the {TRAIN_SPLIT!r} split")
    shard_index, num_shards = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
    readable, _ = self.probed_files(shard_index, num_shards)
    _, examples_sharded = self.shard_files(shard_index, num_shards)
    shuffle = shuffle and self.options.shuffle
    source_seed = stable_hash(seed or 0, self.name)
    shuffle_seed = stable_hash(seed or 0, self.name, shard_index)
    paths = tf.constant([p for p, _ in readable])
    sizes = tf.constant([s for _, s in readable], tf.int64)
    cycle_length = min(self.options.cycle_length, len(readable))
    options = self.options

    def one_epoch(epoch):
      order = tf.range(tf.size(paths))
      if shuffle:
        order = tf.random.experimental.stateless_shuffle(
            order, seed=tf.stack([tf.constant(source_seed, tf.int64), epoch]))
      files = tf.data.Dataset.from_tensor_slices((tf.gather(paths, order), tf.gather(sizes, order)))
      ds = files.interleave(graph(self._read_file), cycle_length=cycle_length, block_length=1,
                            num_parallel_calls=AUTOTUNE, deterministic=True)
      if examples_sharded:
        ds = ds.shard(num_shards, shard_index)
      if shuffle:
        epoch_seed = tf.random.stateless_uniform(
            [], seed=tf.stack([tf.constant(shuffle_seed, tf.int64), epoch]), minval=None,
            maxval=None, dtype=tf.int64)
        ds = ds.shuffle(options.shuffle_buffer_size, seed=epoch_seed)
      return ds.concatenate(tf.data.Dataset.from_tensors(self._marker()))

    epochs = tf.data.Dataset.range(
        options.num_epochs if options.num_epochs is not None else checkpointable.FOREVER)
    ds = epochs.flat_map(graph(one_epoch))
    parse = self._parse_fn(readable[0][0])
    return ds.enumerate().map(graph(parse), num_parallel_calls=AUTOTUNE,
                              deterministic=True).ignore_errors()

  def _parse_fn(self, first_file: str):
    conditions = self.options.filters
    if self.format == FORMAT_TFRECORD:
      if self._filter_specs is None:
        self._filter_specs = laion_filters.tfrecord_filter_specs(conditions, first_file)
      specs = self._filter_specs
      return lambda i, ex: dict(_parse_tfrecord(ex["record"], ex["reason"], conditions, specs),
                                seq_read=i)
    return lambda i, ex: dict(_parse_webdataset(ex, conditions), seq_read=i)
