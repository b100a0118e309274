"""HDF5 files in M3AE's layouts as checkpointable tf.data streams of raw records.

Layouts (`LAYOUTS`; one row per example, columns of equal length):
- paired: `jpg` (encoded image bytes) and `caption` (UTF-8 bytes);
- imagenet: `train_jpg` / `val_jpg` (encoded image bytes) and `train_labels` / `val_labels` (int);
- text: `text` (UTF-8 bytes).
Byte columns may be variable-length bytes or strings, fixed-length `S` strings, opaque (`V`)
values or variable-length uint8 arrays; every cell is returned as bytes.

Files are given as a comma-separated list of paths or glob patterns on any filesystem tf.io.gfile
reads (h5py opens non-local files through a tf.io.gfile file object). Rows of all files form one
global index. Per-host sharding: host `shard_index` of `num_shards` reads the global rows
`shard_index::num_shards`. Per epoch the host's rows are visited in a stateless random permutation
(`tf.random.experimental.index_shuffle`, seeded by (seed, shard, epoch)); epochs repeat forever
unless `num_epochs` is given. The dataset is a range of epochs, a range of row numbers and a
deterministic map that reads the rows (`tf.py_function` on h5py, a pure function of the row
numbers, READ_CHUNK_ROWS rows of an epoch per call, then unbatched): saving
`tf.train.Checkpoint(iterator=...)` stores the positions, and a restored iterator
continues with exactly the rows the uninterrupted one would have read.

`labelled_source` makes the ImageNet layout a labelled set of `flip.data.classification` (the data
set name `hdf5:<files>`, flip.data.dataset_spec) for the linear probe and fine-tuning.
"""

import os
import threading
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import tensorflow as tf

from flip.data import checkpointable

PAIRED = "paired"
IMAGENET = "imagenet"
TEXT = "text"
LAYOUTS = {
    PAIRED: {"image": "jpg", "caption": "caption"},
    TEXT: {"text": "text"},
}
IMAGENET_SPLITS = ("train", "val")
SEED_STRIDE = 1 << 20  # (seed, shard) -> one stateless seed word (shards < 2**20)
READ_CHUNK_ROWS = 64  # rows read per call into h5py (one Python call per row is the bottleneck)


class Hdf5DataError(ValueError):
  """An unusable HDF5 input (one line naming the key, file or column)."""


def imagenet_columns(split: str) -> Dict[str, str]:
  if split not in IMAGENET_SPLITS:
    raise Hdf5DataError(f"ImageNet HDF5 split must be one of {IMAGENET_SPLITS}, got {split!r}")
  return {"image": f"{split}_jpg", "label": f"{split}_labels"}


def list_files(spec: str, key: str) -> List[str]:
  """The files of a comma-separated list of paths / glob patterns (`key` names the config key)."""
  entries = [e.strip() for e in (spec or "").split(",") if e.strip()]
  if not entries:
    raise Hdf5DataError(f"{key} is empty: set it to HDF5 file(s) (comma-separated, globs)")
  files = []
  for entry in entries:
    matches = sorted(tf.io.gfile.glob(entry)) if any(c in entry for c in "*?[") else [entry]
    if not matches or not all(tf.io.gfile.exists(m) for m in matches):
      raise Hdf5DataError(f"{key}: no HDF5 file at {entry!r}")
    files.extend(matches)
  return files


_HANDLES: Dict[str, Any] = {}
_LOCK = threading.Lock()


def open_file(path: str):
  """A cached read-only h5py.File of `path` (local, or through tf.io.gfile)."""
  import h5py  # pylint: disable=g-import-not-at-top (optional until an HDF5 input is used)
  with _LOCK:
    if path not in _HANDLES:
      try:
        source = path if os.path.exists(path) else tf.io.gfile.GFile(path, "rb")
        _HANDLES[path] = h5py.File(source, "r")
      except (OSError, tf.errors.OpError) as err:
        raise Hdf5DataError(f"cannot open HDF5 file {path}: {err}") from None
    return _HANDLES[path]


def cell_bytes(value: Any) -> bytes:
  """One cell of a byte column as bytes (see the module doc for the accepted storages)."""
  if isinstance(value, bytes):
    return value
  if isinstance(value, str):
    return value.encode("utf-8")
  if isinstance(value, np.void):
    return value.tobytes()
  return np.asarray(value).tobytes()


def column_sizes(files: Sequence[str], columns: Sequence[str]) -> List[int]:
  """Rows per file, checking that each file has every column with one length."""
  sizes = []
  for path in files:
    handle = open_file(path)
    missing = [c for c in columns if c not in handle]
    if missing:
      raise Hdf5DataError(f"HDF5 file {path} has no column {missing[0]!r} (has: "
                          f"{', '.join(sorted(handle.keys()))})")
    lengths = {c: len(handle[c]) for c in columns}
    if len(set(lengths.values())) != 1:
      raise Hdf5DataError(f"HDF5 file {path}: columns of different lengths {lengths}")
    sizes.append(next(iter(lengths.values())))
  return sizes


def record_dataset(files: Sequence[str], columns: Dict[str, str], shard_index: int,
                   num_shards: int, seed: int, shuffle: bool = True,
                   num_epochs: int = 0) -> Tuple[tf.data.Dataset, int]:
  """({feature: bytes (int64 for `label`)} per row of this host, rows per epoch on this host)."""
  files = list(files)
  names = list(columns)
  sizes = column_sizes(files, [columns[n] for n in names])
  total = sum(sizes)
  local = len(range(shard_index, total, num_shards))
  if local == 0:
    raise Hdf5DataError(f"HDF5 input {files[0]}...: {total} rows for {num_shards} hosts leave "
                        f"host {shard_index} none")
  ends = tf.constant(np.cumsum(sizes), tf.int64)
  starts = tf.constant(np.cumsum([0] + sizes[:-1]), tf.int64)
  out_types = [tf.int64 if n == "label" else tf.string for n in names]

  def read(file_indices, rows):
    values = [[] for _ in names]
    for file_index, row in zip(file_indices.numpy(), rows.numpy()):
      handle = open_file(files[int(file_index)])
      for column, name in enumerate(names):
        cell = handle[columns[name]][int(row)]
        values[column].append(np.int64(cell) if name == "label" else cell_bytes(cell))
    return [np.asarray(v, np.int64 if name == "label" else object)
            for name, v in zip(names, values)]

  def rows_of_epoch(epoch):
    positions = tf.data.Dataset.range(local)
    if shuffle:
      key = tf.stack([tf.constant(seed * SEED_STRIDE + shard_index, tf.int64), epoch])
      positions = positions.map(lambda i: tf.random.experimental.index_shuffle(
          i, key, tf.constant(local - 1, tf.int64)))
    return positions.batch(READ_CHUNK_ROWS)

  def lookup(positions):
    global_rows = shard_index + num_shards * positions
    file_indices = tf.searchsorted(ends, global_rows, side="right")
    values = tf.py_function(read, [file_indices, global_rows - tf.gather(starts, file_indices)],
                            out_types)
    out = {}
    for name, value, dtype in zip(names, values, out_types):
      value.set_shape([None])
      out[name] = tf.cast(value, dtype)
    return out

  epochs = tf.data.Dataset.range(num_epochs or checkpointable.FOREVER)
  ds = epochs.flat_map(rows_of_epoch).map(lookup, num_parallel_calls=tf.data.AUTOTUNE,
                                          deterministic=True).unbatch()
  return ds.with_options(checkpointable.options()), local


def labelled_source(spec: str, split: str, max_images: int = 0, key: str = "config.data"):
  """An `eval_sources.ClassificationSource` of the ImageNet layout's `split` ("train" / "val") in
  the files of `spec` (comma-separated paths or globs): their first `max_images` rows (0 = all)
  in file order, host `i` of `n` reading the rows `i::n`. Labels are the `<split>_labels` integers;
  the classes are 0 .. the largest label, named by their numbers."""
  from flip.data import eval_sources  # pylint: disable=g-import-not-at-top
  columns = imagenet_columns(split)
  files = list_files(spec, key)
  sizes = column_sizes(files, list(columns.values()))
  total = sum(sizes)
  if total == 0:
    raise Hdf5DataError(f"{key}: the HDF5 files {spec!r} have no rows")
  num_examples = min(total, max_images) if max_images > 0 else total
  labels = np.concatenate([np.asarray(open_file(f)[columns["label"]][:]) for f in files])
  if labels.min() < 0:
    raise Hdf5DataError(f"{key}: HDF5 column {columns['label']!r} has a negative label")
  classnames = [str(i) for i in range(int(labels.max()) + 1)]

  def read(shard_index: int, num_shards: int) -> tf.data.Dataset:
    records, _ = record_dataset(files, columns, shard_index, num_shards, seed=0, shuffle=False,
                                num_epochs=1)
    return records.take(len(range(shard_index, num_examples, num_shards)))

  name = os.path.splitext(os.path.basename(files[0]))[0]
  return eval_sources.ClassificationSource(name=name, classnames=classnames, templates=[],
                                           num_examples=num_examples, read_encoded=read)
