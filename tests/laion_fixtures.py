"""Builders of small LAION-format shards for tests: img2dataset's tfrecord and webdataset layouts,
with the defects real crawls contain.

This module owns fabricated test data and, for every sample, what the input pipeline must do with
it (`Sample.expected_reason`: "ok" or the skip reason of `flip.data.laion_contract`). The
expectation is fixed when the defect is injected, independently of the pipeline's code.

Layouts (as img2dataset writes them):
* tfrecord: `00000.tfrecord`, `00001.tfrecord`, ... of tf.train.Example with `jpg` (bytes), `txt`
  (bytes), `key` (bytes), `width`/`height` (int64), `similarity` (float), `NSFW` (bytes), plus a
  `00000_stats.json` beside each shard (which readers must ignore).
* webdataset: `00000.tar`, ... with members `KEY.jpg`, `KEY.txt`, `KEY.json` in that order, written
  by Python's tarfile in PAX format with a fractional mtime, so every member is preceded by a PAX
  header as webdataset's TarWriter produces. Keys are shard number (5 digits) + index (4 digits).

Defects (`Sample.defect`): corrupt_jpeg, truncated_jpeg, zero_byte_image, empty_caption,
whitespace_caption, invalid_utf8, missing_image, missing_caption are skipped; huge_caption (100 kB),
png, grey and rgba images are valid. File-level damage: `truncate_last_sample` cuts a shard inside
its last sample, whose loss is then counted as `truncated_file`.
"""

import dataclasses
import io
import json
import os
import tarfile
import time
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

REASON_OK = "ok"
# Defect name -> the pipeline's skip reason (None: the sample stays valid).
DEFECT_REASONS: Mapping[str, Optional[str]] = {
    "corrupt_jpeg": "undecodable_image",
    "truncated_jpeg": "undecodable_image",
    "zero_byte_image": "undecodable_image",
    "empty_caption": "empty_caption",
    "whitespace_caption": "empty_caption",
    "invalid_utf8": "invalid_utf8",
    "missing_image": "missing_image",
    "missing_caption": "missing_caption",
    "huge_caption": None,
    "png": None,
    "grey": None,
    "rgba": None,
}
HUGE_CAPTION_BYTES = 100_000
NSFW_VALUES = ("UNLIKELY", "UNSURE", "NSFW")  # LAION-400M's metadata values
KEY_SHARD_DIGITS = 5
KEY_INDEX_DIGITS = 4
WORDS = ("dog", "cat", "shirt", "boot", "tree", "car", "house", "river", "flower", "bird", "chair",
         "lamp", "boat", "horse", "apple", "clock")


@dataclasses.dataclass
class Sample:
  """One image-text pair as it will be written, and what the pipeline must make of it."""
  key: str
  caption: str  # the intended caption; `caption_bytes` is what is written
  caption_bytes: Optional[bytes]  # None: the caption is missing
  image_bytes: Optional[bytes]  # None: the image is missing
  color: tuple  # the image's constant RGB colour, to recognise it after decoding
  similarity: float
  nsfw: str
  defect: str = ""
  shard: int = -1
  lost_to_truncation: bool = False

  @property
  def expected_reason(self) -> str:
    if self.lost_to_truncation:
      return "truncated_file"
    reason = DEFECT_REASONS.get(self.defect) if self.defect else None
    return reason or REASON_OK

  @property
  def metadata(self) -> Dict[str, object]:
    width, height = _image_size(self.image_bytes)
    return {"key": self.key, "caption": self.caption, "similarity": self.similarity,
            "NSFW": self.nsfw, "width": width, "height": height, "status": "success"}


def _image_size(image_bytes):
  try:
    with Image.open(io.BytesIO(image_bytes)) as image:
      return image.size
  except Exception:  # pylint: disable=broad-except
    return 0, 0


def sample_color(index: int, salt: int = 0) -> tuple:
  """A colour per sample, far enough apart to tell ~40 samples apart after JPEG + resize."""
  rng = np.random.default_rng(1000 * salt + index)
  return tuple(int(c) for c in rng.integers(0, 256, 3))


def encode_image(color, size=(24, 32), fmt="JPEG", mode="RGB") -> bytes:
  height, width = size
  if mode == "L":
    array = np.full((height, width), int(np.mean(color)), np.uint8)
  elif mode == "RGBA":
    array = np.concatenate([np.full((height, width, 3), color, np.uint8),
                            np.full((height, width, 1), 128, np.uint8)], axis=-1)
  else:
    array = np.full((height, width, 3), color, np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(array, mode).save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return buffer.getvalue()


def make_samples(num: int, defects: Optional[Mapping[int, str]] = None, salt: int = 0,
                 caption_prefix: str = "a photo") -> List[Sample]:
  """`num` samples with unique captions and colours; `defects` maps sample index -> defect."""
  defects = dict(defects or {})
  unknown = set(defects.values()) - set(DEFECT_REASONS)
  if unknown:
    raise ValueError(f"unknown defects {sorted(unknown)}; known: {sorted(DEFECT_REASONS)}")
  rng = np.random.default_rng(salt)
  samples = []
  for i in range(num):
    color = sample_color(i, salt)
    size = (int(rng.integers(12, 40)), int(rng.integers(12, 40)))  # odd sizes on purpose
    # Unique captions, recognisable from their first tokens.
    caption = f"{caption_prefix} {i} of a {WORDS[i % len(WORDS)]}"
    defect = defects.get(i, "")
    image = encode_image(color, size)
    caption_bytes = caption.encode("utf-8")
    if defect == "corrupt_jpeg":
      image = image[:20] + bytes(rng.integers(0, 256, len(image) - 20, dtype=np.uint8))
    elif defect == "truncated_jpeg":
      image = image[:len(image) // 2]
    elif defect == "zero_byte_image":
      image = b""
    elif defect == "missing_image":
      image = None
    elif defect == "png":
      image = encode_image(color, size, fmt="PNG")
    elif defect == "grey":
      image = encode_image(color, size, mode="L")
      color = (int(np.mean(color)),) * 3
    elif defect == "rgba":
      image = encode_image(color, size, fmt="PNG", mode="RGBA")
    elif defect == "empty_caption":
      caption_bytes = b""
    elif defect == "whitespace_caption":
      caption_bytes = b" \t\n  "
    elif defect == "invalid_utf8":
      caption_bytes = caption.encode("utf-8") + b" \xff\xfe broken"
    elif defect == "missing_caption":
      caption_bytes = None
    elif defect == "huge_caption":
      filler = (" " + caption) * (HUGE_CAPTION_BYTES // (len(caption) + 1) + 1)
      caption_bytes = (caption + filler).encode("utf-8")[:HUGE_CAPTION_BYTES]
    samples.append(Sample(key="", caption=caption, caption_bytes=caption_bytes, image_bytes=image,
                          color=color, similarity=float(np.round(rng.uniform(0.2, 0.4), 4)),
                          nsfw=NSFW_VALUES[int(rng.integers(0, 3))], defect=defect))
  return samples


def _assign_shards(samples: Sequence[Sample], num_shards: int) -> List[List[Sample]]:
  shards = [list(samples[s::num_shards]) for s in range(num_shards)]
  for shard_index, shard in enumerate(shards):
    for index, sample in enumerate(shard):
      sample.shard = shard_index
      sample.key = f"{shard_index:0{KEY_SHARD_DIGITS}d}{index:0{KEY_INDEX_DIGITS}d}"
  return shards


def tf_example(sample: Sample) -> bytes:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  meta = sample.metadata
  feature = {
      "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[sample.key.encode()])),
      "width": tf.train.Feature(int64_list=tf.train.Int64List(value=[meta["width"]])),
      "height": tf.train.Feature(int64_list=tf.train.Int64List(value=[meta["height"]])),
      "similarity": tf.train.Feature(float_list=tf.train.FloatList(value=[sample.similarity])),
      "NSFW": tf.train.Feature(bytes_list=tf.train.BytesList(value=[sample.nsfw.encode()])),
  }
  if sample.image_bytes is not None:
    feature["jpg"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[sample.image_bytes]))
  if sample.caption_bytes is not None:
    feature["txt"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[sample.caption_bytes]))
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _write_stats(directory: str, shard_index: int, count: int):
  with open(os.path.join(directory, f"{shard_index:05d}_stats.json"), "w") as f:
    json.dump({"count": count, "successes": count}, f)


def write_tfrecord_shards(directory: str, samples: Sequence[Sample], num_shards: int) -> List[str]:
  """Writes samples round-robin into `num_shards` img2dataset TFRecord shards; returns the paths."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  paths = []
  for shard_index, shard in enumerate(_assign_shards(samples, num_shards)):
    path = os.path.join(directory, f"{shard_index:05d}.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
      for sample in shard:
        writer.write(tf_example(sample))
    _write_stats(directory, shard_index, len(shard))
    paths.append(path)
  return paths


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  info.mtime = mtime  # fractional: tarfile then writes a PAX header, like webdataset's TarWriter
  info.mode = 0o444
  tar.addfile(info, io.BytesIO(data))


def write_webdataset_shards(directory: str, samples: Sequence[Sample], num_shards: int,
                            long_name_keys: bool = False) -> List[str]:
  """Writes samples round-robin into `num_shards` webdataset tars; returns the paths.

  `long_name_keys` puts members under a directory whose path exceeds the 100-byte ustar name
  field, so their names live in PAX `path` records only.
  """
  os.makedirs(directory, exist_ok=True)
  paths = []
  mtime = time.time() + 0.5
  for shard_index, shard in enumerate(_assign_shards(samples, num_shards)):
    path = os.path.join(directory, f"{shard_index:05d}.tar")
    prefix = ("d" * 120 + "/") if long_name_keys else ""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
      for sample in shard:
        if sample.image_bytes is not None:
          _add_member(tar, f"{prefix}{sample.key}.jpg", sample.image_bytes, mtime)
        if sample.caption_bytes is not None:
          _add_member(tar, f"{prefix}{sample.key}.txt", sample.caption_bytes, mtime)
        _add_member(tar, f"{prefix}{sample.key}.json",
                    json.dumps(sample.metadata).encode("utf-8"), mtime)
    _write_stats(directory, shard_index, len(shard))
    paths.append(path)
  return paths


def _tfrecord_last_record_offset(data: bytes) -> int:
  offset, last = 0, 0
  while offset < len(data):
    length = int.from_bytes(data[offset:offset + 8], "little")
    last = offset
    offset += 16 + length
  return last


def truncate_last_sample(path: str, samples: Sequence[Sample]) -> Sample:
  """Cuts the shard at `path` in the middle of its last sample (its record, or its first tar
  member's data); marks that sample lost and returns it."""
  with open(path, "rb") as f:
    data = f.read()
  shard_index = int(os.path.basename(path).split(".")[0])
  last = [s for s in samples if s.shard == shard_index][-1]
  if path.endswith(".tar"):
    with tarfile.open(path) as tar:
      member = [m for m in tar.getmembers() if m.name.split("/")[-1].startswith(last.key + ".")][0]
    cut = member.offset_data + max(1, member.size // 2)
  else:
    start = _tfrecord_last_record_offset(data)
    cut = start + 12 + (len(data) - start - 16) // 2
  with open(path, "wb") as f:
    f.write(data[:cut])
  last.lost_to_truncation = True
  return last


def expected_valid(samples: Sequence[Sample]) -> List[Sample]:
  return [s for s in samples if s.expected_reason == REASON_OK]


def expected_skips(samples: Sequence[Sample]) -> Dict[str, int]:
  """Skip counts by reason, one per sample, except one `truncated_file` per truncated shard."""
  counts: Dict[str, int] = {}
  for sample in samples:
    if sample.expected_reason != REASON_OK:
      counts[sample.expected_reason] = counts.get(sample.expected_reason, 0) + 1
  return counts
