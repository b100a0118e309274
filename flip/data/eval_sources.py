"""Evaluation data: labelled image sets for zero-shot classification, caption sets for retrieval,
and the readers of tfds splits, image folders and TFRecord sets that the classification sources
(`flip.data.classification`) build on.

Owns where evaluation images, labels, class names and prompt templates come from; the zero-shot
arithmetic and the sharded loop live in `flip.evals`. Image decoding and the eval resize +
centre crop are `flip.data.transforms.eval_transform` (the same ops as training's pipeline).

Sources (`config.eval_dataset`, parsed by `flip.data.dataset_spec`):
- a tfds name, e.g. "imagenet2012:5.*.*" (FLIP's), read from `TFDS_DATA_DIR` (or tfds' default
  directory), split "validation" (else "test" if the dataset has no validation split). The number
  of images is read from the prepared dataset's metadata, never assumed. Class names: for
  imagenet2012 the CLIP class names in `flip/assets/imagenet_zeroshot.json`; for other tfds
  datasets the `classnames_file` when given, else the names of the tfds `label` feature.
- "folder:<dir>" or an existing directory (anything else is a tfds name): one sub-folder per
  class, images inside (jpeg, png, gif, bmp, webp; grey and RGBA images are converted to RGB by
  the decoder, alpha dropped; other files are ignored). Labels follow the sorted sub-folder names.
  The class-name file is `classnames_file`, or `<dir>/classnames.txt` when that is empty. Two
  formats: `.txt` has one class name per line, in sorted sub-folder order (exactly one line per
  sub-folder); `.json` is an object mapping every sub-folder name to its class name (or a list in
  sorted sub-folder order).
- "demo:<dir>": the demo's held-out Fashion-MNIST split (`flip.data.demo`): TFRecords with `jpg`
  bytes and `label` int64, plus `classes.json` holding the class names (`classes`) and the demo's
  own evaluation templates (`templates`). `<dir>` is that folder or its parent holding it as
  `test/`.
Prompt templates for tfds and image folders are the `templates` key of `imagenet_zeroshot.json`
(`templates_full`: CLIP's full set, `templates_short`: CLIP's short set, `templates_none`: the bare
class name).

Retrieval captions (the `dataset` of a `retrieval` entry of `config.evals`): TFRecords in the LAION (img2dataset) layout,
features `jpg` and `txt`, one caption per image; a directory, a glob pattern or one file.

Per-process sharding. Every source splits its (first `max_images`) examples into `num_shards`
contiguous or strided parts whose sizes differ by at most one, so no shard holds more than
ceil(N / num_shards) examples: `flip.evals.core` pads every shard to the same number of batches with
that bound and checks afterwards that exactly N valid images were counted. Files are read in sorted
order without shuffling, so a shard's content is deterministic.
"""

import dataclasses
import json
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import tensorflow as tf

from flip import paths
from flip.data import dataset_spec
from flip.data import transforms

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
IMAGENET_ZEROSHOT_FILE = os.path.join(ASSETS_DIR, "imagenet_zeroshot.json")
IMAGENET_TFDS_NAME = "imagenet2012"
TFDS_SPLITS = ("validation", "test")  # the first one the dataset has is evaluated
TFDS_DATA_DIR_ENV = "TFDS_DATA_DIR"
DEMO_SPLIT_DIR = "test"
DEMO_CLASSES_FILE = "classes.json"
DEFAULT_CLASSNAMES_FILE = "classnames.txt"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
TFRECORD_FEATURE_IMAGE = "jpg"  # img2dataset's image column
TFRECORD_FEATURE_CAPTION = "txt"
TFRECORD_FEATURE_LABEL = "label"
_NOT_TFRECORD = (".json", ".txt", ".parquet", ".csv")
# {name in the example: (TFRecord feature, dtype)} of the demo split and of retrieval captions.
LABELLED_COLUMNS = {"image": (TFRECORD_FEATURE_IMAGE, tf.string),
                    "label": (TFRECORD_FEATURE_LABEL, tf.int64)}
CAPTION_COLUMNS = {"image": (TFRECORD_FEATURE_IMAGE, tf.string),
                   "caption": (TFRECORD_FEATURE_CAPTION, tf.string)}

EncodedReader = Callable[[int, int], tf.data.Dataset]


# One error type for every data set that cannot be used (evaluation or classification).
EvalDataError = dataset_spec.DatasetError


def max_shard_size(num_examples: int, num_shards: int) -> int:
  """The most examples any of `num_shards` shards holds (shard sizes differ by at most one)."""
  return int(math.ceil(num_examples / num_shards)) if num_examples else 0


def num_to_read(total: int, max_images: int) -> int:
  """How many of `total` examples are evaluated: the first `max_images` (all when it is <= 0)."""
  return min(total, max_images) if max_images > 0 else total


def _decoded(encoded: tf.data.Dataset, image_size: int, crop_fraction: float) -> tf.data.Dataset:
  """`encoded` with its "image" bytes decoded and eval-cropped (other fields as they are; a
  "label" as int32)."""
  def decode(example):
    out = dict(example, image=transforms.eval_transform(example["image"], image_size,
                                                        crop_fraction))
    if "label" in example:
      out["label"] = tf.cast(example["label"], tf.int32)
    return out
  return encoded.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


@dataclasses.dataclass
class ClassificationSource:
  """A labelled image set: `dataset()` yields {"image": uint8 [S, S, 3], "label": int32}."""
  name: str
  classnames: List[str]
  templates: List[str]
  num_examples: int
  read_encoded: EncodedReader  # (shard_index, num_shards) -> {"image": bytes, "label": int}

  def dataset(self, shard_index: int, num_shards: int, image_size: int,
              crop_fraction: float = transforms.EVAL_CROP_FRACTION) -> tf.data.Dataset:
    return _decoded(self.read_encoded(shard_index, num_shards), image_size, crop_fraction)


@dataclasses.dataclass
class CaptionSource:
  """Image-caption pairs: `dataset()` yields {"image": uint8 [S, S, 3], "caption": string}.

  Crawled caption sets contain undecodable images: those pairs are dropped (logged by tf.data) and
  `flip.evals.retrieval` reports how many (`num_examples` counts records, not decodable pairs).
  """
  name: str
  num_examples: int
  read_encoded: EncodedReader  # (shard_index, num_shards) -> {"image": bytes, "caption": str}

  def dataset(self, shard_index: int, num_shards: int, image_size: int,
              crop_fraction: float = transforms.EVAL_CROP_FRACTION) -> tf.data.Dataset:
    return _decoded(self.read_encoded(shard_index, num_shards), image_size,
                    crop_fraction).ignore_errors(log_warning=True)


# --- class names and templates ------------------------------------------------------------------

def load_imagenet_zeroshot(path: str = IMAGENET_ZEROSHOT_FILE) -> Dict[str, List[str]]:
  with open(path) as f:
    return json.load(f)


def imagenet_templates(templates_key: str, path: str = IMAGENET_ZEROSHOT_FILE) -> List[str]:
  """The template list stored under `templates_key` (a zeroshot evaluator's `templates`)."""
  data = load_imagenet_zeroshot(path)
  known = sorted(k for k in data if k.startswith("templates"))
  if templates_key not in known:
    raise EvalDataError(f"templates={templates_key!r} is not in {path} "
                        f"(known: {', '.join(known)})")
  return check_templates(list(data[templates_key]), f"{path}:{templates_key}")


def check_templates(templates: Sequence[str], where: str) -> List[str]:
  if not templates:
    raise EvalDataError(f"{where} holds no prompt templates")
  for template in templates:
    if "{}" not in template:
      raise EvalDataError(f"{where}: template {template!r} has no '{{}}' placeholder")
  return list(templates)


def read_classnames_file(path: str, folder_names: Optional[Sequence[str]] = None) -> List[str]:
  """Class names from a `.txt` (one per line, in sorted folder order) or `.json` file.

  A `.json` file is either a list (in sorted folder order) or, with `folder_names`, an object
  mapping each folder name to its class name.
  """
  if not tf.io.gfile.exists(path):
    raise EvalDataError(f"class-name file not found: {path}")
  with tf.io.gfile.GFile(path) as f:
    text = f.read()
  if path.endswith(".json"):
    try:
      data = json.loads(text)
    except json.JSONDecodeError as err:
      raise EvalDataError(f"{path} is not valid JSON: {err}") from None
    if isinstance(data, dict) and folder_names is not None:
      missing = [name for name in folder_names if name not in data]
      if missing:
        raise EvalDataError(f"{path} has no class name for folder {missing[0]!r} "
                            f"({len(missing)} folders missing)")
      names = [str(data[name]) for name in folder_names]
    elif isinstance(data, list):
      names = [str(name) for name in data]
    else:
      raise EvalDataError(f"{path} must hold a list of class names or a folder -> name object")
  else:
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
      names.pop()
  empty = [i for i, name in enumerate(names) if not name]
  if empty:
    raise EvalDataError(f"{path}: class name {empty[0]} is empty")
  if folder_names is not None and len(names) != len(folder_names):
    raise EvalDataError(f"{path} lists {len(names)} class names but there are "
                        f"{len(folder_names)} class folders")
  return names


# --- tfds -----------------------------------------------------------------------------------------

def tfds_labelled(spec: dataset_spec.DatasetSpec, splits: Sequence[str],
                  max_images: int) -> ClassificationSource:
  """The first of `splits` that a tfds data set has (its first `max_images` examples), class names
  from its `label` feature, no templates."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = spec.tfds_name
  data_dir = os.environ.get(TFDS_DATA_DIR_ENV) or None
  shown_dir = data_dir or f"tfds' default (set {TFDS_DATA_DIR_ENV})"
  not_found = EvalDataError(f"tfds dataset {name!r} not found in {TFDS_DATA_DIR_ENV}={shown_dir}")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception:  # pylint: disable=broad-except (tfds raises several kinds for "not there")
    raise not_found from None
  if not builder.is_prepared():
    raise not_found
  split = next((s for s in splits if s in builder.info.splits), None)
  if split is None:
    raise EvalDataError(f"tfds dataset {name!r} has none of the splits {tuple(splits)}")
  num_examples = num_to_read(builder.info.splits[split].num_examples, max_images)
  split_spec = f"{split}[:{num_examples}]"
  if "label" not in builder.info.features:
    raise EvalDataError(f"tfds dataset {name!r} has no 'label' feature")

  def read(shard_index: int, num_shards: int) -> tf.data.Dataset:
    shard = tfds.even_splits(split_spec, n=num_shards, drop_remainder=False)[shard_index]
    ds = builder.as_dataset(split=shard, shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
    return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})

  return ClassificationSource(name=spec.name, classnames=list(builder.info.features["label"].names),
                              templates=[], num_examples=num_examples, read_encoded=read)


def _tfds_source(spec: dataset_spec.DatasetSpec, templates_key: str, classnames_file: str,
                 max_images: int) -> ClassificationSource:
  source = tfds_labelled(spec, TFDS_SPLITS, max_images)
  if classnames_file:
    classnames = read_classnames_file(classnames_file)
  elif spec.name == IMAGENET_TFDS_NAME:
    classnames = list(load_imagenet_zeroshot()["classes"])
  else:
    classnames = source.classnames
  num_labels = len(source.classnames)
  if len(classnames) != num_labels:
    raise EvalDataError(f"{len(classnames)} class names for tfds dataset {spec.tfds_name!r} with "
                        f"{num_labels} labels")
  return dataclasses.replace(source, classnames=classnames,
                             templates=imagenet_templates(templates_key))


# --- image folders ------------------------------------------------------------------------------

def image_folder(root: str, max_images: int) -> ClassificationSource:
  """An image folder (its first `max_images` images in sorted order): labels and class names
  follow the sorted sub-folder names; no templates."""
  if not tf.io.gfile.isdir(root):
    raise EvalDataError(f"image folder not found: {root}")
  folders = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(root)
                   if tf.io.gfile.isdir(paths.join(root, d)))
  if not folders:
    raise EvalDataError(f"image folder {root} has no class sub-folders")
  image_files, labels = [], []
  for label, folder in enumerate(folders):
    for file_name in sorted(tf.io.gfile.listdir(paths.join(root, folder))):
      if file_name.lower().endswith(IMAGE_EXTENSIONS):
        image_files.append(paths.join(root, folder, file_name))
        labels.append(label)
  if not image_files:
    raise EvalDataError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
  if max_images > 0:
    image_files, labels = image_files[:max_images], labels[:max_images]

  def read(shard_index: int, num_shards: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices({"path": image_files, "label": labels})
    ds = ds.shard(num_shards, shard_index)
    return ds.map(lambda ex: {"image": tf.io.read_file(ex["path"]), "label": ex["label"]})

  return ClassificationSource(name=paths.basename(root), classnames=folders,
                              templates=[], num_examples=len(image_files), read_encoded=read)


def _folder_source(root: str, templates_key: str, classnames_file: str,
                   max_images: int) -> ClassificationSource:
  source = image_folder(root, max_images)
  classnames = read_classnames_file(
      classnames_file or paths.join(root, DEFAULT_CLASSNAMES_FILE), source.classnames)
  return dataclasses.replace(source, classnames=classnames,
                             templates=imagenet_templates(templates_key))


# --- TFRecord sets (demo test split, retrieval captions) ----------------------------------------

def tfrecord_files(path: str) -> List[str]:
  """Sorted TFRecord files of a directory, a glob pattern or a single file."""
  if tf.io.gfile.isdir(path):
    files = [paths.join(path, f) for f in tf.io.gfile.listdir(path)]
    files = [f for f in files if not tf.io.gfile.isdir(f) and not f.endswith(_NOT_TFRECORD)]
  elif any(ch in path for ch in "*?["):
    files = tf.io.gfile.glob(path)
  else:
    files = [path] if tf.io.gfile.exists(path) else []
  if not files:
    raise EvalDataError(f"no TFRecord files at {path}")
  return sorted(files)


def count_records(files: Sequence[str]) -> int:
  return int(tf.data.TFRecordDataset(list(files)).reduce(
      tf.constant(0, tf.int64), lambda count, _: count + 1).numpy())


def tfrecord_set(path: str, columns: Dict[str, Tuple[str, tf.dtypes.DType]], max_images: int,
                 whole_files: bool = False) -> Tuple[int, EncodedReader]:
  """(number of examples, reader) of the first `max_images` records of the TFRecords at `path`.

  The reader yields {name: value of the feature} for `columns` = {name: (feature, dtype)}, each
  shard taking every num_shards-th record. With `whole_files`, when every record is read and there
  are at least as many files as shards, each shard reads whole files instead, so that no process
  reads another's records.
  """
  files = tfrecord_files(path)
  total = count_records(files)
  num_examples = num_to_read(total, max_images)
  features = {feature: tf.io.FixedLenFeature([], dtype) for feature, dtype in columns.values()}

  def parse(record):
    example = tf.io.parse_single_example(record, features)
    return {name: example[feature] for name, (feature, _) in columns.items()}

  def read(shard_index: int, num_shards: int) -> tf.data.Dataset:
    if whole_files and num_examples == total and len(files) >= num_shards:
      ds = tf.data.TFRecordDataset(files[shard_index::num_shards])
    else:
      ds = tf.data.TFRecordDataset(files).take(num_examples).shard(num_shards, shard_index)
    return ds.map(parse)

  return num_examples, read


def _demo_dir(path: str) -> str:
  for candidate in (path, paths.join(path, DEMO_SPLIT_DIR)):
    if tf.io.gfile.exists(paths.join(candidate, DEMO_CLASSES_FILE)):
      return candidate
  raise EvalDataError(f"demo test split not found: no {DEMO_CLASSES_FILE} in {path} or "
                      f"{paths.join(path, DEMO_SPLIT_DIR)} (build it with flip.data.demo)")


def _demo_source(path: str, max_images: int) -> ClassificationSource:
  split_dir = _demo_dir(path)
  classes_path = paths.join(split_dir, DEMO_CLASSES_FILE)
  with tf.io.gfile.GFile(classes_path) as f:
    text = f.read()
  try:
    meta = json.loads(text)
  except ValueError as err:
    raise EvalDataError(f"{classes_path} is not valid JSON: {err}") from None
  if not isinstance(meta, dict):
    raise EvalDataError(f"{classes_path} must hold a JSON object with 'classes' and 'templates'")
  for key in ("classes", "templates"):
    if key not in meta:
      raise EvalDataError(f"{classes_path} has no {key!r} key")
  num_examples, read = tfrecord_set(split_dir, LABELLED_COLUMNS, max_images)
  return ClassificationSource(name="demo", classnames=[str(c) for c in meta["classes"]],
                              templates=check_templates(meta["templates"], classes_path),
                              num_examples=num_examples, read_encoded=read)


def caption_source(path: str, max_images: int = 0) -> CaptionSource:
  """A held-out image-caption set in the LAION TFRecord layout (`jpg`, `txt`)."""
  num_examples, read = tfrecord_set(path, CAPTION_COLUMNS, max_images)
  return CaptionSource(name=paths.basename(path.rstrip("*")) or "captions",
                       num_examples=num_examples, read_encoded=read)


# --- dispatch -----------------------------------------------------------------------------------

def classification_source(eval_dataset: str, templates_key: str, classnames_file: str = "",
                          max_images: int = 0,
                          key: str = "config.eval_dataset") -> ClassificationSource:
  """The source named by `eval_dataset`, the value of config key `key` (the forms are in the
  module docstring)."""
  spec = dataset_spec.parse(eval_dataset, key)
  if spec.kind == dataset_spec.DEMO:
    return _demo_source(spec.path, max_images)
  if spec.kind == dataset_spec.FOLDER:
    return _folder_source(spec.path, templates_key, classnames_file, max_images)
  if spec.kind == dataset_spec.HDF5:
    raise EvalDataError(f"{key}={eval_dataset!r}: hdf5: sets have no class names for zero-shot; "
                        "the probe and fine-tuning read them")
  return _tfds_source(spec, templates_key, classnames_file, max_images)
