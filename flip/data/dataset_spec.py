"""The one grammar of data-set names, shared by every evaluation and classification source
(`config.eval_dataset`, `config.data.train`, `config.data.eval`):

- "demo:<dir>": the Fashion-MNIST demo set written by `flip.data.demo`;
- "folder:<dir>", or an existing directory: an image folder, one sub-folder per class;
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
FOLDER_PREFIX = "folder:"
DEMO_PREFIX = "demo:"


class DatasetError(ValueError):
  """A data set that cannot be used, in one line naming the config key, data set or file."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A parsed data-set name: `path` for FOLDER and DEMO, `tfds_name` for TFDS."""
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
    raise DatasetError(f"{key} is empty: name a tfds data set, an image folder or demo:<dir>")
  for prefix, kind in ((DEMO_PREFIX, DEMO), (FOLDER_PREFIX, FOLDER)):
    if spec.startswith(prefix):
      path = spec[len(prefix):]
      if not path:
        raise DatasetError(f"{key}={spec!r} names no directory after {prefix!r}")
      return DatasetSpec(kind, path=path)
  if tf.io.gfile.isdir(spec):
    return DatasetSpec(FOLDER, path=spec)
  return DatasetSpec(TFDS, tfds_name=spec)
