"""Labelled image sets for the MAE family: training input (MAE pretraining, linear probe,
fine-tuning) and the held-out split their classification hook evaluates.

A data set is named by one string (`config.data.train`, `config.data.eval`):
- a tfds name, e.g. "imagenet2012:5.*.*", read from `TFDS_DATA_DIR` (or tfds' default directory);
  training reads the "train" split, evaluation the first of "validation", "test";
- "folder:<dir>" or an existing directory: one sub-folder per class (labels follow the sorted
  sub-folder names, which are also the class names), images inside (the extensions
  `flip.data.eval_sources` reads); the ImageNet train/val folder layout works as it is;
- "hdf5:<files>": HDF5 files in M3AE's ImageNet layout (comma-separated paths or globs, any
  filesystem tf.io.gfile reads): training reads `train_jpg` / `train_labels`, evaluation
  `val_jpg` / `val_labels` (`flip.data.hdf5.labelled_source`);
- "demo:<dir>": the Fashion-MNIST demo set of `flip.data.demo` (TFRecords whose `jpg` and `label`
  columns are read; the captions are ignored). `<dir>` is the split folder itself or the demo root,
  in which case training reads `<dir>/train` and evaluation `<dir>/test`.

The names are parsed by `flip.data.dataset_spec` and the sets read by the readers of
`flip.data.eval_sources`: every source is an `eval_sources.ClassificationSource` (name, class
names, number of examples, and a reader of encoded examples per shard), so evaluation reuses its
decode + resize + centre-crop (`flip.data.transforms.eval_transform`).

Training input (`make_train_dataset`): per host, the files (or examples, when there are fewer files
than hosts) of its shard, shuffled per pass with seeded buffers (`config.data.shuffle_buffer_size`
encoded examples), repeated forever, each example decoded with FLIP's random-resized crop and flip
(`flip.data.transforms.train_transform`, `config.aug.area_range` / `aspect_ratio_range` / `flip`),
then RandAugment when `config.aug.randaug.num_layers > 0` (`flip.augment`), batched to
`config.batch_size / num_shards` with the remainder dropped. Per-example randomness is stateless
(seeded by (seed, host, example counter)), and only checkpointable tf.data ops are used, so t5x's
saved iterator resumes a run on exactly the batches it would have seen. Batches are
{"image": uint8 [b, S, S, 3], "label": int32 [b]} ("label" left out with `with_labels=False`).
"""

from typing import List, Optional, Tuple

import ml_collections
import tensorflow as tf

from flip import paths
from flip import augment
from flip.data import checkpointable
from flip.data import dataset_spec
from flip.data import demo
from flip.data import eval_sources
from flip.data import transforms

TRAIN = "train"
EVAL = "eval"
TFDS_SPLITS = {TRAIN: ("train",), EVAL: eval_sources.TFDS_SPLITS}
DEMO_SPLIT_DIRS = {TRAIN: "train", EVAL: "test"}
HDF5_SPLITS = {TRAIN: "train", EVAL: "val"}  # M3AE's ImageNet columns train_* / val_*

# One error type for every data set that cannot be used (evaluation or classification).
ClassificationDataError = dataset_spec.DatasetError


# --- sources ------------------------------------------------------------------------------------

def _demo_split_dir(path: str, split: str) -> str:
  nested = paths.join(path, DEMO_SPLIT_DIRS[split])
  if tf.io.gfile.isdir(nested):
    return nested
  if tf.io.gfile.isdir(path):
    return path
  raise ClassificationDataError(f"demo split not found: neither {nested} nor {path} exists "
                                "(build it with python -m flip.data.demo)")


def _demo_source(path: str, split: str, max_images: int) -> eval_sources.ClassificationSource:
  num_examples, read = eval_sources.tfrecord_set(
      _demo_split_dir(path, split), eval_sources.LABELLED_COLUMNS, max_images, whole_files=True)
  return eval_sources.ClassificationSource(name="demo", classnames=list(demo.CLASS_NAMES),
                                           templates=[], num_examples=num_examples,
                                           read_encoded=read)


def labelled_source(spec: str, split: str, max_images: int = 0,
                    key: str = "config.data") -> eval_sources.ClassificationSource:
  """The `split` ("train" or "eval") of the data set named by `spec` (forms in the module doc)."""
  if split not in (TRAIN, EVAL):
    raise ValueError(f"split must be {TRAIN!r} or {EVAL!r}, got {split!r}")
  parsed = dataset_spec.parse(spec, key)
  if parsed.kind == dataset_spec.DEMO:
    return _demo_source(parsed.path, split, max_images)
  if parsed.kind == dataset_spec.FOLDER:
    return eval_sources.image_folder(parsed.path, max_images)
  if parsed.kind == dataset_spec.HDF5:
    from flip.data import hdf5  # pylint: disable=g-import-not-at-top (h5py only when used)
    try:
      return hdf5.labelled_source(parsed.path, HDF5_SPLITS[split], max_images, key)
    except hdf5.Hdf5DataError as err:
      raise ClassificationDataError(str(err)) from None
  return eval_sources.tfds_labelled(parsed, TFDS_SPLITS[split], max_images)


def check_num_classes(source: eval_sources.ClassificationSource, num_classes: int,
                      key: str) -> None:
  if len(source.classnames) != num_classes:
    raise ClassificationDataError(f"{key} {source.name!r} has {len(source.classnames)} classes "
                                  f"but config.data.num_classes={num_classes}")


# --- training input -----------------------------------------------------------------------------

def _randaug_settings(config: ml_collections.ConfigDict) -> Optional[Tuple[int, float, float]]:
  randaug = config.aug.get("randaug")
  if randaug is None or randaug.num_layers <= 0:
    return None
  return int(randaug.num_layers), float(randaug.magnitude), float(randaug.magnitude_std)


def make_train_dataset(config: ml_collections.ConfigDict, shard_index: int, num_shards: int,
                       seed: int, with_labels: bool = True,
                       source: Optional[eval_sources.ClassificationSource] = None
                       ) -> tf.data.Dataset:
  """Per-host training batches of `config.data.train` (see the module docstring)."""
  if config.batch_size % num_shards:
    raise ClassificationDataError(f"config.batch_size={config.batch_size} is not divisible by "
                                  f"the {num_shards} input shards")
  local_batch = config.batch_size // num_shards
  source = source or labelled_source(config.data.train, TRAIN, key="config.data.train")
  if with_labels:
    check_num_classes(source, config.data.num_classes, "config.data.train")
  buffer = int(config.data.get("shuffle_buffer_size", checkpointable.DEFAULT_SHUFFLE_BUFFER))
  randaug = _randaug_settings(config)

  ds = source.read_encoded(shard_index, num_shards)
  ds = ds.shuffle(max(buffer, 1), seed=seed, reshuffle_each_iteration=True).repeat()
  ds = ds.enumerate()
  host_seed = tf.constant([seed, shard_index], tf.int64)

  def decode(index, example):
    example_seed = tf.random.experimental.stateless_fold_in(host_seed, index)
    crop_seed, aug_seed = tf.unstack(tf.random.experimental.stateless_split(example_seed, 2))
    image = transforms.train_transform(example["image"], crop_seed, config)
    if randaug is not None:
      image = augment.rand_augment(image, aug_seed, *randaug)
    out = {"image": image}
    if with_labels:
      out["label"] = tf.cast(example["label"], tf.int32)
    return out

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(checkpointable.PREFETCH_BATCHES)
  return ds.with_options(checkpointable.options())


def eval_images(spec: str, image_size: int, num_images: int,
                crop_fraction: float = transforms.EVAL_CROP_FRACTION,
                split: str = EVAL) -> List:
  """The first `num_images` images of a split with the evaluation crop: uint8 [n, S, S, 3]."""
  source = labelled_source(spec, split)
  ds = source.dataset(0, 1, image_size, crop_fraction).take(num_images)
  images = [example["image"] for example in ds.as_numpy_iterator()]
  if len(images) < num_images:
    raise ClassificationDataError(f"{spec!r} holds only {len(images)} images, {num_images} "
                                  "were asked for")
  return images
