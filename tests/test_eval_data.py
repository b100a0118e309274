"""Tests for flip.data.eval_sources and flip.data.dataset_spec: the data-set name grammar, tfds,
image-folder, demo-split and caption sources, sharding."""

import json
import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from flip.data import classification
from flip.data import dataset_spec
from flip.data import eval_sources

IMAGE_SIZE = 8
FOLDER_CLASSES = {"a_cat": "cat", "b_dog": "dog", "c_car": "race car"}


def write_image(path, array, fmt):
  encode = tf.io.encode_png if fmt == "png" else tf.io.encode_jpeg
  tf.io.write_file(path, encode(tf.constant(array, tf.uint8)))


def collect(source, num_shards=1, image_size=IMAGE_SIZE):
  """Every shard's examples, as lists per shard."""
  return [list(source.dataset(i, num_shards, image_size).as_numpy_iterator())
          for i in range(num_shards)]


@pytest.fixture
def image_folder(tmp_path):
  """Three classes; grey PNG, RGB JPEG (non-square), RGBA PNG; a stray text file."""
  root = tmp_path / "folder"
  for name in FOLDER_CLASSES:
    (root / name).mkdir(parents=True)
  write_image(str(root / "a_cat" / "grey.png"), np.full((10, 10, 1), 90), "png")
  write_image(str(root / "a_cat" / "rgb.jpg"), np.full((12, 20, 3), (200, 40, 40)), "jpeg")
  write_image(str(root / "b_dog" / "rgba.PNG"), np.full((9, 9, 4), (10, 220, 30, 255)), "png")
  write_image(str(root / "c_car" / "x.png"), np.full((16, 16, 3), (0, 0, 250)), "png")
  write_image(str(root / "c_car" / "y.jpeg"), np.full((16, 8, 3), (128, 128, 128)), "jpeg")
  (root / "c_car" / "notes.txt").write_text("not an image")
  (root / "classnames.txt").write_text("cat\ndog\nrace car\n")
  return root


def test_image_folder_decodes_grey_rgba_png_jpeg(image_folder):
  source = eval_sources.classification_source(f"folder:{image_folder}", "templates_short")
  assert source.classnames == ["cat", "dog", "race car"]
  assert source.name == "folder"
  assert source.num_examples == 5
  (examples,) = collect(source)
  expected = [(0, (90, 90, 90)), (0, (200, 40, 40)), (1, (10, 220, 30)), (2, (0, 0, 250)),
              (2, (128, 128, 128))]
  assert len(examples) == len(expected)
  for example, (label, rgb) in zip(examples, expected):
    assert example["image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert example["image"].dtype == np.uint8
    assert example["label"] == label
    np.testing.assert_allclose(example["image"].reshape(-1, 3).mean(0), rgb, atol=4)


def test_image_folder_plain_path_and_json_classnames(image_folder, tmp_path):
  mapping = tmp_path / "names.json"
  mapping.write_text(json.dumps({"c_car": "automobile", "a_cat": "kitty", "b_dog": "puppy"}))
  source = eval_sources.classification_source(str(image_folder), "templates_none",
                                          classnames_file=str(mapping), max_images=2)
  assert source.classnames == ["kitty", "puppy", "automobile"]
  assert source.templates == ["{}"]
  assert source.num_examples == 2
  assert [ex["label"] for ex in collect(source)[0]] == [0, 0]


def test_image_folder_classname_errors(image_folder, tmp_path):
  (image_folder / "classnames.txt").write_text("cat\ndog\n")
  with pytest.raises(eval_sources.EvalDataError, match="lists 2 class names but there are 3"):
    eval_sources.classification_source(f"folder:{image_folder}", "templates_short")
  partial = tmp_path / "partial.json"
  partial.write_text(json.dumps({"a_cat": "cat"}))
  with pytest.raises(eval_sources.EvalDataError, match="no class name for folder 'b_dog'"):
    eval_sources.classification_source(f"folder:{image_folder}", "templates_short", str(partial))
  with pytest.raises(eval_sources.EvalDataError, match="class-name file not found: .*missing.txt"):
    eval_sources.classification_source(f"folder:{image_folder}", "templates_short",
                                   str(tmp_path / "missing.txt"))
  with pytest.raises(eval_sources.EvalDataError, match="image folder not found"):
    eval_sources.classification_source(f"folder:{tmp_path}/nope", "templates_short")


def test_imagenet_assets_and_templates():
  data = eval_sources.load_imagenet_zeroshot()
  assert data["classes"] and all(isinstance(c, str) and c for c in data["classes"])
  for key in ("templates_full", "templates_short", "templates_none"):
    templates = eval_sources.imagenet_templates(key)
    assert templates == data[key] and all("{}" in t for t in templates)
  with pytest.raises(eval_sources.EvalDataError, match="templates='templates_80' is not in"):
    eval_sources.imagenet_templates("templates_80")
  with pytest.raises(eval_sources.EvalDataError, match="has no '{}' placeholder"):
    eval_sources.check_templates(["a photo"], "x.json")


def write_demo_split(split_dir, labels, classes, templates):
  split_dir.mkdir(parents=True)
  files = [split_dir / "test-00000.tfrecord", split_dir / "test-00001.tfrecord"]
  half = (len(labels) + 1) // 2
  for file_index, path in enumerate(files):
    with tf.io.TFRecordWriter(str(path)) as writer:
      for i in range(file_index * half, min(len(labels), (file_index + 1) * half)):
        pixels = np.full((28, 28, 1), i * 8, np.uint8)
        feature = {
            "jpg": tf.train.Feature(bytes_list=tf.train.BytesList(
                value=[tf.io.encode_jpeg(pixels, quality=100).numpy()])),
            "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(labels[i])])),
        }
        writer.write(tf.train.Example(features=tf.train.Features(feature=feature))
                     .SerializeToString())
  (split_dir / "classes.json").write_text(json.dumps({"classes": classes,
                                                      "templates": templates}))


def test_demo_split_from_dir_or_parent_and_sharding(tmp_path):
  labels = [i % 4 for i in range(13)]
  classes = ["shirt", "trouser", "bag", "sneaker"]
  write_demo_split(tmp_path / "demo" / "test", labels, classes, ["a picture of a {}"])
  for spec in (f"demo:{tmp_path}/demo", f"demo:{tmp_path}/demo/test"):
    source = eval_sources.classification_source(spec, "templates_full")
    assert source.classnames == classes
    assert source.templates == ["a picture of a {}"]
    assert source.num_examples == 13
  shards = collect(source, num_shards=3)
  assert all(len(s) <= eval_sources.max_shard_size(13, 3) for s in shards)
  seen = sorted(int(round(ex["image"].mean() / 8)) for s in shards for ex in s)
  assert seen == list(range(13))
  by_index = {int(round(ex["image"].mean() / 8)): ex["label"] for s in shards for ex in s}
  assert [by_index[i] for i in range(13)] == labels

  capped = eval_sources.classification_source(f"demo:{tmp_path}/demo", "x", max_images=5)
  assert capped.num_examples == 5
  assert sum(len(s) for s in collect(capped, num_shards=2)) == 5
  with pytest.raises(eval_sources.EvalDataError, match="demo test split not found"):
    eval_sources.classification_source(f"demo:{tmp_path}", "x")


def test_caption_source_reads_laion_layout(tmp_path):
  captions = ["a red square", "two blue cats", "", "a grey dog"]
  path = tmp_path / "captions" / "00000.tfrecord"
  path.parent.mkdir()
  with tf.io.TFRecordWriter(str(path)) as writer:
    for i, caption in enumerate(captions):
      pixels = np.full((8 + i, 12, 3), 30 * i, np.uint8)
      feature = {
          "jpg": tf.train.Feature(bytes_list=tf.train.BytesList(
              value=[tf.io.encode_jpeg(pixels, quality=100).numpy()])),
          "txt": tf.train.Feature(bytes_list=tf.train.BytesList(value=[caption.encode()])),
          "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"{i:09d}".encode()])),
          "width": tf.train.Feature(int64_list=tf.train.Int64List(value=[12])),
      }
      writer.write(tf.train.Example(features=tf.train.Features(feature=feature))
                   .SerializeToString())
    corrupt = {"jpg": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"\xff\xd8junk"])),
               "txt": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"broken image"]))}
    writer.write(tf.train.Example(features=tf.train.Features(feature=corrupt))
                 .SerializeToString())
  (path.parent / "00000_stats.json").write_text("{}")  # img2dataset writes these beside
  source = eval_sources.caption_source(str(path.parent))
  assert source.num_examples == 5 and source.name == "captions"
  (examples,) = collect(source)
  assert [ex["caption"].decode() for ex in examples] == captions  # the corrupt pair is dropped
  for i, ex in enumerate(examples):
    assert ex["image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert abs(float(ex["image"].mean()) - 30 * i) < 3
  capped = eval_sources.caption_source(str(path.parent / "*.tfrecord"), max_images=3)
  assert capped.num_examples == 3
  with pytest.raises(eval_sources.EvalDataError, match="no TFRecord files at"):
    eval_sources.caption_source(str(tmp_path / "none"))


class TinyEvalSet(tfds.core.GeneratorBasedBuilder):
  """11 constant-colour images in 3 classes, validation split only."""
  VERSION = tfds.core.Version("1.0.0")
  NUM_EXAMPLES = 11

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(names=["ant", "bee", "cow"])}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"validation": self._generate_examples()}

  def _generate_examples(self):
    for i in range(self.NUM_EXAMPLES):
      yield i, {"image": np.full((6, 10, 3), 20 * i, np.uint8), "label": i % 3}


def test_tfds_source_counts_and_shards(tmp_path, monkeypatch):
  TinyEvalSet(data_dir=str(tmp_path)).download_and_prepare()
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  source = eval_sources.classification_source("tiny_eval_set:1.*.*", "templates_short")
  assert source.name == "tiny_eval_set"
  assert source.classnames == ["ant", "bee", "cow"]
  assert source.num_examples == TinyEvalSet.NUM_EXAMPLES
  assert source.templates == eval_sources.imagenet_templates("templates_short")
  shards = collect(source, num_shards=4)
  assert max(len(s) for s in shards) <= math.ceil(TinyEvalSet.NUM_EXAMPLES / 4)
  values = sorted(int(round(ex["image"].mean() / 20)) for s in shards for ex in s)
  assert values == list(range(TinyEvalSet.NUM_EXAMPLES))
  for ex in (ex for s in shards for ex in s):
    assert ex["label"] == int(round(ex["image"].mean() / 20)) % 3

  capped = eval_sources.classification_source("tiny_eval_set", "templates_none", max_images=4)
  assert capped.num_examples == 4
  assert sum(len(s) for s in collect(capped, num_shards=3)) == 4


def test_missing_tfds_dataset_is_one_line(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with pytest.raises(eval_sources.EvalDataError) as err:
    eval_sources.classification_source("imagenet2012:5.*.*", "templates_full")
  message = str(err.value)
  assert "\n" not in message
  assert "imagenet2012:5.*.*" in message and f"TFDS_DATA_DIR={tmp_path}" in message


def test_dataset_spec_grammar(tmp_path):
  spec_of = dataset_spec.DatasetSpec
  assert dataset_spec.parse("demo:data/demo", "k") == spec_of(dataset_spec.DEMO, path="data/demo")
  missing = f"{tmp_path}/missing"
  assert dataset_spec.parse(f"folder:{missing}", "k") == spec_of(dataset_spec.FOLDER, path=missing)
  assert dataset_spec.parse(str(tmp_path), "k") == spec_of(dataset_spec.FOLDER, path=str(tmp_path))
  tfds_spec = dataset_spec.parse("imagenet2012:5.*.*", "k")
  assert tfds_spec == spec_of(dataset_spec.TFDS, tfds_name="imagenet2012:5.*.*")
  assert tfds_spec.name == "imagenet2012"
  assert dataset_spec.parse(missing, "k").kind == dataset_spec.TFDS  # not a directory
  for bad, words in (("", "is empty"), ("demo:", "names no directory"),
                     ("folder:", "names no directory")):
    with pytest.raises(dataset_spec.DatasetError) as err:
      dataset_spec.parse(bad, "config.data.eval")
    message = str(err.value)
    assert message.startswith("config.data.eval") and words in message and "\n" not in message


def test_classification_reads_the_same_grammar(image_folder, tmp_path, monkeypatch):
  zero_shot = eval_sources.classification_source(f"folder:{image_folder}", "templates_short")
  labelled = classification.labelled_source(str(image_folder), classification.EVAL)
  assert labelled.classnames == sorted(FOLDER_CLASSES)  # the folder names, not classnames.txt
  assert zero_shot.classnames == list(FOLDER_CLASSES.values())
  assert labelled.templates == []
  labels = [0, 0, 1, 2, 2]  # sorted folders, sorted files
  assert [int(ex["label"]) for ex in collect(labelled)[0]] == labels
  assert [int(ex["label"]) for ex in collect(zero_shot)[0]] == labels

  TinyEvalSet(data_dir=str(tmp_path / "tfds")).download_and_prepare()
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  labelled = classification.labelled_source("tiny_eval_set:1.*.*", classification.EVAL)
  assert labelled.name == "tiny_eval_set" and labelled.classnames == ["ant", "bee", "cow"]
  assert labelled.num_examples == TinyEvalSet.NUM_EXAMPLES
  with pytest.raises(classification.ClassificationDataError,
                     match=r"'tiny_eval_set' has none of the splits \('train',\)"):
    classification.labelled_source("tiny_eval_set", classification.TRAIN)

  with pytest.raises(eval_sources.EvalDataError, match="^config.evals.0.dataset is empty"):
    eval_sources.classification_source("", "x", key="config.evals.0.dataset")
  with pytest.raises(classification.ClassificationDataError, match="^config.data.eval is empty"):
    classification.labelled_source("", classification.EVAL, key="config.data.eval")


def test_classification_demo_split_whole_files_per_shard(tmp_path):
  labels = [i % 4 for i in range(13)]
  write_demo_split(tmp_path / "demo" / "test", labels, ["a", "b", "c", "d"], ["{}"])
  source = classification.labelled_source(f"demo:{tmp_path}/demo", classification.EVAL)
  assert source.num_examples == 13

  def indices(shard):
    return [int(round(ex["image"].mean() / 8)) for ex in shard]
  shards = collect(source, num_shards=2)
  assert [indices(s) for s in shards] == [list(range(7)), list(range(7, 13))]  # one file each
  assert [int(ex["label"]) for s in shards for ex in s] == labels
  capped = classification.labelled_source(f"demo:{tmp_path}/demo/test", classification.EVAL,
                                          max_images=5)
  assert [indices(s) for s in collect(capped, num_shards=2)] == [[0, 2, 4], [1, 3]]
