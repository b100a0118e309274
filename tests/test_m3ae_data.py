"""M3AE's HDF5 input (flip.data.hdf5, flip.data.m3ae_input): files written here with h5py in each
layout are read back; corrupt JPEG bytes and empty captions are skipped and counted; a restored
iterator continues exactly; hosts read disjoint rows; the paired + text-only mixture.

References: the images are compared with PIL's decoding of the bytes written, the tokens with the
BERT vocabulary applied to the strings written.
"""

import io

import h5py
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from flip import config as config_lib
from flip.data import hdf5
from flip.data import m3ae_input
from flip.data import text as text_lib

tf.config.set_visible_devices([], "GPU")

SIZE = 16
CAPTIONS = [f"a photo of item number {i}" for i in range(12)]
TEXTS = [f"plain text sentence {i} without any image" for i in range(10)]


def jpeg(seed):
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


def pil_decoded(seed):
  return np.asarray(Image.open(io.BytesIO(jpeg(seed))).convert("RGB")).astype(int)


def write(path, columns):
  with h5py.File(path, "w") as f:
    for name, values in columns.items():
      if values and isinstance(values[0], (int, np.integer)):
        f.create_dataset(name, data=np.asarray(values, np.int64))
      elif name.endswith("jpg"):
        f.create_dataset(name, (len(values),), dtype=h5py.vlen_dtype(np.uint8))
        for row, value in enumerate(values):
          f[name][row] = np.frombuffer(value, np.uint8)
      else:
        f.create_dataset(name, data=values, dtype=h5py.string_dtype("utf-8"))
  return str(path)


def config_for(train, text_only="", batch=4, **overrides):
  args = [f"data.train={train}", f"data.text_only={text_only}", f"image_size={SIZE}",
          "model.model_img.patches.size=(4, 4)", f"batch_size={batch}", "aug.area_range=(1.0, 1.0)",
          "aug.aspect_ratio_range=(1.0, 1.0)", "aug.flip=False"]
  args += [f"{k}={v}" for k, v in overrides.items()]
  return config_lib.load_config("configs/cfg_m3ae_base.py:smoke", args)


def bert_tokens(strings, length):
  vocab = text_lib.BertUncasedVocabulary()
  return np.asarray(text_lib.tokenize(vocab, strings, length))


def take(ds, n):
  return [tf.nest.map_structure(np.asarray, b) for b in ds.take(n)]


@pytest.fixture(scope="module")
def paired_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("h5") / "paired.h5"
  return write(path, {"jpg": [jpeg(i) for i in range(12)],
                      "caption": [c.encode() for c in CAPTIONS]})


def test_paired_round_trip_gives_the_written_images_and_bert_tokens(paired_file):
  config = config_for(paired_file)
  ds = m3ae_input.make_example_dataset(config, 0, 1, seed=0, num_epochs=1)
  examples = [tf.nest.map_structure(np.asarray, e) for e in ds]
  assert len(examples) == 12
  expected_tokens = bert_tokens(CAPTIONS, 16)
  by_tokens = {tuple(t): i for i, t in enumerate(expected_tokens)}
  seen = set()
  for ex in examples:
    row = by_tokens[tuple(ex["text"])]
    seen.add(row)
    assert int(ex["paired"]) == 1
    # PIL's and TF's JPEG decoders differ by a few levels on noise images.
    errors = [np.mean(np.abs(ex["image"].astype(int) - pil_decoded(i))) for i in range(12)]
    assert errors[row] < 2.0 and int(np.argmin(errors)) == row
  assert seen == set(range(12))
  assert 101 not in expected_tokens and 102 not in expected_tokens  # no [CLS] / [SEP]
  assert int(examples[-1]["skipped"].sum()) == 0


def test_corrupt_jpeg_and_empty_captions_are_skipped_and_counted(tmp_path):
  images = [jpeg(i) for i in range(8)]
  captions = [c.encode() for c in CAPTIONS[:8]]
  images[2] = b"\xff\xd8 not really a jpeg"
  captions[5] = b""
  captions[6] = b"   "
  path = write(tmp_path / "bad.h5", {"jpg": images, "caption": captions})
  config = config_for(path)
  examples = [tf.nest.map_structure(np.asarray, e) for e in
              m3ae_input.make_example_dataset(config, 0, 1, seed=0, num_epochs=1,
                                              shuffle=False)]
  assert len(examples) == 5  # in file order, so the last (valid) row's counts include every skip
  counts = dict(zip(m3ae_input.SKIP_REASON_NAMES,
                    examples[-1]["skipped"][list(m3ae_input.SKIP_REASONS)]))
  assert counts["undecodable_image"] == 1 and counts["empty_caption"] == 2
  assert sum(counts.values()) == 3
  kept = {tuple(t) for t in bert_tokens([CAPTIONS[i] for i in (0, 1, 3, 4, 7)], 16)}
  assert {tuple(e["text"]) for e in examples} == kept


def test_text_only_round_trip_and_the_mixture_of_both_sources(tmp_path, paired_file):
  text_path = write(tmp_path / "text.h5", {"text": [t.encode() for t in TEXTS]})
  config = config_for(paired_file, text_path, batch=8, **{"data.text_only_rate": 0.5})
  assert m3ae_input.text_length(config) == 32
  examples = [tf.nest.map_structure(np.asarray, e) for e in
              m3ae_input.make_example_dataset(config, 0, 1, seed=0).take(200)]
  text_rows = [e for e in examples if int(e["paired"]) == 0]
  paired_rows = [e for e in examples if int(e["paired"]) == 1]
  assert 60 < len(text_rows) < 140
  expected = {tuple(t) for t in bert_tokens(TEXTS, 32)}
  assert {tuple(e["text"]) for e in text_rows} == expected
  assert all(not e["image"].any() for e in text_rows)
  assert all(not e["text"][16:].any() for e in paired_rows)  # captions stop at text_max_len
  batch = take(m3ae_input.make_train_dataset(config, 0, 1, seed=0), 1)[0]
  assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["text"].shape == (8, 32)
  assert set(batch["skipped"]) == set(m3ae_input.SKIP_REASON_NAMES)


def test_imagenet_layout_round_trip(tmp_path):
  path = write(tmp_path / "imagenet.h5", {"train_jpg": [jpeg(i) for i in range(6)],
                                          "train_labels": list(range(6)),
                                          "val_jpg": [jpeg(9)], "val_labels": [3]})
  ds, rows = hdf5.record_dataset([path], hdf5.imagenet_columns("train"), 0, 1, seed=0,
                                 shuffle=False, num_epochs=1)
  records = list(ds.as_numpy_iterator())
  assert rows == 6 and [int(r["label"]) for r in records] == list(range(6))
  assert [r["image"] for r in records] == [jpeg(i) for i in range(6)]
  val, _ = hdf5.record_dataset([path], hdf5.imagenet_columns("val"), 0, 1, seed=0,
                               num_epochs=1)
  assert [int(np.asarray(r["label"])) for r in val] == [3]
  with pytest.raises(hdf5.Hdf5DataError,
                     match=r"imagenet.h5 has no column 'jpg' \(has: train_jpg"):
    hdf5.record_dataset([path], hdf5.LAYOUTS[hdf5.PAIRED], 0, 1, seed=0)


def test_hosts_read_disjoint_rows_that_cover_the_file(paired_file):
  rows = []
  for shard in range(3):
    ds, count = hdf5.record_dataset([paired_file], hdf5.LAYOUTS[hdf5.PAIRED], shard, 3, seed=1,
                                    num_epochs=1)
    captions = [r["caption"].decode() for r in ds.as_numpy_iterator()]
    assert len(captions) == count == 4
    rows.append(set(captions))
  assert set.union(*rows) == set(CAPTIONS) and sum(len(r) for r in rows) == 12


def test_a_restored_iterator_continues_the_uninterrupted_stream(tmp_path, paired_file):
  text_path = write(tmp_path / "text.h5", {"text": [t.encode() for t in TEXTS]})
  config = config_for(paired_file, text_path, batch=4, **{"data.text_only_rate": 0.3})
  uninterrupted = take(m3ae_input.make_train_dataset(config, 0, 1, seed=3), 8)
  iterator = iter(m3ae_input.make_train_dataset(config, 0, 1, seed=3))
  for _ in range(5):  # past the first epoch of the paired file (12 rows): mid-file, second epoch
    next(iterator)
  checkpoint = tf.train.Checkpoint(iterator=iterator)
  saved = checkpoint.write(str(tmp_path / "ckpt"))
  restored_iterator = iter(m3ae_input.make_train_dataset(config, 0, 1, seed=3))
  tf.train.Checkpoint(iterator=restored_iterator).read(saved).assert_consumed()
  for expected in uninterrupted[5:]:
    got = tf.nest.map_structure(np.asarray, next(restored_iterator))
    for key in ("image", "text", "paired"):
      np.testing.assert_array_equal(got[key], expected[key])
    assert got["skipped"] == expected["skipped"]
