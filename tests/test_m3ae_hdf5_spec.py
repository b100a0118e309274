"""The `hdf5:` data-set name (flip.data.dataset_spec, flip.data.classification,
flip.data.hdf5.labelled_source): M3AE's ImageNet-layout HDF5 files as the labelled train and eval
sets of the linear probe and fine-tuning.

References: files written here with h5py; images compared with PIL's decoding of the bytes written
(the evaluation crop of a 16 px image at crop fraction 1 is the image itself; the two JPEG decoders
differ by a few levels), labels with the
integers written, and the rows each host reads with the `i::n` rule.
"""

import h5py
import numpy as np
import pytest
import tensorflow as tf

from flip import config as config_lib
from flip.data import classification
from flip.data import dataset_spec
from flip.data import eval_sources
from test_m3ae_data import jpeg
from test_m3ae_data import pil_decoded
from test_m3ae_data import SIZE

tf.config.set_visible_devices([], "GPU")


def write_imagenet(path, train_rows, val_rows):
  with h5py.File(path, "w") as f:
    for split, rows in (("train", train_rows), ("val", val_rows)):
      column = f.create_dataset(f"{split}_jpg", (len(rows),), dtype=h5py.vlen_dtype(np.uint8))
      for i, (seed, _) in enumerate(rows):
        column[i] = np.frombuffer(jpeg(seed), np.uint8)
      f.create_dataset(f"{split}_labels", data=np.asarray([label for _, label in rows]))
  return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagenet_h5")
  first = write_imagenet(root / "part-0.h5", [(i, i % 4) for i in range(5)], [(50, 1), (51, 3)])
  second = write_imagenet(root / "part-1.h5", [(i, i % 4) for i in range(5, 9)], [(52, 0)])
  return first, second


def assert_image_of(image, seed, candidates):
  """`image` is the JPEG of `seed` (PIL's and TF's decoders differ by a few levels on noise)."""
  errors = {c: np.mean(np.abs(image.astype(int) - pil_decoded(c))) for c in candidates}
  assert errors[seed] < 2.0 and min(errors, key=errors.get) == seed


def collect(source, shard_index=0, num_shards=1):
  return list(source.dataset(shard_index, num_shards, SIZE, 1.0).as_numpy_iterator())


def test_the_grammar_names_hdf5_files():
  spec = dataset_spec.parse("hdf5:/data/a.h5,/data/b_*.h5", "config.data.train")
  assert spec == dataset_spec.DatasetSpec(dataset_spec.HDF5, path="/data/a.h5,/data/b_*.h5")
  with pytest.raises(dataset_spec.DatasetError,
                     match=r"^config.data.eval='hdf5:' names no HDF5 file after 'hdf5:'$"):
    dataset_spec.parse("hdf5:", "config.data.eval")


def test_train_and_eval_splits_read_their_columns_over_all_files(files):
  spec = "hdf5:" + ",".join(files)
  train = classification.labelled_source(spec, classification.TRAIN)
  examples = collect(train)
  assert train.num_examples == 9 and train.classnames == ["0", "1", "2", "3"]
  assert [int(e["label"]) for e in examples] == [i % 4 for i in range(9)]
  for seed, example in enumerate(examples):
    assert_image_of(example["image"], seed, range(9))
  val = classification.labelled_source(spec, classification.EVAL)
  examples = collect(val)
  assert [int(e["label"]) for e in examples] == [1, 3, 0]
  for seed, example in zip((50, 51, 52), examples):
    assert_image_of(example["image"], seed, (50, 51, 52))


def test_hosts_read_disjoint_rows_and_max_images_takes_the_first(files):
  spec = "hdf5:" + ",".join(files)
  source = classification.labelled_source(spec, classification.TRAIN, max_images=7)
  assert source.num_examples == 7
  labels = [[int(e["label"]) for e in collect(source, host, 3)] for host in range(3)]
  assert labels == [[(i % 4) for i in range(host, 7, 3)] for host in range(3)]


def test_probe_training_batches_come_from_the_train_columns(files):
  config = config_lib.load_config("configs/cfg_linprobe_m3ae.py:smoke", [
      "data.train=hdf5:" + ",".join(files), "data.num_classes=4", f"image_size={SIZE}",
      "model.model_img.patches.size=(4, 4)", "batch_size=4"])
  batch = next(iter(classification.make_train_dataset(config, 0, 1, seed=0)))
  assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["label"].dtype == tf.int32
  assert set(np.asarray(batch["label"]).tolist()) <= {0, 1, 2, 3}


def test_bad_files_and_zero_shot_are_one_line(files, tmp_path):
  text_only = tmp_path / "text.h5"
  with h5py.File(text_only, "w") as f:
    f.create_dataset("text", data=[b"a"])
  with pytest.raises(classification.ClassificationDataError,
                     match=r"^HDF5 file .*text.h5 has no column 'val_jpg' \(has: text\)$"):
    classification.labelled_source(f"hdf5:{text_only}", classification.EVAL)
  with pytest.raises(classification.ClassificationDataError,
                     match=r"^config.evals.classification.dataset: no HDF5 file at '/nowhere.h5'$"):
    classification.labelled_source("hdf5:/nowhere.h5", classification.EVAL,
                                   key="config.evals.classification.dataset")
  with pytest.raises(eval_sources.EvalDataError,
                     match=r"^config.eval_dataset='hdf5:.*': hdf5: sets have no class names"):
    eval_sources.classification_source(f"hdf5:{files[0]}", "templates_full")
