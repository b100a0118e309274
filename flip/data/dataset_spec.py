"""The one grammar of data-set names, shared by every evaluation and classification source
(`config.eval_dataset`, `config.data.train`, `config.data.eval`):

- "demo:<dir>": the Fashion-MNIST demo set written by `flip.data.demo`;
- "folder:<dir>", or an existing directory: an image folder, one sub-folder per class;
- "hdf5:<files>": HDF5 files in M3AE's ImageNet layout (`train_jpg` / `train_labels`,
  `val_jpg` / `val_labels`; `flip.data.hdf5`), comma-separated paths or globs;
- anything else: a tfds name, e.g. "imagenet2012:5.*.*", read from `TFDS_DATA_DIR`.

This module only says which kind of data set a string names; what each kind holds for a given use
(splits, class names, templates) is the business of its reader (`flip.data.eval_sources`,
`flip.data.classification`).
"""

import dataclasses

import tensorflow as tf

TFDS = "tfds"
FOLDER = "folder"
DEMO = "demo"
HDF5 = "hdf5"
FOLDER_PREFIX = "folder:"
DEMO_PREFIX = "demo:"
HDF5_PREFIX = "hdf5:"


class DatasetError(ValueError):
  """A data set that cannot be used, in one line naming the config key, data set or file."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A parsed data-set name: `path` for FOLDER, DEMO and HDF5 (its file list), `tfds_name` for
  TFDS."""
  kind: str
  path: str = ""
  tfds_name: str = ""  # name[:version], as tfds.builder takes it

  @property
  def name(self) -> str:
    """The tfds name without its version (TFDS only)."""
    return self.tfds_name.split(":")[0]


def parse(spec: str, key: str) -> DatasetSpec:
  """The data set named by `spec`, the value of the config key `key` (named in every error)."""
  if not spec:
    raise DatasetError(f"{key} is empty: name a tfds data set, an image folder, demo:<dir> or "
                       "hdf5:<files>")
  for prefix, kind in ((DEMO_PREFIX, DEMO), (FOLDER_PREFIX, FOLDER), (HDF5_PREFIX, HDF5)):
    if spec.startswith(prefix):
      path = spec[len(prefix):]
      if not path.strip(" ,"):
        what = "HDF5 file" if kind == HDF5 else "directory"
        raise DatasetError(f"{key}={spec!r} names no {what} after {prefix!r}")
      return DatasetSpec(kind, path=path)
  if tf.io.gfile.isdir(spec):
    return DatasetSpec(FOLDER, path=spec)
  return DatasetSpec(TFDS, tfds_name=spec)
