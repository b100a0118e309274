"""Tests for flip.data.demo on the real Fashion-MNIST files: the img2dataset layout, pixels and
labels against an independent idx reader, captions vs. evaluation prompts, idempotent and atomic
builds, the missing-data message, and the LAION pipeline reading the result."""

import gzip
import json
import os
import struct

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from flip.data import demo
from flip.data import eval_sources
from flip.data import laion

NUM_TRAIN, NUM_TEST, TRAIN_SHARDS = 120, 30, 4


def reference_idx(path):
  """A second idx reader (struct-based) to check the module's."""
  with gzip.open(path, "rb") as f:
    magic, = struct.unpack(">i", f.read(4))
    dims = struct.unpack(">" + "i" * (magic & 0xFF), f.read(4 * (magic & 0xFF)))
    return np.frombuffer(f.read(), np.uint8).reshape(dims)


def read_records(directory):
  files = sorted(f for f in os.listdir(directory) if f.endswith(".tfrecord"))
  examples = []
  for name in files:
    for raw in tf.data.TFRecordDataset(os.path.join(directory, name)):
      examples.append(tf.train.Example.FromString(raw.numpy()).features.feature)
  return files, examples


@pytest.fixture(scope="module")
def built(fashion_mnist_dir, tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("demo") / "demo"
  return demo.build_demo(str(fashion_mnist_dir), str(out_dir), num_train=NUM_TRAIN,
                         num_test=NUM_TEST, train_shards=TRAIN_SHARDS)


def test_train_split_in_img2dataset_layout(built, fashion_mnist_dir):
  images = reference_idx(fashion_mnist_dir / "train-images-idx3-ubyte.gz")[:NUM_TRAIN]
  labels = reference_idx(fashion_mnist_dir / "train-labels-idx1-ubyte.gz")[:NUM_TRAIN]
  files, examples = read_records(built.train_dir)
  assert files == [f"{i:05d}.tfrecord" for i in range(TRAIN_SHARDS)]
  assert len(examples) == NUM_TRAIN
  per_shard = NUM_TRAIN // TRAIN_SHARDS
  for i, feature in enumerate(examples):
    assert set(feature) == {"jpg", "txt", "key", "width", "height", "label"}
    assert feature["key"].bytes_list.value[0].decode() == f"{i // per_shard:05d}{i % per_shard:04d}"
    assert feature["width"].int64_list.value[0] == 28 == feature["height"].int64_list.value[0]
    assert feature["label"].int64_list.value[0] == labels[i]
    pixels = tf.io.decode_jpeg(feature["jpg"].bytes_list.value[0]).numpy()[..., 0]
    assert np.abs(pixels.astype(int) - images[i]).mean() < 4  # JPEG quality 95
    caption = feature["txt"].bytes_list.value[0].decode()
    assert any(phrase in caption for phrase in demo.CLASS_PHRASES[labels[i]]), caption


def test_captions_are_varied_seeded_and_not_eval_prompts(built, fashion_mnist_dir):
  _, examples = read_records(built.train_dir)
  captions = [f["txt"].bytes_list.value[0].decode() for f in examples]
  assert len(set(captions)) > NUM_TRAIN // 3
  labels = [f["label"].int64_list.value[0] for f in examples]
  assert demo.make_captions(labels, demo.DEFAULT_SEED) == captions
  assert demo.make_captions(labels, demo.DEFAULT_SEED + 1) != captions
  with open(built.classes_file) as f:
    meta = json.load(f)
  prompts = {t.format(c) for t in meta["templates"] for c in meta["classes"]}
  assert not prompts & set(captions)
  assert not set(demo.EVAL_TEMPLATES) & set(demo.TRAIN_TEMPLATES)


def test_test_split_and_class_file(built, fashion_mnist_dir):
  labels = reference_idx(fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz")[:NUM_TEST]
  _, examples = read_records(built.test_dir)
  assert [f["label"].int64_list.value[0] for f in examples] == labels.tolist()
  assert all("jpg" in f for f in examples)
  with open(built.classes_file) as f:
    meta = json.load(f)
  assert meta["classes"] == list(demo.CLASS_NAMES) and len(meta["classes"]) == 10
  # The evaluation side's reader accepts the split (flip.data.eval_sources).
  source = eval_sources.classification_source(f"demo:{built.out_dir}", "unused")
  assert source.num_examples == NUM_TEST and source.classnames == list(demo.CLASS_NAMES)


def test_rebuild_is_skipped_and_interrupted_builds_are_redone(built, fashion_mnist_dir, tmp_path):
  manifest = os.path.join(built.out_dir, demo.MANIFEST)
  mtime = os.path.getmtime(manifest)
  again = demo.build_demo(str(fashion_mnist_dir), built.out_dir, num_train=NUM_TRAIN,
                          num_test=NUM_TEST, train_shards=TRAIN_SHARDS)
  assert not again.built and os.path.getmtime(manifest) == mtime
  # An interrupted build: a directory with a partial split and no manifest.
  out_dir = tmp_path / "demo"
  (out_dir / "train").mkdir(parents=True)
  (out_dir / "train" / "00000.tfrecord").write_bytes(b"partial")
  small = dict(num_train=8, num_test=4, train_shards=2)
  paths = demo.build_demo(str(fashion_mnist_dir), str(out_dir), **small)
  assert paths.built and len(read_records(paths.train_dir)[1]) == 8
  # A damaged file of a complete build, or a different request, triggers a rebuild.
  with open(os.path.join(paths.train_dir, "00001.tfrecord"), "ab") as f:
    f.write(b"x")
  assert demo.build_demo(str(fashion_mnist_dir), str(out_dir), **small).built
  assert demo.build_demo(str(fashion_mnist_dir), str(out_dir), **dict(small, seed=3)).built
  assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]  # no staging left behind
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  with pytest.raises(demo.DemoDataError, match="refusing to replace"):
    demo.build_demo(str(fashion_mnist_dir), str(tmp_path / "mine"), **small)


def test_missing_data_names_the_package(tmp_path):
  with pytest.raises(demo.DemoDataError, match="apt-get install dataset-fashion-mnist"):
    demo.build_demo(str(tmp_path / "nowhere"), str(tmp_path / "out"))
  (tmp_path / "bad").mkdir()
  for name in demo.SPLIT_FILES["train"] + demo.SPLIT_FILES["test"]:
    with gzip.open(tmp_path / "bad" / name, "wb") as f:
      f.write(struct.pack(">iiii", demo.IDX_IMAGES_MAGIC, 2, 28, 28) + b"\x00" * 10)
  with pytest.raises(demo.DemoDataError, match="header announces shape"):
    demo.build_demo(str(tmp_path / "bad"), str(tmp_path / "out2"))


def test_training_pipeline_reads_the_demo_set(built):
  config = ml_collections.ConfigDict(dict(
      laion_path=built.train_dir, image_size=16, batch_size=8,
      aug=dict(area_range=(0.5, 1.0), aspect_ratio_range=(3 / 4, 4 / 3), flip=True,
               txt=dict(tokenizer="tf_bert", max_len=32, cls_token=False, spm_path=""))))
  batch = next(iter(laion.make_train_dataset(config, 0, 1, seed=0)))
  assert batch["image"].shape == (8, 16, 16, 3) and batch["txt"].shape == (8, 32)
  assert all(int(v) == 0 for v in batch["skipped"].values())
