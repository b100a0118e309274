"""Labelled image sets for the MAE family: training input (MAE pretraining, linear probe,
fine-tuning) and the held-out split their classification hook evaluates.

A data set is named by one string (`config.data.train`, `config.data.eval`):
- a tfds name, e.g. "imagenet2012:5.*.*", read from `TFDS_DATA_DIR` (or tfds' default directory);
  training reads the "train" split, evaluation the first of "validation", "test";
- "folder:<dir>" or an existing directory: one sub-folder per class (labels follow the sorted
  sub-folder names, which are also the class names), images inside (the extensions
  `flip.data.imagenet` reads); the ImageNet train/val folder layout works as it is;
- "demo:<dir>": the Fashion-MNIST demo set of `flip.data.demo` (TFRecords whose `jpg` and `label`
  columns are read; the captions are ignored). `<dir>` is the split folder itself or the demo root,
  in which case training reads `<dir>/train` and evaluation `<dir>/test`.

Every source is a `flip.data.imagenet.ClassificationSource` (name, class names, number of
examples, and a reader of encoded examples per shard), so evaluation reuses its decode + resize +
centre-crop (`flip.data.transforms.eval_transform`).

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

import os
from typing import List, Optional, Tuple

import ml_collections
import tensorflow as tf

from flip import augment
from flip.data import demo
from flip.data import imagenet
from flip.data import transforms

try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices; nothing to hide any more.
  pass

TRAIN = "train"
EVAL = "eval"
TFDS_TRAIN_SPLIT = "train"
DEMO_SPLIT_DIRS = {TRAIN: "train", EVAL: "test"}
PREFETCH_BATCHES = 2  # bounded: prefetched batches are part of every saved iterator state
FOREVER = 2**62  # "repeat forever" for the example counter (a finite, checkpointable range)
DEFAULT_SHUFFLE_BUFFER = 10_000


class ClassificationDataError(ValueError):
  """A labelled data set that cannot be used, in one line naming the key, data set or file."""


# --- sources ------------------------------------------------------------------------------------

def _tfds_source(spec: str, split: str, max_images: int) -> imagenet.ClassificationSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = os.environ.get(imagenet.TFDS_DATA_DIR_ENV) or None
  shown_dir = data_dir or f"tfds' default (set {imagenet.TFDS_DATA_DIR_ENV})"
  not_found = ClassificationDataError(
      f"tfds dataset {spec!r} not found in {imagenet.TFDS_DATA_DIR_ENV}={shown_dir}")
  try:
    builder = tfds.builder(spec, data_dir=data_dir)
  except Exception:  # pylint: disable=broad-except (tfds raises several kinds for "not there")
    raise not_found from None
  if not builder.is_prepared():
    raise not_found
  wanted = (TFDS_TRAIN_SPLIT,) if split == TRAIN else imagenet.TFDS_SPLITS
  tfds_split = next((s for s in wanted if s in builder.info.splits), None)
  if tfds_split is None:
    raise ClassificationDataError(f"tfds dataset {spec!r} has none of the splits {wanted}")
  total = builder.info.splits[tfds_split].num_examples
  num_examples = min(total, max_images) if max_images > 0 else total
  split_spec = f"{tfds_split}[:{num_examples}]"
  if "label" not in builder.info.features:
    raise ClassificationDataError(f"tfds dataset {spec!r} has no 'label' feature")
  classnames = list(builder.info.features["label"].names)

  def read(shard_index: int, num_shards: int) -> tf.data.Dataset:
    shard = tfds.even_splits(split_spec, n=num_shards, drop_remainder=False)[shard_index]
    ds = builder.as_dataset(split=shard, shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
    return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})

  return imagenet.ClassificationSource(name=spec.split(":")[0], classnames=classnames,
                                       templates=[], num_examples=num_examples, read_encoded=read)


def _folder_source(root: str, max_images: int) -> imagenet.ClassificationSource:
  if not tf.io.gfile.isdir(root):
    raise ClassificationDataError(f"image folder not found: {root}")
  folders = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(root)
                   if tf.io.gfile.isdir(os.path.join(root, d)))
  if not folders:
    raise ClassificationDataError(f"image folder {root} has no class sub-folders")
  paths, labels = [], []
  for label, folder in enumerate(folders):
    for file_name in sorted(tf.io.gfile.listdir(os.path.join(root, folder))):
      if file_name.lower().endswith(imagenet.IMAGE_EXTENSIONS):
        paths.append(os.path.join(root, folder, file_name))
        labels.append(label)
  if not paths:
    raise ClassificationDataError(
        f"image folder {root} holds no images ({', '.join(imagenet.IMAGE_EXTENSIONS)})")
  if max_images > 0:
    paths, labels = paths[:max_images], labels[:max_images]

  def read(shard_index: int, num_shards: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices({"path": paths, "label": labels})
    ds = ds.shard(num_shards, shard_index)
    return ds.map(lambda ex: {"image": tf.io.read_file(ex["path"]), "label": ex["label"]})

  return imagenet.ClassificationSource(name=os.path.basename(os.path.normpath(root)),
                                       classnames=folders, templates=[],
                                       num_examples=len(paths), read_encoded=read)


def _demo_split_dir(path: str, split: str) -> str:
  nested = os.path.join(path, DEMO_SPLIT_DIRS[split])
  if tf.io.gfile.isdir(nested):
    return nested
  if tf.io.gfile.isdir(path):
    return path
  raise ClassificationDataError(f"demo split not found: neither {nested} nor {path} exists "
                                "(build it with python -m flip.data.demo)")


def _parse_demo(record: tf.Tensor):
  features = {imagenet.TFRECORD_FEATURE_IMAGE: tf.io.FixedLenFeature([], tf.string),
              imagenet.TFRECORD_FEATURE_LABEL: tf.io.FixedLenFeature([], tf.int64)}
  example = tf.io.parse_single_example(record, features)
  return {"image": example[imagenet.TFRECORD_FEATURE_IMAGE],
          "label": example[imagenet.TFRECORD_FEATURE_LABEL]}


def _demo_source(path: str, split: str, max_images: int) -> imagenet.ClassificationSource:
  split_dir = _demo_split_dir(path, split)
  try:
    files = imagenet.tfrecord_files(split_dir)
  except imagenet.EvalDataError as err:
    raise ClassificationDataError(str(err)) from None
  total = imagenet.count_records(files)
  num_examples = min(total, max_images) if max_images > 0 else total

  def read(shard_index: int, num_shards: int) -> tf.data.Dataset:
    if num_examples == total and len(files) >= num_shards:
      # Whole files per host: no host reads another host's records.
      ds = tf.data.TFRecordDataset(files[shard_index::num_shards])
    else:
      ds = tf.data.TFRecordDataset(files).take(num_examples).shard(num_shards, shard_index)
    return ds.map(_parse_demo)

  return imagenet.ClassificationSource(name="demo", classnames=list(demo.CLASS_NAMES),
                                       templates=[], num_examples=num_examples, read_encoded=read)


def labelled_source(spec: str, split: str, max_images: int = 0,
                    key: str = "config.data") -> imagenet.ClassificationSource:
  """The `split` ("train" or "eval") of the data set named by `spec` (forms in the module doc)."""
  if split not in (TRAIN, EVAL):
    raise ValueError(f"split must be {TRAIN!r} or {EVAL!r}, got {split!r}")
  if not spec:
    raise ClassificationDataError(f"{key} is empty: name a tfds data set, an image folder or "
                                  "demo:<dir>")
  if spec.startswith(imagenet.DEMO_PREFIX):
    return _demo_source(spec[len(imagenet.DEMO_PREFIX):], split, max_images)
  if spec.startswith(imagenet.FOLDER_PREFIX):
    return _folder_source(spec[len(imagenet.FOLDER_PREFIX):], max_images)
  if tf.io.gfile.isdir(spec):
    return _folder_source(spec, max_images)
  return _tfds_source(spec, split, max_images)


def check_num_classes(source: imagenet.ClassificationSource, num_classes: int, key: str) -> None:
  if len(source.classnames) != num_classes:
    raise ClassificationDataError(f"{key} {source.name!r} has {len(source.classnames)} classes "
                                  f"but config.data.num_classes={num_classes}")


# --- training input -----------------------------------------------------------------------------

def _checkpointable_options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # Seeded shuffles carry a seed-generator resource that tf.data's save calls external state;
  # their seeds are explicit and their buffers are saved, so nothing outside the checkpoint is
  # needed to resume.
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  return options


def _randaug_settings(config: ml_collections.ConfigDict) -> Optional[Tuple[int, float, float]]:
  randaug = config.aug.get("randaug")
  if randaug is None or randaug.num_layers <= 0:
    return None
  return int(randaug.num_layers), float(randaug.magnitude), float(randaug.magnitude_std)


def make_train_dataset(config: ml_collections.ConfigDict, shard_index: int, num_shards: int,
                       seed: int, with_labels: bool = True,
                       source: Optional[imagenet.ClassificationSource] = None) -> tf.data.Dataset:
  """Per-host training batches of `config.data.train` (see the module docstring)."""
  if config.batch_size % num_shards:
    raise ClassificationDataError(f"config.batch_size={config.batch_size} is not divisible by "
                                  f"the {num_shards} input shards")
  local_batch = config.batch_size // num_shards
  source = source or labelled_source(config.data.train, TRAIN, key="config.data.train")
  if with_labels:
    check_num_classes(source, config.data.num_classes, "config.data.train")
  buffer = int(config.data.get("shuffle_buffer_size", DEFAULT_SHUFFLE_BUFFER))
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
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(PREFETCH_BATCHES)
  return ds.with_options(_checkpointable_options())


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
