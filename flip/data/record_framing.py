"""Framing: a file's bytes, read in fixed-size chunks by tf.data ops only, cut into TFRecord
records or webdataset samples (tar members grouped by key).

Every file is read in fixed-size chunks (`FixedLengthRecordDataset`, with the file size probed
once at start-up by the caller) and a `Dataset.scan` cuts TFRecord frames or tar members (ustar,
PAX `path` records, GNU long names) out of the chunks. So tars are streamed, never unpacked, and
every piece of reader state is a tensor that tf.data's iterator checkpoint saves. Chosen over
`TFRecordDataset` because a truncated or vanished file there either stops the pipeline or, under
`ignore_errors`, is skipped silently (or retried forever); here truncation is data: a damaged file
ends with one `Reason.TRUNCATED_FILE` marker. TFRecord CRCs are not verified; lengths are
bounds-checked, and a damaged record surfaces downstream as `bad_record` or `undecodable_image`.

webdataset members are grouped into samples by key as webdataset does (consecutive members sharing
the name up to the first dot); a sample whose member is cut by the end of a truncated tar is
dropped (the file's `truncated_file` marker counts it).

    tfrecord_records(path, size, chunk_bytes) -> {"record", "reason"} per record
    webdataset_samples(path, size, chunk_bytes) -> {SAMPLE_FIELDS..., "reason"} per sample
"""

from typing import Tuple

import tensorflow as tf

from flip.data.laion_contract import CAPTION_KEY
from flip.data.laion_contract import graph
from flip.data.laion_contract import IMAGE_KEYS
from flip.data.laion_contract import METADATA_EXTENSION
from flip.data.laion_contract import Reason

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


def file_chunks(path: tf.Tensor, size: tf.Tensor, chunk_bytes: int) -> tf.data.Dataset:
  """(chunk, is_eof, file_size) elements: the file's bytes in order, then one empty chunk with
  is_eof set."""
  chunk = tf.constant(chunk_bytes, tf.int64)
  full = size // chunk
  tail = size - full * chunk
  body = tf.data.FixedLengthRecordDataset(path, record_bytes=chunk, footer_bytes=tail)
  tail_ds = tf.data.FixedLengthRecordDataset(
      path, record_bytes=tf.maximum(tail, 1), header_bytes=full * chunk).take(tf.minimum(tail, 1))
  eof = tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(True), size))
  return body.concatenate(tail_ds).map(graph(lambda c: (c, tf.constant(False), size))
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


def tfrecord_records(path: tf.Tensor, size: tf.Tensor, chunk_bytes: int) -> tf.data.Dataset:
  """{"record", "reason"} per TFRecord record; one TRUNCATED_FILE marker if the file is damaged."""
  initial = (tf.constant(b""), tf.constant(0, tf.int64), tf.constant(False))
  return file_chunks(path, size, chunk_bytes).scan(
      initial, graph(lambda state, inputs: _tfrecord_step(state, inputs))).unbatch()


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
EMPTY_SAMPLE = (b"", b"", b"", b"", False, False)
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
                      for empty, value in zip(EMPTY_SAMPLE, last))
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
  marker = dict(zip(SAMPLE_FIELDS, EMPTY_SAMPLE), reason=int(Reason.TRUNCATED_FILE))
  out = {k: tf.concat([v, _marker_vector(truncated, marker[k], v.dtype)], 0)
         for k, v in samples.items()}
  new_state = (tf.where(broken, tf.constant(b""), rest), consumed + pos, broken,
               tf.where(broken, tf.constant(b""), carried_name), pending)
  return new_state, out


def webdataset_samples(path: tf.Tensor, size: tf.Tensor, chunk_bytes: int) -> tf.data.Dataset:
  """Samples {"key", "image", "caption", "json", "has_image", "has_caption", "reason"} of one
  webdataset tar, streamed; one TRUNCATED_FILE marker if the file is damaged."""
  initial = (tf.constant(b""), tf.constant(0, tf.int64), tf.constant(False), tf.constant(b""),
             tuple(tf.constant(v) for v in EMPTY_SAMPLE))
  return file_chunks(path, size, chunk_bytes).scan(
      initial, graph(lambda state, inputs: _tar_step(state, inputs))).unbatch()

