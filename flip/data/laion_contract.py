"""What every part of the LAION reader agrees on: img2dataset's columns and file formats, the
reason code every example carries through the pipeline, and the error raised for bad input.

Formats come from file extensions: `*.tfrecord` / `*.tfrecords` (img2dataset
`--output_format tfrecord`: tf.train.Example with `jpg`, `txt`, `key`, `width`, `height` and
extra columns) or `*.tar` (`--output_format webdataset`: members KEY.jpg, KEY.txt, KEY.json).

Bad records never stop training: an example keeps a `Reason` instead of being dropped where the
problem is found, and `flip.data.laion_preprocessors` counts the skips per reason.
"""

import enum
import os
import zlib
from typing import Any, Optional, Tuple

import tensorflow as tf

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


# Every function handed to tf.data by the reader is written with explicit tf.cond /
# tf.while_loop, so autograph's source conversion is skipped (it dominated the time to build a
# pipeline).
graph = tf.autograph.experimental.do_not_convert


class LaionDataError(ValueError):
  """A problem with `config.laion_path` or the files it names."""


def format_of(path: str) -> Optional[str]:
  """"tfrecord", "webdataset" or None (not a shard file) from the file's extension."""
  return FORMAT_BY_EXTENSION.get(os.path.splitext(path)[1].lower())


def stable_hash(*parts: Any) -> int:
  """A 31-bit hash that is the same in every process and Python run (unlike hash())."""
  return zlib.crc32("/".join(str(p) for p in parts).encode("utf-8")) & 0x7FFFFFFF
