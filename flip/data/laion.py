"""LAION training input: img2dataset shards as seqio Tasks/Mixtures, per-host sharding, skip counts,
exact resume.

This module owns the training input pipeline from `config.laion_path` to per-host batches:

    make_train_dataset(config, shard_index, num_shards, seed) -> tf.data.Dataset of
      {"image": uint8 [b, S, S, 3], "txt": int32 [b, max_len], "skipped": {reason: int64 scalar}}

with b = config.batch_size // num_shards and "skipped" the cumulative counts since the start of
training (they are part of the iterator state, so they survive a restore).

Sources. `config.laion_path` is a comma-separated list; each entry (a directory, a glob pattern or
a file, on any tf.io.gfile filesystem) is one source, registered as one seqio Task. Several sources
form a seqio Mixture with rates `config.laion_rates` (comma-separated, one per source) or, by
default, rates proportional to their numbers of files (img2dataset shards hold equally many
samples, so the mixture then behaves like the union). The format comes from the file extensions:
`*.tfrecord` (img2dataset `--output_format tfrecord`: tf.train.Example with `jpg`, `txt`, `key`,
`width`, `height` and extra columns) or `*.tar` (`--output_format webdataset`: members KEY.jpg,
KEY.txt, KEY.json). Other files (img2dataset's `_stats.json`, parquet) are ignored.

Reading. Both formats are parsed from the byte stream by tf.data ops only, no Python generators:
every file is read in fixed-size chunks (`FixedLengthRecordDataset`, with file sizes probed once
at start-up) and a `Dataset.scan` cuts TFRecord frames or tar members (ustar, PAX `path` records,
GNU long names) out of the chunks. So tars are streamed, never unpacked, and every piece of
reader state is a tensor that tf.data's iterator checkpoint saves. Chosen over `TFRecordDataset`
because a truncated or vanished file there either stops the pipeline or, under `ignore_errors`,
is skipped silently (or retried forever); here truncation is data (`truncated_file`), and a file
that cannot be opened is logged by name and skipped at start-up (`unreadable_file`). TFRecord CRCs
are not verified; lengths are bounds-checked, and a damaged record surfaces as `bad_record` or
`undecodable_image`.

Per epoch (seeds derived from (seed, source, epoch)): the host's files are shuffled, read by a
deterministic parallel interleave, encoded examples are shuffled in a buffer
(`config.shuffle_buffer_size`), then an epoch-end marker closes the epoch; epochs repeat forever
for training. Per-host sharding: with at least as many files as hosts each host reads the files
`sorted_files[shard_index::num_shards]`; otherwise every host reads all files in the same order
and keeps examples `shard_index::num_shards`. After the shuffle: parse and validate (checks in
this order: missing image, missing caption, empty image bytes, invalid UTF-8, empty caption, the
filter), decode + random crop + flip + resize (flip.data.transforms), all in parallel
deterministic maps, then tokenize (flip.data.text) TOKENIZE_BATCH captions per call; host-side
uint8. webdataset members are grouped into samples by key as webdataset does (consecutive members
sharing the name up to the first dot); a sample whose member is cut by the end of a truncated tar
is dropped with the file's `truncated_file` count.

Bad records never stop training. Every example carries a reason code instead of being dropped
where the problem is found; ops that can only fail by raising (Example parsing, image decoding)
are followed by `ignore_errors`, and the gaps they leave in sequence numbers assigned before them
are counted. A `Dataset.scan` accumulates the counts per reason and then drops the invalid
examples. An epoch without a single valid example on a host raises an error naming the source
and shard instead of spinning forever (e.g. fewer examples than hosts).

Checkpointing. The result is deterministic and contains only checkpointable datasets; saving
`tf.train.Checkpoint(iterator=iter(ds))` stores the read positions, scan states, shuffle and
prefetch buffers, so a restored iterator yields exactly the batches of the uninterrupted one. The
checkpoint grows with `shuffle_buffer_size` times the mean encoded example size, plus the decoded
batches waiting in prefetch buffers.

Optional config keys (defaults in `PipelineOptions`): laion_rates, laion_filter (e.g.
"similarity>=0.28,NSFW!=NSFW": comma-separated conditions on extra columns, `==` `!=` for strings,
`<` `<=` `>` `>=` `==` `!=` for numbers; an example without the column fails the condition and is
counted as `filtered`), shuffle_buffer_size, laion_cycle_length, laion_read_chunk_bytes.
"""

import concurrent.futures
import dataclasses
import enum
import os
import re
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from absl import logging
import ml_collections
import seqio
import tensorflow as tf

from flip.data import text
from flip.data import transforms

try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices; nothing to hide any more.
  pass

AUTOTUNE = tf.data.AUTOTUNE
TRAIN_SPLIT = "train"
FORMAT_TFRECORD = "tfrecord"
FORMAT_WEBDATASET = "webdataset"
FORMAT_BY_EXTENSION = {".tfrecord": FORMAT_TFRECORD, ".tfrecords": FORMAT_TFRECORD,
                       ".tar": FORMAT_WEBDATASET}

# img2dataset's columns / webdataset member extensions. The image column is named after
# img2dataset's --encode_format; the first one present is used.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEY = "txt"
KEY_KEY = "key"
METADATA_EXTENSION = "json"

# TFRecord framing: uint64 length, uint32 masked CRC of the length, data, uint32 masked CRC of the
# data (tensorflow/core/lib/io/record_writer.h).
TFRECORD_LENGTH_BYTES = 8
TFRECORD_HEADER_BYTES = 12
TFRECORD_FRAMING_BYTES = 16
# A record length above this is taken as corruption rather than buffered (LAION records are ~10 kB
# to a few MB).
MAX_RECORD_BYTES = 1 << 28

# ustar layout (POSIX.1-1988 / pax): 512-byte blocks; field offsets and widths within a header.
TAR_BLOCK = 512
TAR_NAME = (0, 100)
TAR_SIZE = (124, 12)
TAR_CHECKSUM = (148, 8)
TAR_TYPEFLAG = 156
TAR_MAGIC = (257, 5)
TAR_PREFIX = (345, 155)
TAR_CHECKSUM_BLANKS = 8 * ord(" ")  # the checksum is computed with its own field as spaces
TAR_REGULAR_TYPES = (0, ord("0"), ord("7"))  # NUL (old tar), regular file, contiguous file
TAR_PAX_TYPE = ord("x")
TAR_GNU_LONGNAME_TYPE = ord("L")

# Defaults of the optional config keys.
DEFAULT_SHUFFLE_BUFFER = 10_000  # encoded examples per host (checkpoint size: x mean record size)
DEFAULT_CYCLE_LENGTH = 16  # files read in parallel per host
DEFAULT_READ_CHUNK_BYTES = 256 * 1024  # amortises tf.data's per-element cost over many records
# Host batches made ahead of the train step. A fixed small number rather than AUTOTUNE: prefetched
# batches are part of every saved iterator state (~batch x S x S x 3 bytes each).
PREFETCH_BATCHES = 2
FOREVER_EPOCHS = 2**62  # "repeat forever" as a finite range (checkpointable like any range)
PROBE_THREADS = 32  # parallel size probes at start-up (network filesystems)
# Captions tokenized per call: amortises tensorflow-text's per-call cost (1.5x the examples/s of
# tokenizing one caption at a time on the demo set).
TOKENIZE_BATCH = 64
# Only the first characters of a caption are tokenized: max_len tokens of BERT WordPiece need far
# fewer, and 100 kB captions exist in LAION.
MAX_CAPTION_CHARS_PER_TOKEN = 64


class Reason(enum.IntEnum):
  """Why an example is skipped. OK and EPOCH_END are not skips."""
  OK = 0
  MISSING_IMAGE = 1  # no image column / member
  MISSING_CAPTION = 2  # no txt column / member
  EMPTY_CAPTION = 3  # empty or whitespace-only
  INVALID_UTF8 = 4
  UNDECODABLE_IMAGE = 5  # empty, corrupt, truncated or unsupported image bytes
  BAD_RECORD = 6  # a TFRecord record that is not a tf.train.Example
  TRUNCATED_FILE = 7  # a file ending inside a record / member, or with corrupt framing
  UNREADABLE_FILE = 8  # a file that could not be opened at start-up
  FILTERED = 9  # rejected by config.laion_filter
  EPOCH_END = 10  # marker closing an epoch


NUM_REASONS = len(Reason)
SKIP_REASONS: Tuple[Reason, ...] = tuple(r for r in Reason if r not in (Reason.OK,
                                                                         Reason.EPOCH_END))
SKIP_REASON_NAMES: Tuple[str, ...] = tuple(r.name.lower() for r in SKIP_REASONS)


# Every function handed to tf.data here is written with explicit tf.cond / tf.while_loop, so
# autograph's source conversion is skipped (it dominated the time to build a pipeline).
_graph = tf.autograph.experimental.do_not_convert


class LaionDataError(ValueError):
  """A problem with `config.laion_path` or the files it names."""


# --- configuration --------------------------------------------------------------------------------

FILTER_PATTERN = re.compile(r"^\s*([A-Za-z_][\w\-]*)\s*(==|!=|>=|<=|>|<)\s*(.*?)\s*$")
STRING_FILTER_OPS = ("==", "!=")


@dataclasses.dataclass(frozen=True)
class Condition:
  """One `column op value` test on an extra column."""
  column: str
  op: str
  value: Union[float, str]

  @property
  def numeric(self) -> bool:
    return isinstance(self.value, float)


def parse_filter(spec: str) -> Tuple[Condition, ...]:
  """Parses "similarity>=0.28,NSFW!=NSFW" into conditions (all must hold)."""
  conditions = []
  for part in filter(None, (p.strip() for p in (spec or "").split(","))):
    match = FILTER_PATTERN.match(part)
    if not match:
      raise LaionDataError(f"config.laion_filter: cannot parse condition {part!r} "
                           "(expected e.g. 'similarity>=0.28' or 'NSFW!=NSFW')")
    column, op, raw = match.groups()
    raw = raw.strip("'\"")
    try:
      value: Union[float, str] = float(raw)
    except ValueError:
      if op not in STRING_FILTER_OPS:
        raise LaionDataError(f"config.laion_filter: {part!r} compares the string {raw!r} with "
                             f"{op}; strings support only == and !=") from None
      value = raw
    conditions.append(Condition(column, op, value))
  return tuple(conditions)


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
        filters=parse_filter(config.get("laion_filter", "")))
    options = dataclasses.replace(options, **overrides)
    for name in ("shuffle_buffer_size", "cycle_length", "read_chunk_bytes"):
      if getattr(options, name) < 1:
        raise LaionDataError(f"{name} must be at least 1, got {getattr(options, name)}")
    return options


# --- files ----------------------------------------------------------------------------------------


def split_sources(laion_path: str) -> List[str]:
  """The comma-separated entries of config.laion_path (each one source)."""
  entries = [e.strip() for e in (laion_path or "").split(",") if e.strip()]
  if not entries:
    raise LaionDataError("config.laion_path is empty: set it to an img2dataset output directory, "
                         "a glob pattern or a comma-separated list of them")
  return entries


def _format_of(path: str) -> Optional[str]:
  return FORMAT_BY_EXTENSION.get(os.path.splitext(path)[1].lower())


def list_files(entry: str) -> Tuple[List[str], str]:
  """Sorted shard files of one laion_path entry and their format ("tfrecord" or "webdataset")."""
  if tf.io.gfile.isdir(entry):
    candidates = [os.path.join(entry, name) for name in tf.io.gfile.listdir(entry)]
  else:
    candidates = tf.io.gfile.glob(entry)
  files = sorted({f for f in candidates if _format_of(f)})
  if not files:
    raise LaionDataError(f"config.laion_path entry {entry!r}: no *.tfrecord or *.tar files found")
  formats = {_format_of(f) for f in files}
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


def _stable_hash(*parts: Any) -> int:
  """A 31-bit hash that is the same in every process and Python run (unlike hash())."""
  return zlib.crc32("/".join(str(p) for p in parts).encode("utf-8")) & 0x7FFFFFFF


# --- framing: chunks of bytes -> TFRecord records / tar members -----------------------------------


def _file_chunks(path: tf.Tensor, size: tf.Tensor, chunk_bytes: int) -> tf.data.Dataset:
  """(chunk, is_eof, file_size) elements: the file's bytes in order, then one empty chunk with
  is_eof set."""
  chunk = tf.constant(chunk_bytes, tf.int64)
  full = size // chunk
  tail = size - full * chunk
  body = tf.data.FixedLengthRecordDataset(path, record_bytes=chunk, footer_bytes=tail)
  tail_ds = tf.data.FixedLengthRecordDataset(
      path, record_bytes=tf.maximum(tail, 1), header_bytes=full * chunk).take(tf.minimum(tail, 1))
  eof = tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(True), size))
  return body.concatenate(tail_ds).map(_graph(lambda c: (c, tf.constant(False), size))
                                       ).concatenate(eof)


def _strlen(s: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.strings.length(s), tf.int64)


def _int_array() -> tf.TensorArray:
  return tf.TensorArray(tf.int64, size=0, dynamic_size=True, element_shape=[])


def _marker_vector(is_marker: tf.Tensor, value, dtype) -> tf.Tensor:
  """[1] tensor holding `value` when is_marker, else [0]."""
  return tf.boolean_mask(tf.constant([value], dtype), tf.reshape(is_marker, [1]))


_SCALAR_STRING = tf.TensorSpec([], tf.string)
_SCALAR_INT64 = tf.TensorSpec([], tf.int64)
_SCALAR_BOOL = tf.TensorSpec([], tf.bool)
_CHUNK_SPEC = (_SCALAR_STRING, _SCALAR_BOOL, _SCALAR_INT64)  # chunk, is_eof, file size


# The per-chunk parsers are traced once per process (fixed signatures) instead of once per
# pipeline; the per-iteration loops only walk length fields, since their per-iteration cost is
# what limits a reader's throughput, and everything else is vectorised over a chunk's records.
@tf.function(autograph=False, input_signature=[
    (_SCALAR_STRING, _SCALAR_INT64, _SCALAR_BOOL), _CHUNK_SPEC])
def _tfrecord_step(state, inputs):
  """Cuts the complete TFRecord records out of (carried bytes + chunk).

  State: (carried bytes, file offset of their start, file broken). Output: {"record", "reason"}
  vectors; a TRUNCATED_FILE marker when the file turns out to be cut or corrupt.
  """
  buf, consumed, dead = state
  chunk, is_eof, size = inputs
  buf = tf.where(dead, tf.constant(b""), tf.strings.join([buf, chunk]))
  n = _strlen(buf)

  def cond(pos, stop, broken, starts, lengths, count):
    del starts, lengths, count
    return ~stop & ~broken & (n - pos >= TFRECORD_HEADER_BYTES)

  def body(pos, stop, broken, starts, lengths, count):
    del stop, broken
    length = tf.io.decode_raw(tf.strings.substr(buf, pos, TFRECORD_LENGTH_BYTES), tf.int64,
                              little_endian=True)[0]
    frame = length + TFRECORD_FRAMING_BYTES
    corrupt = (length < 0) | (length > MAX_RECORD_BYTES) | (consumed + pos + frame > size)
    take = ~corrupt & (n - pos >= frame)
    return (tf.where(take, pos + frame, pos), ~take, corrupt,
            starts.write(count, pos + TFRECORD_HEADER_BYTES), lengths.write(count, length),
            count + tf.cast(take, tf.int32))

  pos, _, broken, starts, lengths, count = tf.while_loop(
      cond, body, (tf.constant(0, tf.int64), tf.constant(False), dead, _int_array(),
                   _int_array(), tf.constant(0)))
  records = tf.strings.substr(buf, starts.stack()[:count], lengths.stack()[:count])
  rest = tf.strings.substr(buf, pos, n - pos)
  truncated = (broken & ~dead) | (is_eof & ~broken & (_strlen(rest) > 0))
  out = {
      "record": tf.concat([records, _marker_vector(truncated, b"", tf.string)], 0),
      "reason": tf.concat([tf.fill([count], int(Reason.OK)),
                           _marker_vector(truncated, int(Reason.TRUNCATED_FILE), tf.int32)], 0),
  }
  return (tf.where(broken, tf.constant(b""), rest), consumed + pos, broken), out


def _tfrecord_records(path: tf.Tensor, size: tf.Tensor, chunk_bytes: int) -> tf.data.Dataset:
  """{"record", "reason"} per TFRecord record; one TRUNCATED_FILE marker if the file is damaged."""
  initial = (tf.constant(b""), tf.constant(0, tf.int64), tf.constant(False))
  return _file_chunks(path, size, chunk_bytes).scan(
      initial, _graph(lambda state, inputs: _tfrecord_step(state, inputs))).unbatch()


def _octal(fields: tf.Tensor) -> tf.Tensor:
  """Values of NUL/space-terminated octal tar fields, int64 bytes [..., k] -> [...]; -1 if none."""
  is_digit = (fields >= ord("0")) & (fields <= ord("7"))
  started = tf.cumsum(tf.cast(is_digit, tf.int32), axis=-1) > 0
  ended = tf.cumsum(tf.cast(started & ~is_digit, tf.int32), axis=-1) > 0
  used = is_digit & started & ~ended
  num_used = tf.reduce_sum(tf.cast(used, tf.int64), axis=-1, keepdims=True)
  exponent = num_used - tf.cumsum(tf.cast(used, tf.int64), axis=-1)
  powers = tf.bitwise.left_shift(tf.ones_like(exponent), 3 * tf.maximum(exponent, 0))
  value = tf.reduce_sum(tf.where(used, (fields - ord("0")) * powers, 0), axis=-1)
  return tf.where(num_used[..., 0] > 0, value, -1)


def _c_string(s: tf.Tensor) -> tf.Tensor:
  """The bytes before the first NUL."""
  return tf.strings.regex_replace(s, r"(?s)\x00.*", "")


PAX_PATH_PATTERN = r"(?s)\A(?:.*\n)?[0-9]+ path=([^\n]*)\n.*\z"
# webdataset: key = directories + basename up to its first dot; extension = the rest.
MEMBER_NAME_PATTERN = r"^((?:.*/)?[^./]+)\.([^/]*)$"


def _pax_paths(contents: tf.Tensor) -> tf.Tensor:
  """The `path` records of PAX extended headers ("LEN path=VALUE\\n"), "" where there is none."""
  found = tf.strings.regex_full_match(contents, PAX_PATH_PATTERN)
  return tf.where(found, tf.strings.regex_replace(contents, PAX_PATH_PATTERN, r"\1"), b"")


def _split_member_names(names: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """(keys, lower-case extensions) of member names, as webdataset splits them."""
  matches = tf.strings.regex_full_match(names, MEMBER_NAME_PATTERN)
  keys = tf.where(matches, tf.strings.regex_replace(names, MEMBER_NAME_PATTERN, r"\1"), names)
  extensions = tf.where(matches, tf.strings.regex_replace(names, MEMBER_NAME_PATTERN, r"\2"), b"")
  return keys, tf.strings.lower(extensions)


# The size field of ustar headers as written by Python's tarfile, GNU and BSD tar: 11 zero-padded
# octal digits (then NUL or space). Sizes of 8 GiB and more (base-256) count as corrupt headers.
TAR_SIZE_DIGITS = 11
TAR_SIZE_POWERS = tuple(8 ** (TAR_SIZE_DIGITS - 1 - i) for i in range(TAR_SIZE_DIGITS))
# A webdataset sample in the making: key, image, caption, json, has_image, has_caption.
_SAMPLE_SPEC = (_SCALAR_STRING,) * 4 + (_SCALAR_BOOL,) * 2
_EMPTY_SAMPLE = (b"", b"", b"", b"", False, False)
SAMPLE_FIELDS = ("key", "image", "caption", "json", "has_image", "has_caption")


def _tar_headers(buf: tf.Tensor, consumed: tf.Tensor, size: tf.Tensor, dead: tf.Tensor):
  """Walks the tar headers of `buf`: (header offsets, data lengths, stop offset, broken, cut).

  Stops at the first incomplete member (the rest waits for the next chunk), a header whose size
  field is not octal (broken), or a member reaching past the end of the file (broken and cut).
  """
  n = _strlen(buf)
  size_start = TAR_SIZE[0]
  powers = tf.constant(TAR_SIZE_POWERS, tf.int64)

  def cond(pos, stop, broken, cut, starts, lengths, count):
    del cut, starts, lengths, count
    return ~stop & ~broken & (n - pos >= TAR_BLOCK)

  def body(pos, stop, broken, cut, starts, lengths, count):
    del stop, broken, cut
    octets = tf.io.decode_raw(tf.strings.substr(buf, pos, TAR_BLOCK), tf.uint8)
    is_end_block = tf.equal(octets[0], 0)  # end-of-archive blocks (no member has an empty name)
    digits = tf.cast(octets[size_start:size_start + TAR_SIZE_DIGITS], tf.int64) - ord("0")
    corrupt = ~is_end_block & ~tf.reduce_all((digits >= 0) & (digits <= 7))
    data_len = tf.reduce_sum(digits * powers)
    frame = TAR_BLOCK + (data_len + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK
    truncated = ~is_end_block & ~corrupt & (consumed + pos + frame > size)
    member = ~is_end_block & ~corrupt & ~truncated & (n - pos >= frame)
    advance = tf.where(is_end_block, tf.constant(TAR_BLOCK, tf.int64), tf.where(member, frame, 0))
    return (pos + advance, ~is_end_block & ~member, corrupt | truncated, truncated,
            starts.write(count, pos), lengths.write(count, data_len),
            count + tf.cast(member, tf.int32))

  pos, _, broken, cut, starts, lengths, count = tf.while_loop(
      cond, body, (tf.constant(0, tf.int64), tf.constant(False), dead, tf.constant(False),
                   _int_array(), _int_array(), tf.constant(0)))
  return starts.stack()[:count], lengths.stack()[:count], pos, broken, cut


def _group_samples(names, datas, pending, flush, drop_key):
  """Groups consecutive members with the same key into samples, continuing `pending`.

  Returns (completed samples as a tuple of vectors in SAMPLE_FIELDS order, new pending sample).
  All groups are completed when `flush`, except that a last group with key `drop_key` (whose
  member was cut) is dropped; otherwise the last group stays pending.
  """
  keys, extensions = _split_member_names(names)
  num_members = tf.size(keys, out_type=tf.int64)
  previous_keys = tf.concat([tf.reshape(pending[0], [1]), keys], 0)[:num_members]
  group = tf.cumsum(tf.cast(tf.not_equal(keys, previous_keys), tf.int64))  # 0: the pending one
  num_groups = tf.reduce_max(tf.concat([[0], group], 0)) + 1
  member_index = tf.range(num_members)

  def first_member(mask):
    first = tf.math.unsorted_segment_min(tf.where(mask, member_index, num_members), group,
                                         num_groups)
    return tf.minimum(first, num_members)  # num_members: none (empty segments give max int64)

  padded_datas = tf.concat([datas, [b""]], 0)
  group_keys = tf.gather(tf.concat([keys, [b""]], 0), first_member(tf.ones_like(keys, tf.bool)))
  is_pending_group = tf.equal(tf.range(num_groups), 0)
  group_keys = tf.where(is_pending_group, pending[0], group_keys)
  fields = [group_keys]
  has = {}
  for name, mask, pending_value, pending_has in (
      ("image", tf.reduce_any(tf.equal(extensions[:, None], tf.constant(IMAGE_KEYS)[None]), -1),
       pending[1], pending[4]),
      ("caption", tf.equal(extensions, CAPTION_KEY), pending[2], pending[5]),
      ("json", tf.equal(extensions, METADATA_EXTENSION), pending[3],
       tf.strings.length(pending[3]) > 0)):
    index = first_member(mask)
    found = index < num_members
    inherit = is_pending_group & ~found
    fields.append(tf.where(inherit, pending_value, tf.gather(padded_datas, index)))
    has[name] = found | (inherit & pending_has)
  fields += [has["image"], has["caption"]]
  is_last = tf.equal(tf.range(num_groups), num_groups - 1)
  emit = ((~is_last | flush) & (tf.strings.length(group_keys) > 0)
          & ~(is_last & tf.equal(group_keys, drop_key)))
  samples = tuple(tf.boolean_mask(f, emit) for f in fields)
  last = tuple(f[-1] for f in fields)
  new_pending = tuple(tf.where(flush, tf.constant(empty), value)
                      for empty, value in zip(_EMPTY_SAMPLE, last))
  return samples, new_pending


@tf.function(autograph=False, input_signature=[
    (_SCALAR_STRING, _SCALAR_INT64, _SCALAR_BOOL, _SCALAR_STRING, _SAMPLE_SPEC), _CHUNK_SPEC])
def _tar_step(state, inputs):
  """Cuts the complete members out of (carried bytes + chunk) and groups them into samples.

  State: (carried bytes, their file offset, file broken, name from a trailing PAX / GNU long-name
  header, the sample whose members are still arriving). Output: sample vectors (SAMPLE_FIELDS and
  "reason"); a TRUNCATED_FILE marker when the file is cut or corrupt, in which case the sample
  whose member was cut is dropped (a cut elsewhere leaves the pending sample complete).
  """
  buf, consumed, dead, carried_name, pending = state
  chunk, is_eof, size = inputs
  buf = tf.where(dead, tf.constant(b""), tf.strings.join([buf, chunk]))
  n = _strlen(buf)
  starts, lengths, pos, broken, cut = _tar_headers(buf, consumed, size, dead)
  count = tf.size(starts)
  headers = tf.strings.substr(buf, starts, tf.fill([count], tf.constant(TAR_BLOCK, tf.int64)))
  octets = tf.reshape(tf.cast(tf.io.decode_raw(headers, tf.uint8), tf.int64), [-1, TAR_BLOCK])
  chk_start, chk_len = TAR_CHECKSUM
  checksum = (tf.reduce_sum(octets, -1) + TAR_CHECKSUM_BLANKS
              - tf.reduce_sum(octets[:, chk_start:chk_start + chk_len], -1))
  valid = tf.equal(_octal(octets[:, chk_start:chk_start + chk_len]), checksum)
  # Headers after the first one with a bad checksum cannot be trusted.
  num_valid = tf.reduce_sum(tf.math.cumprod(tf.cast(valid, tf.int32)))
  bad_checksum = num_valid < count
  starts, lengths, headers, octets = (starts[:num_valid], lengths[:num_valid],
                                      headers[:num_valid], octets[:num_valid])
  datas = tf.strings.substr(buf, starts + TAR_BLOCK, lengths)
  typeflags = octets[:, TAR_TYPEFLAG]
  names = _c_string(tf.strings.substr(headers, *TAR_NAME))
  prefixes = _c_string(tf.strings.substr(headers, *TAR_PREFIX))
  use_prefix = (tf.equal(tf.strings.substr(headers, *TAR_MAGIC), b"ustar")
                & (tf.strings.length(prefixes) > 0))
  names = tf.where(use_prefix, tf.strings.join([prefixes, names], separator="/"), names)
  is_pax = tf.equal(typeflags, TAR_PAX_TYPE)
  is_longname = tf.equal(typeflags, TAR_GNU_LONGNAME_TYPE)
  # A PAX or GNU long-name header names the member that follows it.
  overrides = tf.where(is_pax, _pax_paths(tf.where(is_pax, datas, b"")),
                       _c_string(tf.where(is_longname, datas, b"")))
  previous_override = tf.concat([tf.reshape(carried_name, [1]), overrides], 0)[:num_valid]
  names = tf.where(tf.strings.length(previous_override) > 0, previous_override, names)
  last_is_override = tf.reduce_any(is_pax[-1:] | is_longname[-1:])
  last_override = tf.concat([tf.reshape(carried_name, [1]), overrides], 0)[-1]
  carried_name = tf.where(num_valid > 0,
                          tf.where(last_is_override, last_override, tf.constant(b"")),
                          carried_name)
  is_regular = tf.reduce_any(
      tf.equal(typeflags[:, None], tf.constant(TAR_REGULAR_TYPES, tf.int64)[None, :]), -1)
  names, datas = tf.boolean_mask(names, is_regular), tf.boolean_mask(datas, is_regular)

  broken = broken | bad_checksum
  rest = tf.strings.substr(buf, pos, n - pos)
  rest_is_padding = tf.strings.regex_full_match(rest, r"(?s)\x00*")
  truncated = (broken & ~dead) | (is_eof & ~broken & ~rest_is_padding)
  # The member cut by the end of the file is named when its header arrived whole.
  cut_name = tf.where(tf.strings.length(carried_name) > 0, carried_name,
                      _c_string(tf.strings.substr(buf, tf.minimum(pos, n), TAR_NAME[1])))
  cut_key = _split_member_names(tf.reshape(cut_name, [1]))[0][0]
  drop_key = tf.where(cut & ~bad_checksum, cut_key, tf.constant(b""))
  samples, pending = _group_samples(names, datas, pending, flush=is_eof | truncated,
                                    drop_key=drop_key)
  samples = dict(zip(SAMPLE_FIELDS, samples))
  samples["reason"] = tf.fill(tf.shape(samples["key"]), int(Reason.OK))
  marker = dict(zip(SAMPLE_FIELDS, _EMPTY_SAMPLE), reason=int(Reason.TRUNCATED_FILE))
  out = {k: tf.concat([v, _marker_vector(truncated, marker[k], v.dtype)], 0)
         for k, v in samples.items()}
  new_state = (tf.where(broken, tf.constant(b""), rest), consumed + pos, broken,
               tf.where(broken, tf.constant(b""), carried_name), pending)
  return new_state, out


def _webdataset_samples(path: tf.Tensor, size: tf.Tensor, chunk_bytes: int) -> tf.data.Dataset:
  """Samples {"key", "image", "caption", "json", "has_image", "has_caption", "reason"} of one
  webdataset tar, streamed; one TRUNCATED_FILE marker if the file is damaged."""
  initial = (tf.constant(b""), tf.constant(0, tf.int64), tf.constant(False), tf.constant(b""),
             tuple(tf.constant(v) for v in _EMPTY_SAMPLE))
  return _file_chunks(path, size, chunk_bytes).scan(
      initial, _graph(lambda state, inputs: _tar_step(state, inputs))).unbatch()


# --- parsing and validation -----------------------------------------------------------------------


def _first_or_empty(values: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  present = tf.size(values) > 0
  return tf.concat([values, [b""]], 0)[0], present


def _condition_holds(condition: Condition, value: tf.Tensor, present: tf.Tensor) -> tf.Tensor:
  ops = {"==": tf.equal, "!=": tf.not_equal, ">=": tf.greater_equal, "<=": tf.less_equal,
         ">": tf.greater, "<": tf.less}
  target = (tf.constant(condition.value, tf.float64) if condition.numeric
            else tf.constant(condition.value.encode("utf-8")))
  return present & ops[condition.op](value, target)


def _json_column(json_text: tf.Tensor, condition: Condition) -> Tuple[tf.Tensor, tf.Tensor]:
  """(value, present) of a column in webdataset's KEY.json, by pattern (flat img2dataset JSON)."""
  column = re.escape(condition.column)
  if condition.numeric:
    pattern = rf'(?s).*"{column}"\s*:\s*(-?[0-9][0-9.eE+\-]*).*'
    present = tf.strings.regex_full_match(json_text, pattern)
    raw = tf.where(present, tf.strings.regex_replace(json_text, pattern, r"\1"), b"0")
    return tf.strings.to_number(raw, tf.float64), present
  pattern = rf'(?s).*"{column}"\s*:\s*"([^"\\]*)".*'
  present = tf.strings.regex_full_match(json_text, pattern)
  return tf.where(present, tf.strings.regex_replace(json_text, pattern, r"\1"), b""), present


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


def _tfrecord_filter_specs(conditions: Sequence[Condition],
                           first_file: str) -> Dict[str, tf.io.VarLenFeature]:
  """Feature specs for the filter columns, typed from the first record (float or int64 columns)."""
  if not conditions:
    return {}
  example = None
  try:
    for raw in tf.data.TFRecordDataset(first_file).take(1):
      example = tf.train.Example.FromString(raw.numpy())
  except (tf.errors.OpError, ValueError) as e:  # a damaged first record: numbers default to float
    logging.warning("cannot read the first record of %s to type the filter columns: %s",
                    first_file, e)
  specs = {}
  for condition in conditions:
    kind = None
    if example is not None and condition.column in example.features.feature:
      kind = example.features.feature[condition.column].WhichOneof("kind")
    if condition.numeric:
      dtype = tf.int64 if kind == "int64_list" else tf.float32
    else:
      dtype = tf.string
    specs[condition.column] = tf.io.VarLenFeature(dtype)
  return specs


def _parse_tfrecord(record: tf.Tensor, reason: tf.Tensor, conditions: Sequence[Condition],
                    filter_specs: Dict[str, Any]) -> Dict[str, tf.Tensor]:
  """Parses one img2dataset Example (raises on a malformed proto: counted as bad_record)."""
  spec = {k: tf.io.VarLenFeature(tf.string) for k in IMAGE_KEYS + (CAPTION_KEY, KEY_KEY)}
  spec.update(filter_specs)

  def column_dtype(key):
    return tf.float64 if _numeric_column(key, conditions) else tf.string

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
  passes = tf.constant(True)
  for condition in conditions:
    values = features[condition.column]
    present = tf.size(values) > 0
    value = tf.concat([values, tf.zeros([1], values.dtype)], 0)[0]
    passes &= _condition_holds(condition, value, present)
  reason = _validated(image, caption, has_image, has_caption, passes, reason)
  return {"image": image, "caption": caption, "key": key, "reason": reason}


def _numeric_column(column: str, conditions: Sequence[Condition]) -> bool:
  return any(c.column == column and c.numeric for c in conditions)


def _parse_webdataset(sample: Dict[str, tf.Tensor],
                      conditions: Sequence[Condition]) -> Dict[str, tf.Tensor]:
  passes = tf.constant(True)
  for condition in conditions:
    value, present = _json_column(sample["json"], condition)
    passes &= _condition_holds(condition, value, present)
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
    marker = {k: tf.constant(v) for k, v in zip(SAMPLE_FIELDS, _EMPTY_SAMPLE)}
    return dict(marker, reason=tf.constant(int(Reason.EPOCH_END)))

  def _read_file(self, path: tf.Tensor, size: tf.Tensor) -> tf.data.Dataset:
    chunk = self.options.read_chunk_bytes
    if self.format == FORMAT_TFRECORD:
      return _tfrecord_records(path, size, chunk)
    return _webdataset_samples(path, size, chunk)

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
    source_seed = _stable_hash(seed or 0, self.name)
    shuffle_seed = _stable_hash(seed or 0, self.name, shard_index)
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
      ds = files.interleave(_graph(self._read_file), cycle_length=cycle_length, block_length=1,
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
        options.num_epochs if options.num_epochs is not None else FOREVER_EPOCHS)
    ds = epochs.flat_map(_graph(one_epoch))
    parse = self._parse_fn(readable[0][0])
    return ds.enumerate().map(_graph(parse), num_parallel_calls=AUTOTUNE,
                              deterministic=True).ignore_errors()

  def _parse_fn(self, first_file: str):
    conditions = self.options.filters
    if self.format == FORMAT_TFRECORD:
      if self._filter_specs is None:
        self._filter_specs = _tfrecord_filter_specs(conditions, first_file)
      specs = self._filter_specs
      return lambda i, ex: dict(_parse_tfrecord(ex["record"], ex["reason"], conditions, specs),
                                seq_read=i)
    return lambda i, ex: dict(_parse_webdataset(ex, conditions), seq_read=i)


# --- seqio Task preprocessors: decode + augment + tokenize, count + drop --------------------------


def _decode_and_tokenize(config: ml_collections.ConfigDict, vocab: seqio.Vocabulary,
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
    dataset = dataset.enumerate().map(_graph(decode), num_parallel_calls=AUTOTUNE,
                                      deterministic=True).ignore_errors()
    return dataset.batch(TOKENIZE_BATCH).map(_graph(tokenize), num_parallel_calls=AUTOTUNE,
                                             deterministic=True).unbatch()

  return preprocess


def _count_and_drop(source_id: int, source_name: str, shard_index: int, num_shards: int,
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
           "keep": is_ok | is_end}  # dropped by the next filter; removed by `make_example_dataset`
    return new_state, out

  def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
    initial = (tf.constant(-1, tf.int64), tf.constant(-1, tf.int64),
               tf.constant(initial_counts, tf.int64), tf.constant(0, tf.int64),
               tf.constant(0, tf.int64))
    return dataset.scan(initial, _graph(step)).filter(_graph(lambda ex: ex["keep"]))

  return preprocess


# --- tasks, mixture, the training dataset ---------------------------------------------------------

PASSTHROUGH_FEATURES = ("skipped", "is_epoch_end", "source_id")


def _task_name(entry: str, config: ml_collections.ConfigDict, shard_index: int, num_shards: int,
               seed: int) -> str:
  fingerprint = _stable_hash(entry, config.to_json_best_effort(sort_keys=True), shard_index,
                             num_shards, seed)
  return f"flip_laion_{fingerprint:08x}"


def _parse_rates(config: ml_collections.ConfigDict, sources: Sequence[LaionDataSource]
                 ) -> List[float]:
  spec = str(config.get("laion_rates", "") or "")
  if not spec:
    return [float(len(s.files)) for s in sources]
  try:
    rates = [float(r) for r in spec.split(",")]
  except ValueError:
    raise LaionDataError(f"config.laion_rates={spec!r} is not a comma-separated list of numbers"
                         ) from None
  if len(rates) != len(sources) or any(r < 0 for r in rates) or sum(rates) <= 0:
    raise LaionDataError(f"config.laion_rates={spec!r}: need {len(sources)} non-negative rates "
                         "(one per config.laion_path entry), not all zero")
  return rates


def register_tasks(config: ml_collections.ConfigDict, shard_index: int = 0, num_shards: int = 1,
                   seed: int = 0, **option_overrides) -> Tuple[List[str], List[float]]:
  """Registers one seqio Task per config.laion_path entry; returns (task names, mixing rates).

  Tasks are registered for one host layout (their preprocessors count skips for it). Re-registering
  the same config replaces the previous Tasks.
  """
  options = PipelineOptions.from_config(config, **option_overrides)
  vocab = text.get_vocabulary(config.aug.txt)
  output_features = {
      "image": seqio.ContinuousFeature(dtype=tf.uint8, rank=3),
      "txt": seqio.Feature(vocabulary=vocab, add_eos=False, dtype=tf.int32, rank=1),
  }
  entries = split_sources(config.laion_path)
  names, sources = [], []
  for source_id, entry in enumerate(entries):
    name = _task_name(entry, config, shard_index, num_shards, seed)
    source = LaionDataSource(entry, options, name=f"{source_id}:{entry}")
    _, unreadable = source.probed_files(shard_index, num_shards)
    preprocessors = [
        _decode_and_tokenize(config, vocab, _stable_hash(seed, source.name, shard_index, "aug")),
        _count_and_drop(source_id, entry, shard_index, num_shards, unreadable),
    ]
    if name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add_provider(name, seqio.Task(
        name, source=source, output_features=output_features, preprocessors=preprocessors,
        shuffle_buffer_size=None))
    names.append(name)
    sources.append(source)
  return names, _parse_rates(config, sources)


def make_example_dataset(config: ml_collections.ConfigDict, shard_index: int, num_shards: int,
                         seed: int, num_epochs: Optional[int] = None,
                         shuffle: bool = True) -> tf.data.Dataset:
  """Per-example stream before batching: {"image", "txt", "skipped": int64 [NUM_REASONS] totals
  over all sources, "is_epoch_end" (markers closing each source's epochs; their counts are the
  totals at that point), "source_id"}."""
  names, rates = register_tasks(config, shard_index, num_shards, seed, num_epochs=num_epochs,
                                shuffle=shuffle)
  sequence_length = {"txt": int(config.aug.txt.max_len)}
  shard_info = seqio.ShardInfo(index=shard_index, num_shards=num_shards)
  common = dict(sequence_length=sequence_length, split=TRAIN_SPLIT, shuffle=shuffle, seed=seed,
                shard_info=shard_info, num_epochs=1)
  if len(names) == 1:
    ds = seqio.get_mixture_or_task(names[0]).get_dataset(**common)
  else:
    mixture_name = "flip_laion_mix_" + "_".join(n.rsplit("_", 1)[-1] for n in names)
    if mixture_name in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.remove(mixture_name)
    seqio.MixtureRegistry.add_provider(mixture_name, seqio.Mixture(
        mixture_name, list(zip(names, rates))))
    ds = seqio.get_mixture_or_task(mixture_name).get_dataset(
        **common, passthrough_features=list(PASSTHROUGH_FEATURES))

  num_sources = len(names)

  def total_counts(state, ex):
    state = tf.tensor_scatter_nd_update(state, [[ex["source_id"]]], [ex["skipped"]])
    out = {k: v for k, v in ex.items() if k != "keep"}
    return state, dict(out, skipped=tf.reduce_sum(state, axis=0))

  ds = ds.scan(tf.zeros([num_sources, NUM_REASONS], tf.int64), _graph(total_counts))
  return ds.with_options(_checkpointable_options())


def _checkpointable_options() -> tf.data.Options:
  """Deterministic order; iterator saving that accepts the per-epoch shuffle's seed generator.

  `Dataset.shuffle` built inside a function (our per-epoch `flat_map`) carries a dummy seed
  generator resource that tf.data's save refuses as "external state" under the default policy.
  Its seeds are explicit and the shuffle's buffer and RNG position are part of the saved iterator
  state, so nothing outside the checkpoint is needed to resume; the resume tests prove it.
  """
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  return options


def make_train_dataset(config: ml_collections.ConfigDict, shard_index: int, num_shards: int,
                       seed: int, num_epochs: Optional[int] = None) -> tf.data.Dataset:
  """Per-host training batches {"image": uint8 [b,S,S,3], "txt": int32 [b,L], "skipped": {...}}.

  b = config.batch_size // num_shards (drop_remainder); `shard_index`, `num_shards` come from the
  partitioner's data layout. Repeats forever unless `num_epochs` is given.
  """
  if config.batch_size % num_shards:
    raise LaionDataError(f"config.batch_size={config.batch_size} is not divisible by the "
                         f"{num_shards} input shards")
  batch_size = config.batch_size // num_shards
  ds = make_example_dataset(config, shard_index, num_shards, seed, num_epochs=num_epochs)
  ds = ds.filter(_graph(lambda ex: ~ex["is_epoch_end"]))
  ds = ds.map(_graph(lambda ex: {"image": ex["image"], "txt": ex["txt"],
                              "skipped": ex["skipped"]}))
  ds = ds.batch(batch_size, drop_remainder=True)

  def to_contract(batch):
    last = batch["skipped"][-1]
    return {"image": batch["image"], "txt": batch["txt"],
            "skipped": {name: last[reason] for name, reason in zip(SKIP_REASON_NAMES,
                                                                   SKIP_REASONS)}}

  ds = ds.map(_graph(to_contract)).prefetch(PREFETCH_BATCHES)
  return ds.with_options(_checkpointable_options())
