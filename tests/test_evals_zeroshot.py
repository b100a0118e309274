"""Zero-shot classification and retrieval (flip.evals.zeroshot, flip.evals.retrieval), the shared
core's padding and counting (flip.evals.core), and eval_only of a FLIP checkpoint
(flip.evals.eval_only).

Fake encoders keep most tests to milliseconds of compute; references are float64 numpy.
"""

import dataclasses
import json
import os
import pathlib
from typing import Callable, List

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from flip import builders
from flip import checkpoints
from flip import partitioning
from flip.evals import core
from flip.evals import eval_only
from flip.evals import registry
from flip.evals import retrieval
from flip.evals import zeroshot

P = jax.sharding.PartitionSpec
IMAGE_SIZE = 4
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def partitioner():
  """data=4 x model=2 over the 8 simulated CPU devices."""
  return partitioning.FlipPjitPartitioner(num_partitions=2, mesh_shape=(4, 2))


@dataclasses.dataclass
class InMemorySource:
  """A source of already decoded images: the evaluator's duck-typed source interface."""
  name: str
  classnames: List[str]
  templates: List[str]
  images: np.ndarray
  labels: np.ndarray

  @property
  def num_examples(self) -> int:
    return len(self.images)

  def dataset(self, shard_index, num_shards, image_size):
    del image_size
    ds = tf.data.Dataset.from_tensor_slices({"image": self.images, "label": self.labels})
    return ds.shard(num_shards, shard_index)


@dataclasses.dataclass
class InMemoryCaptions:
  name: str
  images: np.ndarray
  captions: List[str]

  @property
  def num_examples(self) -> int:
    return len(self.images)

  def dataset(self, shard_index, num_shards, image_size):
    del image_size
    ds = tf.data.Dataset.from_tensor_slices({"image": self.images, "caption": self.captions})
    return ds.shard(num_shards, shard_index)


def class_names(num_classes: int) -> List[str]:
  return [f"cls{i:03d}" for i in range(num_classes)]


def name_tokenizer(classnames: List[str], templates: List[str], max_len: int = 3) -> Callable:
  """Prompt -> [class id + 1, template id + 1, 0]; unknown words -> 0 (pad)."""
  def tokenize(strings):
    out = np.zeros((len(strings), max_len), np.int32)
    for row, text in enumerate(strings):
      for c, name in enumerate(classnames):
        if name in text:
          out[row, 0] = c + 1
          text = text.replace(name, "{}")
      for t, template in enumerate(templates):
        if text == template:
          out[row, 1] = t + 1
    return out
  return tokenize


def constant_images(values: np.ndarray) -> np.ndarray:
  return np.broadcast_to(np.asarray(values, np.uint8)[:, None, None, None],
                         (len(values), IMAGE_SIZE, IMAGE_SIZE, 3)).copy()


def one_hot_evaluator(partitioner, num_classes, batch_size, templates):
  """Image embedding = one-hot of the pixel value; text embedding = one-hot of the class name."""
  dim = num_classes + 1

  def encode_image(params, images):
    return jax.nn.one_hot(images[:, 0, 0, 0].astype(jnp.int32), dim) * params["scale"]

  def encode_text(params, tokens):
    return jax.nn.one_hot(tokens[:, 0] - 1, dim) * params["scale"]

  params = {"scale": jnp.ones(())}
  ev = zeroshot.ZeroShotClassifier(partitioner, encode_image, encode_text,
                                   params_axes={"scale": P()},
                                   tokenize=name_tokenizer(class_names(num_classes), templates),
                                   image_size=IMAGE_SIZE, batch_size=batch_size)
  return ev, params


TEMPLATES = ["a photo of a {}.", "itap of the {}.", "{}"]


def test_one_hot_model_scores_100_percent(partitioner):
  num_classes, num_images = 12, 37
  labels = np.arange(num_images) % num_classes
  source = InMemorySource("toy", class_names(num_classes), TEMPLATES, constant_images(labels),
                          labels)
  ev, params = one_hot_evaluator(partitioner, num_classes, 8, TEMPLATES)
  metrics = ev.zeroshot(params, source)
  assert metrics == {"zeroshot/toy/top1": 1.0, "zeroshot/toy/top5": 1.0,
                     "zeroshot/toy/num_images": 37.0}


def test_shuffled_labels_score_near_chance(partitioner):
  num_classes, num_images = 10, 400
  rng = np.random.RandomState(0)
  true = rng.randint(0, num_classes, num_images)
  shuffled = rng.permutation(true)
  source = InMemorySource("shuf", class_names(num_classes), TEMPLATES, constant_images(true),
                          shuffled)
  ev, params = one_hot_evaluator(partitioner, num_classes, 16, TEMPLATES)
  metrics = ev.zeroshot(params, source)
  top1 = metrics["zeroshot/shuf/top1"]
  # Exactly the images whose shuffled label happens to equal the true class; ties (every wrong
  # class scores 0) count against the model, so top-5 gains nothing here.
  assert top1 == pytest.approx(np.mean(true == shuffled))
  assert abs(top1 - 1.0 / num_classes) < 0.05
  assert metrics["zeroshot/shuf/top5"] == pytest.approx(top1)


def test_partial_last_batch_counted_exactly_once(partitioner):
  """10 images, global batch 4 (data axis 4): the last batch holds 2 images and 2 paddings."""
  num_classes = 3
  true = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 1])
  labels = true.copy()
  labels[[3, 9]] = [1, 2]  # two wrong labels, one of them in the partial last batch
  source = InMemorySource("ten", class_names(num_classes), TEMPLATES, constant_images(true), labels)
  ev, params = one_hot_evaluator(partitioner, num_classes, 4, TEMPLATES)
  num_batches, _ = ev.sharded.local_batches(source)
  assert num_batches == 3
  metrics = ev.zeroshot(params, source)
  # Padding is image 0 / label 0 (a "correct" example): counted, it would give 10/12.
  assert metrics["zeroshot/ten/num_images"] == 10
  assert metrics["zeroshot/ten/top1"] == pytest.approx(8 / 10)
  assert metrics["zeroshot/ten/top5"] == 1.0  # k capped at 3 classes


def test_padded_shards_cover_every_example_once(partitioner):
  """Per-process shards (simulated layouts) have equal batch counts and partition the data."""
  num_images = 23
  labels = np.arange(num_images) % 5
  source = InMemorySource("s", class_names(5), TEMPLATES, constant_images(np.arange(num_images)),
                          labels)
  ev, _ = one_hot_evaluator(partitioner, 5, 8, TEMPLATES)
  seen, counts = [], set()
  sharded = ev.sharded
  for shard in range(3):
    sharded.layout = dataclasses.replace(sharded.layout, shard_id=shard, num_shards=3)
    sharded.local_batch = 2
    num_batches, batches = sharded.local_batches(source)
    batches = list(batches)
    counts.add((num_batches, len(batches)))
    for batch in batches:
      assert batch["image"].shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
      seen.extend(batch["image"][batch["valid"], 0, 0, 0].tolist())
  assert counts == {(4, 4)}  # ceil(ceil(23 / 3) / 2)
  assert sorted(seen) == list(range(num_images))


def linear_model(rng, num_features, vocab, dim):
  return {"img": jnp.asarray(rng.randn(num_features, dim), jnp.float32),
          "txt": jnp.asarray(rng.randn(vocab, dim), jnp.float32)}


def linear_encoders():
  def encode_image(params, images):
    feats = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
    return jnp.dot(feats, params["img"], precision=jax.lax.Precision.HIGHEST)

  def encode_text(params, tokens):
    emb = params["txt"][tokens] * (tokens > 0)[..., None]
    return jnp.sum(emb, axis=1)
  return encode_image, encode_text


def np_text_embedding(params, tokens):
  table = np.asarray(params["txt"], np.float64)
  return np.sum(table[tokens] * (tokens > 0)[..., None], axis=1)


def test_classifier_weights_match_float64_reference(partitioner):
  rng = np.random.RandomState(1)
  num_classes, dim = 7, 6
  names, templates = class_names(num_classes), TEMPLATES
  tokenize = name_tokenizer(names, templates)
  params = linear_model(rng, 3, num_classes + len(templates) + 1, dim)
  # Text embeddings of different norms per template: averaging normalised vectors matters.
  params["txt"] = params["txt"] * jnp.arange(1, params["txt"].shape[0] + 1)[:, None]
  encode_image, encode_text = linear_encoders()
  ev = zeroshot.ZeroShotClassifier(partitioner, encode_image, encode_text,
                                   params_axes={"img": P(None, "model"), "txt": P(None, "model")},
                                   tokenize=tokenize, image_size=IMAGE_SIZE, batch_size=4)
  weights = ev.classifier_weights(params, names, templates)

  reference = np.zeros((dim, num_classes))
  for c, name in enumerate(names):
    emb = np_text_embedding(params, tokenize([t.replace("{}", name) for t in templates]))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    mean = emb.mean(axis=0)
    reference[:, c] = mean / np.linalg.norm(mean)
  assert weights.shape == (dim, num_classes)
  np.testing.assert_allclose(weights, reference, rtol=1e-5, atol=1e-6)


def test_topk_matches_numpy_reference_and_top5_at_least_top1(partitioner):
  rng = np.random.RandomState(2)
  num_classes, num_images, dim = 9, 45, 6
  names = class_names(num_classes)
  params = linear_model(rng, IMAGE_SIZE * IMAGE_SIZE * 3, num_classes + len(TEMPLATES) + 1, dim)
  images = rng.randint(0, 256, (num_images, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
  labels = rng.randint(0, num_classes, num_images)
  encode_image, encode_text = linear_encoders()
  tokenize = name_tokenizer(names, TEMPLATES)
  ev = zeroshot.ZeroShotClassifier(partitioner, encode_image, encode_text,
                                   params_axes={"img": P(None, "model"), "txt": P(None, "model")},
                                   tokenize=tokenize, image_size=IMAGE_SIZE, batch_size=8)
  metrics = ev.zeroshot(params, InMemorySource("rand", names, TEMPLATES, images, labels))

  weights = ev.classifier_weights(params, names, TEMPLATES).astype(np.float64)
  feats = images.reshape(num_images, -1).astype(np.float64) / 255.0
  emb = feats @ np.asarray(params["img"], np.float64)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  order = np.argsort(-(emb @ weights), axis=1)
  ref_top1 = np.mean(order[:, 0] == labels)
  ref_top5 = np.mean([labels[i] in order[i, :5] for i in range(num_images)])
  assert metrics["zeroshot/rand/top1"] == pytest.approx(ref_top1)
  assert metrics["zeroshot/rand/top5"] == pytest.approx(ref_top5)
  assert metrics["zeroshot/rand/top5"] >= metrics["zeroshot/rand/top1"]
  assert 0.0 < ref_top1 < ref_top5 < 1.0  # the case is not degenerate


def test_label_outside_classes_is_refused(partitioner):
  source = InMemorySource("bad", class_names(3), TEMPLATES, constant_images(np.zeros(4)),
                          np.array([0, 1, 3, 2]))
  ev, params = one_hot_evaluator(partitioner, 3, 4, TEMPLATES)
  with pytest.raises(core.EvalError, match="'bad' has label 3 outside"):
    ev.zeroshot(params, source)


def test_batch_size_must_divide_over_data_axis(partitioner):
  with pytest.raises(core.EvalError, match="config.evals.zeroshot.batch_size 6"):
    one_hot_evaluator(partitioner, 3, 6, TEMPLATES)


def test_prompts_and_canonicalisation():
  prompts = zeroshot.class_prompts(["T-shirt/top", "Ankle  boot"], ["a photo of the {}.", "{}"])
  assert prompts == ["a photo of the T-shirt/top.", "T-shirt/top", "a photo of the Ankle  boot.",
                     "Ankle  boot"]
  canon = zeroshot.class_prompts(["T-shirt/top", "Ankle  boot"], ["A photo of the {}!", "{}"],
                                 canonicalize=True)
  assert canon == ["a photo of the tshirttop", "tshirttop", "a photo of the ankle boot",
                   "ankle boot"]
  assert zeroshot.canonicalize_text("  Jack-o'-lantern,\tGreat   WHITE shark. ") == (
      "jackolantern great white shark")


def test_retrieval_metrics_hand_computed():
  # Similarities (rows: images, cols: texts), all vectors unit length:
  #   img0=(1,0)  img1=(0,1)  img2=(.6,.8);  txt0=(.8,.6) txt1=(.6,.8) txt2=(1,0)
  #   img0: .8  .6  1.   -> pair 0 scores .8, beaten by txt2      -> rank 1
  #   img1: .6  .8  0.   -> pair 1 is best                          -> rank 0
  #   img2: .96 1.  .6   -> pair 2 is worst                         -> rank 2
  #   text->image columns: txt0 (.8, .6, .96) rank 1; txt1 (.6, .8, 1.) rank 1; txt2 (1, 0, .6) 1
  img = np.array([[1, 0], [0, 1], [0.6, 0.8]])
  txt = np.array([[0.8, 0.6], [0.6, 0.8], [1, 0]])
  np.testing.assert_array_equal(retrieval.pair_ranks(img, txt), [1, 0, 2])
  np.testing.assert_array_equal(retrieval.pair_ranks(txt, img), [1, 1, 1])
  metrics = retrieval.retrieval_metrics(img, txt, ks=(1, 2, 3))
  assert metrics["i2t_r1"] == pytest.approx(1 / 3)
  assert metrics["i2t_r2"] == pytest.approx(2 / 3)
  assert metrics["i2t_r3"] == 1.0
  assert metrics["t2i_r1"] == 0.0
  assert metrics["t2i_r2"] == 1.0


def test_retrieval_ties_count_against():
  same = np.ones((4, 3))
  metrics = retrieval.retrieval_metrics(same, same, ks=(1, 4))
  assert metrics == {"i2t_r1": 0.0, "t2i_r1": 0.0, "i2t_r4": 1.0, "t2i_r4": 1.0}


def test_sharded_retrieval_matches_host_reference(partitioner):
  rng = np.random.RandomState(3)
  num_pairs, dim, vocab = 11, 4, 20
  params = linear_model(rng, IMAGE_SIZE * IMAGE_SIZE * 3, vocab, dim)
  images = rng.randint(0, 256, (num_pairs, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
  tokens = rng.randint(1, vocab, (num_pairs, 3)).astype(np.int32)
  captions = [" ".join(map(str, row)) for row in tokens]
  tokenize = lambda strings: np.asarray([[int(w) for w in s.split()] or [0, 0, 0]
                                         for s in strings], np.int32)
  encode_image, encode_text = linear_encoders()
  ev = retrieval.Retrieval(partitioner, encode_image, encode_text,
                           params_axes={"img": P(None, "model"), "txt": P(None, "model")},
                           tokenize=tokenize, image_size=IMAGE_SIZE, batch_size=4)
  metrics = ev.retrieval(params, InMemoryCaptions("caps", images, captions))
  img = images.reshape(num_pairs, -1).astype(np.float64) / 255.0 @ np.asarray(params["img"])
  txt = np_text_embedding(params, tokens)
  reference = retrieval.retrieval_metrics(img, txt)
  assert metrics["retrieval/caps/num_pairs"] == num_pairs
  assert metrics["retrieval/caps/num_skipped"] == 0
  for key, value in reference.items():
    assert metrics[f"retrieval/caps/{key}"] == pytest.approx(value)


def test_zeroshot_settings_defaults_and_unknown_key():
  config = ml_collections.ConfigDict({"eval_every_epochs": 2.0})
  entry = ml_collections.ConfigDict({"type": "zeroshot", "dataset": "x"})
  cls = registry.evaluator_class("zeroshot")
  assert registry.resolve_settings("zs", entry, cls, config) == {
      "type": "zeroshot", "dataset": "x", "batch_size": 1024, "every_epochs": 2.0,
      "templates": "templates_full", "canonicalize": False, "classnames_file": "",
      "max_images": 0}
  entry.update({"templates": "templates_short", "batch_size": 8})
  settings = registry.resolve_settings("zs", entry, cls, config)
  assert (settings["templates"], settings["batch_size"]) == ("templates_short", 8)
  entry.max_imgs = 3
  with pytest.raises(core.EvalError, match="config.evals.zs.max_imgs"):
    registry.resolve_settings("zs", entry, cls, config)


# --- end to end on a smoke-size FLIP model ------------------------------------------------------

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
EVAL_TEMPLATES = ["a product photo of a {}.", "an item of clothing: {}"]
NUM_EVAL_IMAGES = 20


def read_fashion_mnist_test(directory, count):
  import gzip  # pylint: disable=g-import-not-at-top
  with gzip.open(os.path.join(directory, "t10k-images-idx3-ubyte.gz")) as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:count]
  with gzip.open(os.path.join(directory, "t10k-labels-idx1-ubyte.gz")) as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)[:count]
  return images, labels


def write_demo_test_split(split_dir, images, labels):
  """The demo's held-out layout: TFRecords of `jpg` + `label`, and classes.json."""
  os.makedirs(split_dir)
  with tf.io.TFRecordWriter(os.path.join(split_dir, "test-00000-of-00001.tfrecord")) as writer:
    for image, label in zip(images, labels):
      feature = {
          "jpg": tf.train.Feature(bytes_list=tf.train.BytesList(
              value=[tf.io.encode_jpeg(image[..., None]).numpy()])),
          "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
      }
      writer.write(tf.train.Example(features=tf.train.Features(feature=feature))
                   .SerializeToString())
  with open(os.path.join(split_dir, "classes.json"), "w") as f:
    json.dump({"classes": FASHION_CLASSES, "templates": EVAL_TEMPLATES}, f)


def smoke_config(demo_dir, **overrides):
  from flip import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(f"{REPO_ROOT}/configs/cfg_flip_large.py:smoke", [
      "num_train_steps=1", "log_every_steps=1", "checkpoint_every_steps=1",
      "eval_every_epochs=0", "laion_path=", f"eval_dataset=demo:{demo_dir}",
      # data=4 x model=2: parameters sharded over 'model' as in training (the vocabulary padded
      # to an even size: FLIP's 30523 rows cannot be split in two).
      "partitioning.num_partitions=2", "partitioning.mesh_shape=(4, 2)",
      "model.model_txt.vocab_size=30528", "evals.zeroshot.templates=templates_short",
      "evals.zeroshot.batch_size=8"])
  with config.unlocked():
    config.update(overrides)
  return config


def synthetic_train_data(config, shard_index, num_shards, seed):
  del shard_index, seed
  rng = np.random.RandomState(0)
  images = rng.randint(0, 255, (32, config.image_size, config.image_size, 3)).astype(np.uint8)
  tokens = rng.randint(1, 1000, (32, config.aug.txt.max_len)).astype(np.int32)
  return tf.data.Dataset.from_tensor_slices({"image": images, "txt": tokens}).repeat().batch(
      config.batch_size // num_shards, drop_remainder=True)


@pytest.fixture(scope="module")
def trained_smoke(tmp_path_factory, fashion_mnist_dir):
  """One training step with the zero-shot evaluator, on 20 real Fashion-MNIST test images."""
  from flip import train  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("smoke")
  images, labels = read_fashion_mnist_test(fashion_mnist_dir, NUM_EVAL_IMAGES)
  write_demo_test_split(str(root / "demo" / "test"), images, labels)
  config = smoke_config(root / "demo")
  workdir = str(root / "workdir")
  result = train.train_and_evaluate(config, workdir, make_dataset=synthetic_train_data)
  return config, workdir, result


def test_training_hook_and_eval_only_agree(trained_smoke, monkeypatch):
  from flip.tasks import contrastive  # pylint: disable=g-import-not-at-top
  config, workdir, result = trained_smoke
  hook_metrics = {k: v for k, v in result["metrics"].items() if k.startswith("zeroshot/")}
  assert hook_metrics["zeroshot/demo/num_images"] == NUM_EVAL_IMAGES
  assert 0.0 <= hook_metrics["zeroshot/demo/top1"] <= hook_metrics["zeroshot/demo/top5"] <= 1.0

  def no_training_data(*args, **kwargs):
    raise AssertionError("eval_only must not open the training data")
  monkeypatch.setattr(contrastive.FlipTask, "train_dataset", no_training_data)
  eval_config = smoke_config(config.eval_dataset[len("demo:"):], eval_only=True,
                             pretrain_dir=os.path.join(workdir, "checkpoint_1"))
  assert not eval_config.laion_path
  metrics = eval_only.run_eval_only(eval_config, workdir)
  assert metrics == pytest.approx(hook_metrics)


def test_eval_checkpoint_falls_back_to_latest_in_workdir(trained_smoke, tmp_path):
  config, workdir, _ = trained_smoke
  assert builders.eval_checkpoint_dir(config, workdir) == os.path.join(workdir, "checkpoint_1")
  with pytest.raises(checkpoints.CheckpointError) as err:
    builders.eval_checkpoint_dir(config, str(tmp_path / "empty"))
  assert "\n" not in str(err.value) and str(tmp_path / "empty") in str(err.value)


def test_eval_only_missing_checkpoint_is_one_line(tmp_path):
  missing = str(tmp_path / "no_such_checkpoint")
  config = smoke_config(tmp_path, eval_only=True, pretrain_dir=missing)
  with pytest.raises(checkpoints.CheckpointError) as err:
    eval_only.run_eval_only(config, str(tmp_path / "wd"))
  assert "\n" not in str(err.value) and missing in str(err.value)


def test_eval_only_with_every_entry_off_is_refused_in_one_line(trained_smoke, tmp_path):
  _, workdir, _ = trained_smoke
  config = smoke_config(tmp_path, eval_only=True, eval_dataset="",
                        pretrain_dir=os.path.join(workdir, "checkpoint_1"))
  with pytest.raises(core.EvalConfigError) as err:
    eval_only.run_eval_only(config, str(tmp_path / "wd"))
  assert str(err.value) == (
      "config.eval_only=True but nothing to evaluate: config.evals.retrieval.dataset, "
      "config.evals.zeroshot.dataset are all empty")
  assert not (tmp_path / "wd").exists()


def test_canonicalize_option_changes_what_is_tokenized(partitioner):
  seen = []

  def recording_tokenizer(strings):
    seen.extend(strings)
    return np.ones((len(strings), 2), np.int32)

  for canonicalize in (False, True):
    ev = zeroshot.ZeroShotClassifier(
        partitioner, lambda p, x: x, lambda p, t: t.astype(jnp.float32), params_axes={},
        tokenize=recording_tokenizer, image_size=IMAGE_SIZE, batch_size=4,
        canonicalize=canonicalize)
    ev.classifier_weights({}, ["Ankle-Boot"], ["A photo of the {}."])
  assert seen == ["A photo of the Ankle-Boot.", "a photo of the ankleboot"]


def test_evaluators_fail_early_on_missing_data_and_can_be_off(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  config = smoke_config(tmp_path, eval_dataset="imagenet2012:5.*.*")
  assert config.evals.zeroshot.dataset == "imagenet2012:5.*.*"
  task = builders.build_task(config)
  # Nothing is compiled or placed before the data are checked: the context's axes are not needed.
  context = registry.EvalContext(config, task, builders.checked_partitioner(config),
                                 params_axes=None, mutables_axes={}, workdir=str(tmp_path))
  with pytest.raises(core.EvalError) as err:
    registry.build_evaluators(config, context)
  assert "\n" not in str(err.value) and "imagenet2012:5.*.*" in str(err.value)
  off = smoke_config(tmp_path, eval_dataset="")
  assert registry.build_evaluators(off, context) == []


def write_caption_set(directory, images, captions, broken=()):
  """A held-out caption set in the LAION TFRecord layout (`jpg`, `txt`); indices in `broken` get
  bytes that are not an image."""
  os.makedirs(directory)
  with tf.io.TFRecordWriter(os.path.join(directory, "00000.tfrecord")) as writer:
    for index, (image, caption) in enumerate(zip(images, captions)):
      encoded = (b"not a jpeg" if index in broken else tf.io.encode_jpeg(image).numpy())
      feature = {
          "jpg": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
          "txt": tf.train.Feature(bytes_list=tf.train.BytesList(value=[caption.encode()])),
      }
      writer.write(tf.train.Example(features=tf.train.Features(feature=feature))
                   .SerializeToString())


def test_retrieval_evaluator_matches_plain_jit_embeddings_and_counts_skipped_pairs(tmp_path):
  rng = np.random.RandomState(5)
  num_pairs, broken = 11, (4,)
  config = smoke_config(tmp_path, eval_dataset="")
  size = config.image_size
  images = rng.randint(0, 256, (num_pairs, size, size, 3)).astype(np.uint8)
  captions = [f"a photo of {FASHION_CLASSES[i % 10].lower()} number {i}" for i in range(num_pairs)]
  write_caption_set(str(tmp_path / "captions"), images, captions, broken)
  with config.unlocked():
    config.evals.retrieval.dataset = str(tmp_path / "captions")
    config.evals.retrieval.batch_size = 8
  task = builders.build_task(config)
  context = eval_only.make_context(config, task, builders.checked_partitioner(config),
                                   str(tmp_path))
  (ev,) = registry.build_evaluators(config, context)
  assert isinstance(ev, retrieval.RetrievalEvaluator) and ev.source.num_examples == num_pairs
  host_params = jax.device_get(jax.jit(task.init_variables)(jax.random.PRNGKey(2))["params"])
  params = builders.place_host_tree(host_params, context.params_axes, context.partitioner.mesh)
  metrics = ev.run(params, {}, 1)

  # The images the data layer hands the evaluator (its crop: config.aug.eval_crop_fraction).
  decoded = list(ev.source.dataset(0, 1, size, config.aug.eval_crop_fraction)
                 .as_numpy_iterator())
  kept = [i for i in range(num_pairs) if i not in broken]
  assert [ex["caption"].decode() for ex in decoded] == [captions[i] for i in kept]
  with jax.default_device(jax.devices()[0]):
    img = np.asarray(jax.jit(task.encode_image)(host_params,
                                                np.stack([ex["image"] for ex in decoded])))
    tokens = zeroshot.make_tokenizer(config)([captions[i] for i in kept])
    txt = np.asarray(jax.jit(task.encode_text)(host_params, tokens))
  scores = img.astype(np.float64) @ txt.astype(np.float64).T
  gaps = np.abs(scores - np.diag(scores)[:, None]) + np.eye(len(kept))
  gaps_t2i = np.abs(scores - np.diag(scores)[None, :]) + np.eye(len(kept))
  # No near-ties (the seed is chosen so): another float32 summation order cannot reorder.
  assert min(gaps.min(), gaps_t2i.min()) > 1e-4, (gaps.min(), gaps_t2i.min())
  reference = retrieval.retrieval_metrics(img, txt)
  assert metrics[f"retrieval/captions/num_pairs"] == len(kept)
  assert metrics[f"retrieval/captions/num_skipped"] == len(broken)
  for key, value in reference.items():
    assert metrics[f"retrieval/captions/{key}"] == pytest.approx(value)
  assert 0 < reference["i2t_r1"] < 1 or 0 < reference["t2i_r5"] < 1  # not a degenerate case
