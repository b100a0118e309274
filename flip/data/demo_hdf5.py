"""The M3AE demo data: the Fashion-MNIST demo images and captions as M3AE's HDF5 files.

    python -m flip.data.demo_hdf5 --fashion_mnist_dir=/usr/share/datasets/fashion-mnist \
      --out_dir=data/demo-m3ae

writes `<out_dir>/paired.h5` (the training images as single-channel JPEGs in `jpg`, their captions
from `flip.data.demo.make_captions` in `caption`) and `<out_dir>/text.h5` (`text`: captions drawn
with another seed for the same labels, with no image: the text-only source),
`<out_dir>/heldout.h5` (the first NUM_HELDOUT test images with captions of a third seed, in the
paired layout: the held-out captions of the caption reconstructions), `<out_dir>/imagenet.h5` (the
training and test images with their labels in M3AE's ImageNet layout, `train_jpg` /
`train_labels` / `val_jpg` / `val_labels`: the linear probes' data set `hdf5:<out_dir>/imagenet.h5`)
and `<out_dir>/vocab.txt`, the demo's WordPiece vocabulary: the BERT uncased entries that the demo's
captions can produce ([PAD] first, [UNK], [CLS], then the word pieces in BERT's order), filled up
to DEMO_VOCAB_SIZE entries with `[unusedN]`. WordPiece on it splits every demo caption exactly as
on the full BERT vocabulary (greedy longest match over a subset that contains every piece chosen on
the full one), only the ids are renumbered, and the token head has DEMO_VOCAB_SIZE rows instead of
BERT's 30,522 (config `model.m3ae.vocab_file`, `vocab_size`). The files are written to temporary
names and renamed when complete; complete files are left alone.
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
VOCAB_FILE = "vocab.txt"
HELDOUT_FILE = "heldout.h5"
IMAGENET_FILE = "imagenet.h5"
TEXT_SEED_OFFSET = 1
HELDOUT_SEED_OFFSET = 2
NUM_HELDOUT = 1000
DEMO_VOCAB_SIZE = 128  # one row block of the token table (flip.models.text.VOCAB_ROW_MULTIPLE)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]")


def _write(path: str, columns) -> None:
  import h5py  # pylint: disable=g-import-not-at-top (optional dependency of the HDF5 input)
  tmp = path + ".tmp"
  with h5py.File(tmp, "w") as f:
    for name, values in columns.items():
      if name.endswith("labels"):
        f.create_dataset(name, data=np.asarray(values, np.int64))
      elif name.endswith("jpg"):
        data = f.create_dataset(name, (len(values),), dtype=h5py.vlen_dtype(np.uint8))
        for row, value in enumerate(values):
          data[row] = np.frombuffer(value, np.uint8)
      else:
        f.create_dataset(name, data=[v.encode("utf-8") for v in values],
                         dtype=h5py.string_dtype("utf-8"))
  os.replace(tmp, path)


def all_captions():
  """Every caption `demo.make_captions` can produce (each template with each phrase)."""
  return [template.format(phrase) for template in demo.TRAIN_TEMPLATES
          for phrases in demo.CLASS_PHRASES for phrase in phrases]


def demo_vocabulary(size: int = DEMO_VOCAB_SIZE):
  """The demo vocabulary's entries (module doc), from the package's BERT uncased file."""
  from flip.data import text as text_lib  # pylint: disable=g-import-not-at-top (tf)
  bert = text_lib.BertUncasedVocabulary()
  with open(text_lib.bert_vocab_path(), encoding="utf-8") as f:
    entries = [line.rstrip("\n") for line in f]
  ids = np.asarray(text_lib.tokenize(bert, all_captions(), max_len=64))
  used = sorted(set(int(i) for i in ids.ravel()) - {text_lib.BERT_PAD_ID})
  pieces = [entries[i] for i in used if entries[i] not in SPECIAL_TOKENS]
  vocab = list(SPECIAL_TOKENS) + pieces
  if len(vocab) > size:
    raise demo.DemoDataError(f"the demo captions use {len(vocab)} vocabulary entries, more than "
                             f"{size}")
  return vocab + [f"[unused{i}]" for i in range(size - len(vocab))]


def _write_vocab(path: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("".join(entry + "\n" for entry in demo_vocabulary()))
  os.replace(tmp, path)


def build(fashion_mnist_dir: str, out_dir: str, num_train: int = demo.NUM_TRAIN,
          seed: int = demo.DEFAULT_SEED) -> None:
  os.makedirs(out_dir, exist_ok=True)
  paired, text = os.path.join(out_dir, PAIRED_FILE), os.path.join(out_dir, TEXT_FILE)
  vocab = os.path.join(out_dir, VOCAB_FILE)
  if not os.path.exists(vocab):
    _write_vocab(vocab)
  heldout = os.path.join(out_dir, HELDOUT_FILE)
  if not os.path.exists(heldout):
    images, labels = demo.load_split(fashion_mnist_dir, "test")
    images, labels = images[:NUM_HELDOUT], labels[:NUM_HELDOUT]
    _write(heldout, {"jpg": [demo.encode_jpeg(image) for image in images],
                     "caption": demo.make_captions(labels, seed + HELDOUT_SEED_OFFSET)})
  labelled = os.path.join(out_dir, IMAGENET_FILE)
  if os.path.exists(paired) and os.path.exists(text) and os.path.exists(labelled):
    return
  images, labels = demo.load_split(fashion_mnist_dir, "train")
  images, labels = images[:num_train], labels[:num_train]
  jpegs = [demo.encode_jpeg(image) for image in images]
  if not os.path.exists(labelled):
    test_images, test_labels = demo.load_split(fashion_mnist_dir, "test")
    _write(labelled, {"train_jpg": jpegs, "train_labels": labels,
                      "val_jpg": [demo.encode_jpeg(image) for image in test_images],
                      "val_labels": test_labels})
  _write(paired, {"jpg": jpegs, "caption": demo.make_captions(labels, seed)})
  _write(text, {"text": demo.make_captions(labels, seed + TEXT_SEED_OFFSET)})


FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
  del argv
  try:
    build(FLAGS.fashion_mnist_dir, FLAGS.out_dir, FLAGS.num_train)
  except demo.DemoDataError as e:
    print(f"flip.data.demo_hdf5: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"M3AE demo files in {FLAGS.out_dir}: {PAIRED_FILE}, {TEXT_FILE}, {HELDOUT_FILE}, "
        f"{IMAGENET_FILE}, {VOCAB_FILE}")


if __name__ == "__main__":
  flags.DEFINE_string("fashion_mnist_dir", demo.DEFAULT_FASHION_MNIST_DIR,
                      "Directory with Fashion-MNIST's four idx .gz files.")
  flags.DEFINE_string("out_dir", "data/demo-m3ae", "Where to write the HDF5 files.")
  flags.DEFINE_integer("num_train", demo.NUM_TRAIN, "First N training images.")
  app.run(main)
