"""The embedded demo data set: real Fashion-MNIST images with generated captions, in LAION's layout.

This module owns turning the Fashion-MNIST idx files (Debian package `dataset-fashion-mnist`:
/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz) into:

    <out_dir>/train/00000.tfrecord ... 000NN.tfrecord   the 60,000 training images, exactly as
        img2dataset writes LAION (`jpg` JPEG bytes, `txt` caption, `key`, `width`, `height`), plus
        the extra column `label` (int64) that the training pipeline ignores;
    <out_dir>/test/00000.tfrecord ...                    the 10,000 test images (`jpg`, `label`,
        `key`) for zero-shot evaluation, and
    <out_dir>/test/classes.json                          {"classes": 10 class names,
        "templates": evaluation prompt templates with a "{}" placeholder};
    <out_dir>/manifest.json                              what was built from what (written last).

Captions are drawn, with a fixed seed, from TRAIN_TEMPLATES x CLASS_PHRASES (several synonyms per
class: "a photo of a sneaker", "a pair of trainers", "a black and white picture of an ankle boot").
The evaluation templates (EVAL_TEMPLATES) and class names are deliberately not among the training
phrasings, so zero-shot accuracy measures transfer rather than caption recall.

Images are stored as single-channel JPEGs (quality 95, img2dataset's default); the decoder expands
them to RGB. Train images go to the shards in contiguous blocks: shard s holds images
[s * per_shard, (s + 1) * per_shard), key = 5-digit shard + 4-digit index (img2dataset's keys).

Idempotent and atomic: a build goes to a temporary sibling directory that is renamed to `out_dir`
only when complete; an existing `out_dir` whose manifest matches the request is left untouched,
one without a (matching) manifest is rebuilt. Usage:

    python -m flip.data.demo --fashion_mnist_dir=/usr/share/datasets/fashion-mnist --out_dir=data/demo
"""

import dataclasses
import gzip
import io
import json
import os
import shutil
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import numpy as np
from PIL import Image

from flip import paths

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = ("install it with 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu) or "
                "pass --fashion_mnist_dir=<directory with the four idx .gz files>")
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_IMAGES_MAGIC = 2051  # idx3, unsigned bytes (LeCun's MNIST format)
IDX_LABELS_MAGIC = 2049  # idx1, unsigned bytes
NUM_TRAIN = 60_000
NUM_TEST = 10_000
TRAIN_SHARDS = 16
TEST_SHARDS = 2
JPEG_QUALITY = 95  # img2dataset's default --encode_quality
DEFAULT_SEED = 0
MANIFEST = "manifest.json"
CLASSES_FILE = "classes.json"
FORMAT_VERSION = 1  # bump when the layout or the captions change
KEY_SHARD_DIGITS = 5
KEY_INDEX_DIGITS = 4

# Fashion-MNIST's labels 0..9, as evaluation class names.
CLASS_NAMES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
               "bag", "ankle boot")
# Training phrasings per class (with their article), several synonyms each.
CLASS_PHRASES = (
    ("a t-shirt", "a tee", "a top", "a short-sleeved top", "a tank top"),
    ("a pair of trousers", "pants", "a pair of jeans", "slacks", "a pair of chinos"),
    ("a pullover", "a sweater", "a jumper", "a knitted sweater", "a sweatshirt"),
    ("a dress", "a gown", "a summer dress", "a frock", "an evening dress"),
    ("a coat", "a jacket", "an overcoat", "a winter coat", "a parka"),
    ("a sandal", "a pair of sandals", "a flip-flop", "an open-toe shoe", "a summer sandal"),
    ("a shirt", "a button-up shirt", "a blouse", "a collared shirt", "a flannel shirt"),
    ("a sneaker", "a pair of trainers", "a running shoe", "a pair of sneakers", "a trainer"),
    ("a bag", "a handbag", "a purse", "a tote bag", "a shoulder bag"),
    ("an ankle boot", "a boot", "a pair of ankle boots", "a short boot", "a leather boot"),
)
TRAIN_TEMPLATES = (
    "a photo of {}", "{}", "a black and white picture of {}", "a small picture of {}",
    "{} on a plain background", "a grayscale photo of {}", "picture of {}",
    "a blurry photo of {}", "{}, shown from the front", "a tiny image of {}",
)
# Zero-shot prompts: not used for any training caption (tests check it).
EVAL_TEMPLATES = (
    "an image of the {}.", "a product image of the {}.", "the {} in a catalogue.",
    "a low resolution image of the {}.", "a centered image of the {}.",
)


class DemoDataError(RuntimeError):
  """The Fashion-MNIST source files are missing or malformed, or out_dir cannot be used."""


@dataclasses.dataclass(frozen=True)
class DemoPaths:
  out_dir: str
  train_dir: str
  test_dir: str
  classes_file: str
  built: bool  # False when an existing complete build was reused


def read_idx(path: str, magic: int) -> np.ndarray:
  """Reads a gzipped idx file (uint8 data): images [N, rows, cols] or labels [N]."""
  if not paths.exists(path):
    raise DemoDataError(f"Fashion-MNIST file {path} not found: {INSTALL_HINT}")
  try:
    with paths.open_file(path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise DemoDataError(f"{path}: not a readable gzip file ({e})") from None
  ndim = magic & 0xFF
  header_bytes = 4 + 4 * ndim
  if len(data) < header_bytes or int.from_bytes(data[:4], "big") != magic:
    raise DemoDataError(f"{path}: not an idx file with magic number {magic}")
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  expected = int(np.prod(shape))
  if len(data) - header_bytes != expected:
    raise DemoDataError(f"{path}: header announces shape {shape} but holds "
                        f"{len(data) - header_bytes} bytes instead of {expected}")
  return np.frombuffer(data, np.uint8, offset=header_bytes).reshape(shape)


def load_split(fashion_mnist_dir: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28], labels uint8 [N]) of "train" or "test"."""
  image_file, label_file = (paths.join(fashion_mnist_dir, name) for name in SPLIT_FILES[split])
  images = read_idx(image_file, IDX_IMAGES_MAGIC)
  labels = read_idx(label_file, IDX_LABELS_MAGIC)
  if len(images) != len(labels):
    raise DemoDataError(f"{image_file} has {len(images)} images but {label_file} has "
                        f"{len(labels)} labels")
  if labels.max(initial=0) >= len(CLASS_NAMES):
    raise DemoDataError(f"{label_file}: label {labels.max()} is not a Fashion-MNIST class")
  return images, labels


def make_captions(labels: Sequence[int], seed: int) -> List[str]:
  """One caption per label: a seeded draw of a training template and a phrase of the class."""
  rng = np.random.default_rng(seed)
  templates = rng.integers(0, len(TRAIN_TEMPLATES), len(labels))
  phrases = rng.integers(0, min(len(p) for p in CLASS_PHRASES), len(labels))
  return [TRAIN_TEMPLATES[t].format(CLASS_PHRASES[int(label)][p])
          for label, t, p in zip(labels, templates, phrases)]


def encode_jpeg(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image, "L").save(buffer, "JPEG", quality=JPEG_QUALITY)
  return buffer.getvalue()


def _shard_bounds(num: int, num_shards: int) -> List[Tuple[int, int]]:
  per_shard = -(-num // num_shards)
  return [(s * per_shard, min(num, (s + 1) * per_shard)) for s in range(num_shards)
          if s * per_shard < num]


def _write_split(directory: str, images: np.ndarray, labels: np.ndarray,
                 captions: Optional[List[str]], num_shards: int) -> List[Dict[str, object]]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def feature_bytes(value: bytes):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

  def feature_int(value: int):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

  os.makedirs(directory)
  height, width = images.shape[1:]
  files = []
  for shard, (start, stop) in enumerate(_shard_bounds(len(images), num_shards)):
    name = f"{shard:0{KEY_SHARD_DIGITS}d}.tfrecord"
    with tf.io.TFRecordWriter(os.path.join(directory, name)) as writer:
      for offset, i in enumerate(range(start, stop)):
        feature = {
            "jpg": feature_bytes(encode_jpeg(images[i])),
            "key": feature_bytes(f"{shard:0{KEY_SHARD_DIGITS}d}{offset:0{KEY_INDEX_DIGITS}d}"
                                 .encode()),
            "label": feature_int(int(labels[i])),
        }
        if captions is not None:
          feature.update(txt=feature_bytes(captions[i].encode("utf-8")),
                         width=feature_int(width), height=feature_int(height))
        writer.write(tf.train.Example(features=tf.train.Features(feature=feature))
                     .SerializeToString())
    files.append({"name": name, "examples": stop - start,
                  "bytes": os.path.getsize(os.path.join(directory, name))})
  return files


def _request(fashion_mnist_dir: str, num_train: int, num_test: int, train_shards: int,
             test_shards: int, seed: int) -> Dict[str, object]:
  sources = {}
  for split in ("train", "test"):
    for name in SPLIT_FILES[split]:
      path = paths.join(fashion_mnist_dir, name)
      if not paths.exists(path):
        raise DemoDataError(f"Fashion-MNIST file {path} not found: {INSTALL_HINT}")
      sources[name] = paths.getsize(path)
  return {"format_version": FORMAT_VERSION, "num_train": num_train, "num_test": num_test,
          "train_shards": train_shards, "test_shards": test_shards, "seed": seed,
          "source_sizes": sources}


def _is_complete(out_dir: str, request: Dict[str, object]) -> bool:
  try:
    with open(os.path.join(out_dir, MANIFEST)) as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return False
  if manifest.get("request") != request:
    return False
  for split, files in manifest.get("files", {}).items():
    for entry in files:
      path = os.path.join(out_dir, split, entry["name"])
      if not os.path.exists(path) or os.path.getsize(path) != entry["bytes"]:
        return False
  return os.path.exists(os.path.join(out_dir, "test", CLASSES_FILE))


def _paths(out_dir: str, built: bool) -> DemoPaths:
  return DemoPaths(out_dir=out_dir, train_dir=os.path.join(out_dir, "train"),
                   test_dir=os.path.join(out_dir, "test"),
                   classes_file=os.path.join(out_dir, "test", CLASSES_FILE), built=built)


OWN_ENTRIES = {"train", "test", MANIFEST}


def build_demo(fashion_mnist_dir: str = DEFAULT_FASHION_MNIST_DIR, out_dir: str = "data/demo",
               num_train: int = NUM_TRAIN, num_test: int = NUM_TEST,
               train_shards: int = TRAIN_SHARDS, test_shards: int = TEST_SHARDS,
               seed: int = DEFAULT_SEED) -> DemoPaths:
  """Builds the demo set into out_dir unless a complete build of the same request is there.

  `num_train` / `num_test` take the first images of each split (for quick tests).
  """
  if paths.is_remote(out_dir):
    raise DemoDataError(f"out_dir {out_dir}: the demo set is built on a local disk (staged, then "
                        "renamed into place); copy the built directory to object storage")
  out_dir = os.path.abspath(out_dir)
  request = _request(fashion_mnist_dir, num_train, num_test, train_shards, test_shards, seed)
  if _is_complete(out_dir, request):
    logging.info("demo set already built in %s", out_dir)
    return _paths(out_dir, built=False)
  if os.path.exists(out_dir):
    foreign = set(os.listdir(out_dir)) - OWN_ENTRIES
    if foreign:
      raise DemoDataError(f"{out_dir} exists and holds files that are not a demo build "
                          f"({sorted(foreign)[:3]}); refusing to replace it")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".partial-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would make the final directory private
  try:
    files = {}
    for split, count, shards in (("train", num_train, train_shards),
                                 ("test", num_test, test_shards)):
      images, labels = load_split(fashion_mnist_dir, split)
      if not 0 < count <= len(images):
        raise DemoDataError(f"num_{split}={count} must be in [1, {len(images)}]")
      images, labels = images[:count], labels[:count]
      captions = make_captions(labels, seed) if split == "train" else None
      files[split] = _write_split(os.path.join(staging, split), images, labels, captions, shards)
    with open(os.path.join(staging, "test", CLASSES_FILE), "w") as f:
      json.dump({"classes": list(CLASS_NAMES), "templates": list(EVAL_TEMPLATES)}, f, indent=1)
    with open(os.path.join(staging, MANIFEST), "w") as f:
      json.dump({"request": request, "files": files}, f, indent=1)
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)  # an incomplete or different build of ours (checked above)
    os.rename(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  logging.info("built the demo set in %s: %d train, %d test images", out_dir, num_train,
               num_test)
  return _paths(out_dir, built=True)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags (defined only when run as a program, so importers keep their flag names)."""
  flags.DEFINE_string("fashion_mnist_dir", DEFAULT_FASHION_MNIST_DIR,
                      "Directory with Fashion-MNIST's four idx .gz files.")
  flags.DEFINE_string("out_dir", "data/demo", "Where to write the demo set.")
  flags.DEFINE_integer("num_train", NUM_TRAIN, "First N training images (all by default).")
  flags.DEFINE_integer("num_test", NUM_TEST, "First N test images (all by default).")
  flags.DEFINE_integer("train_shards", TRAIN_SHARDS, "Number of training TFRecord files.")
  flags.DEFINE_integer("seed", DEFAULT_SEED, "Seed of the caption draws.")


def main(argv: Sequence[str]) -> None:
  del argv
  try:
    demo_paths = build_demo(FLAGS.fashion_mnist_dir, FLAGS.out_dir, num_train=FLAGS.num_train,
                            num_test=FLAGS.num_test, train_shards=FLAGS.train_shards,
                            seed=FLAGS.seed)
  except DemoDataError as e:
    print(f"flip.data.demo: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"demo set {'built' if demo_paths.built else 'already complete'}: "
        f"train {demo_paths.train_dir}, test {demo_paths.test_dir}")


if __name__ == "__main__":
  from flip import process_setup  # pylint: disable=g-import-not-at-top
  process_setup.configure_process()
  define_flags()
  app.run(main)
