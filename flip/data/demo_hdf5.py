"""The M3AE demo data: the Fashion-MNIST demo images and captions as M3AE's HDF5 files.

    python -m flip.data.demo_hdf5 --fashion_mnist_dir=/usr/share/datasets/fashion-mnist \
      --out_dir=data/demo-m3ae

writes `<out_dir>/paired.h5` (the training images as single-channel JPEGs in `jpg`, their captions
from `flip.data.demo.make_captions` in `caption`) and `<out_dir>/text.h5` (`text`: captions drawn
with another seed for the same labels, with no image: the text-only source). The files are
written to temporary names and renamed when complete; complete files are left alone.
"""

import os
import sys
from typing import Sequence

from absl import app
from absl import flags
import numpy as np

from flip.data import demo

PAIRED_FILE = "paired.h5"
TEXT_FILE = "text.h5"
TEXT_SEED_OFFSET = 1


def _write(path: str, columns) -> None:
  import h5py  # pylint: disable=g-import-not-at-top (optional dependency of the HDF5 input)
  tmp = path + ".tmp"
  with h5py.File(tmp, "w") as f:
    for name, values in columns.items():
      if name == "jpg":
        data = f.create_dataset(name, (len(values),), dtype=h5py.vlen_dtype(np.uint8))
        for row, value in enumerate(values):
          data[row] = np.frombuffer(value, np.uint8)
      else:
        f.create_dataset(name, data=[v.encode("utf-8") for v in values],
                         dtype=h5py.string_dtype("utf-8"))
  os.replace(tmp, path)


def build(fashion_mnist_dir: str, out_dir: str, num_train: int = demo.NUM_TRAIN,
          seed: int = demo.DEFAULT_SEED) -> None:
  os.makedirs(out_dir, exist_ok=True)
  paired, text = os.path.join(out_dir, PAIRED_FILE), os.path.join(out_dir, TEXT_FILE)
  if os.path.exists(paired) and os.path.exists(text):
    return
  images, labels = demo.load_split(fashion_mnist_dir, "train")
  images, labels = images[:num_train], labels[:num_train]
  _write(paired, {"jpg": [demo.encode_jpeg(image) for image in images],
                  "caption": demo.make_captions(labels, seed)})
  _write(text, {"text": demo.make_captions(labels, seed + TEXT_SEED_OFFSET)})


FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
  del argv
  try:
    build(FLAGS.fashion_mnist_dir, FLAGS.out_dir, FLAGS.num_train)
  except demo.DemoDataError as e:
    print(f"flip.data.demo_hdf5: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"M3AE demo files in {FLAGS.out_dir}: {PAIRED_FILE}, {TEXT_FILE}")


if __name__ == "__main__":
  flags.DEFINE_string("fashion_mnist_dir", demo.DEFAULT_FASHION_MNIST_DIR,
                      "Directory with Fashion-MNIST's four idx .gz files.")
  flags.DEFINE_string("out_dir", "data/demo-m3ae", "Where to write the HDF5 files.")
  flags.DEFINE_integer("num_train", demo.NUM_TRAIN, "First N training images.")
  app.run(main)
