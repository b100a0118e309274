"""Runs with their workdir, checkpoints, pretrain_dir and evaluation data on Google Cloud Storage,
against a GCS emulator (tests/gcs_emulator.py: gcp-storage-emulator, with TensorFlow's and
tensorstore's clients pointed at it; no credentials, nothing leaves the machine).

The tiny config's schedule (10 steps) runs once uninterrupted and once stopped after step 5 and
resumed (with a killed save's `checkpoint_7.tmp-123` left on the bucket), both with their workdir
on the bucket and a checkpoint at the end of each run: the resumed run must be bitwise equal to
the uninterrupted one, as on a local disk (tests/test_checkpoints.py, which also covers periodic
saves and keep-last-N). The text tower uses the
byte tokenizer's vocabulary so that the zero-shot evaluator can run eval_only from the bucket.

Writing checkpoints to the emulated bucket is slow (t5x finalises each save with one `gcloud
storage mv` per array file): the three tests of those runs are slow-marked (`make test-slow`).
The default suite reads a checkpoint from the bucket (eval_only with its pretrain_dir there; the
checkpoint trained on disk and copied up), reads LAION shards and evaluation data from it, and
writes events, PNGs and files through the paths layer.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import gcs_emulator
import laion_fixtures
import train_utils
from flip import checkpoints
from flip import config as config_lib
from flip import paths
from flip import train
from flip import trainer as trainer_lib
from flip.evals import eval_only

BUCKET = "flip-test"
ROOT = f"gs://{BUCKET}"
# Saves only at the end of each run (every save on the emulated bucket costs ~10-40 s here: t5x
# finalises it with `gcloud storage mv`, one copy and one delete per array file).
SETTINGS = ("checkpoint_every_steps=1000", "keep_checkpoints=2", "aug.txt.tokenizer=byte",
            "model.model_txt.vocab_size=264", "evals.zeroshot.templates=templates_short",
            "evals.zeroshot.batch_size=8")
STOP_STEP, TOTAL_STEPS = 5, 10
LEFTOVER_TMP = "checkpoint_7.tmp-123"
CLASSES = ["zero", "one", "two", "three"]
NUM_EVAL_IMAGES = 12


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator with one bucket; the clients' environment set for the module's duration."""
  process, env = gcs_emulator.start(str(tmp_path_factory.mktemp("gcs_emulator")))
  saved = {key: os.environ.get(key) for key in env}
  os.environ.update(env)
  try:
    gcs_emulator.create_bucket(env, BUCKET)
    yield env
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    process.kill()
    process.wait()


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  with train_utils.persistent_compilation_cache(
      str(tmp_path_factory.getbasetemp() / "jax_compilation_cache")):
    yield


@pytest.fixture(scope="module")
def runs(gcs):
  del gcs
  full_dir, resumed_dir = f"{ROOT}/full", f"{ROOT}/resumed"
  uninterrupted = train.train_and_evaluate(train_utils.tiny_config(*SETTINGS), full_dir,
                                           make_dataset=train_utils.make_dataset)
  stopped = train.train_and_evaluate(
      train_utils.tiny_config(*SETTINGS, f"num_train_steps={STOP_STEP}"), resumed_dir,
      make_dataset=train_utils.make_dataset)
  # A save killed before its rename, on the bucket.
  tf.io.gfile.makedirs(f"{resumed_dir}/{LEFTOVER_TMP}")
  with tf.io.gfile.GFile(f"{resumed_dir}/{LEFTOVER_TMP}/checkpoint", "wb") as f:
    f.write(b"truncated")
  steps_before = checkpoints.complete_steps(resumed_dir)
  leftover_before = checkpoints.incomplete_dirs(resumed_dir)
  resumed = train.train_and_evaluate(
      train_utils.tiny_config(*SETTINGS, f"num_train_steps={TOTAL_STEPS}"), resumed_dir,
      make_dataset=train_utils.make_dataset)
  return {"full_dir": full_dir, "resumed_dir": resumed_dir, "uninterrupted": uninterrupted,
          "stopped": stopped, "resumed": resumed, "steps_before": steps_before,
          "leftover_before": leftover_before}


def event_losses(workdir):
  """[{step: loss}] per event file on the bucket (one file per run), oldest first."""
  files = sorted(tf.io.gfile.glob(f"{workdir}/events.out.tfevents.*"))
  return [train_utils.logged_scalars(path, "loss") for path in files]


@pytest.mark.slow
def test_checkpoints_are_written_to_the_bucket_and_nothing_locally(runs):
  assert runs["uninterrupted"]["step"] == TOTAL_STEPS
  assert checkpoints.complete_steps(runs["full_dir"]) == [TOTAL_STEPS]
  ckpt = f"{runs['full_dir']}/checkpoint_10"
  names = tf.io.gfile.listdir(ckpt)
  assert "checkpoint" in names and any(n.startswith("train_ds-") for n in names)
  # Arrays went through tensorstore's gcs driver: zarr metadata beside the chunks on the bucket.
  assert tf.io.gfile.glob(f"{ckpt}/target.*/.zarray")
  assert json.loads(paths.read_bytes(checkpoints.meta_path(runs["full_dir"], 10)))
  assert not os.path.exists("gs:")  # no local ./gs:/bucket directory made by os calls


@pytest.mark.slow
def test_resumed_run_on_the_bucket_is_bitwise_equal_to_the_uninterrupted_one(runs):
  assert runs["stopped"]["step"] == STOP_STEP and runs["resumed"]["step"] == TOTAL_STEPS
  assert runs["steps_before"] == [STOP_STEP]
  full, resumed = runs["uninterrupted"]["state"], runs["resumed"]["state"]
  assert train_utils.unequal_leaves(train_utils.flat_tree(resumed.params),
                                    train_utils.flat_tree(full.params)) == []
  assert train_utils.unequal_leaves(train_utils.flat_tree(resumed.param_states),
                                    train_utils.flat_tree(full.param_states)) == []
  resumed_runs = event_losses(runs["resumed_dir"])
  # The second run really resumed at step 5, and every logged loss equals the uninterrupted one's.
  assert [sorted(r) for r in resumed_runs] == [list(range(1, STOP_STEP + 1)),
                                               list(range(STOP_STEP + 1, TOTAL_STEPS + 1))]
  (full_losses,) = event_losses(runs["full_dir"])
  assert {**resumed_runs[0], **resumed_runs[1]} == full_losses
  # What is on the bucket is what was trained: restored through tensorstore's gcs driver.
  restored = checkpoints.load_state_tree(f"{runs['resumed_dir']}/checkpoint_10")["target"]
  assert train_utils.unequal_leaves(train_utils.flat_tree(restored),
                                    train_utils.flat_tree(full.params)) == []


@pytest.mark.slow
def test_an_incomplete_save_on_the_bucket_is_cleaned(runs):
  assert runs["leftover_before"] == [f"{runs['resumed_dir']}/{LEFTOVER_TMP}"]
  assert checkpoints.incomplete_dirs(runs["resumed_dir"]) == []
  assert not tf.io.gfile.exists(f"{runs['resumed_dir']}/{LEFTOVER_TMP}/checkpoint")
  assert checkpoints.complete_steps(runs["resumed_dir"]) == [STOP_STEP, TOTAL_STEPS]


def write_demo_split(split_dir, images, labels):
  """A demo-format test split (TFRecord of jpg + label, classes.json) at any tf.io.gfile path."""
  paths.makedirs(split_dir)
  with tf.io.TFRecordWriter(paths.join(split_dir, "test-00000-of-00001.tfrecord")) as writer:
    for image, label in zip(images, labels):
      feature = {
          "jpg": tf.train.Feature(bytes_list=tf.train.BytesList(
              value=[tf.io.encode_jpeg(image).numpy()])),
          "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
      }
      writer.write(tf.train.Example(features=tf.train.Features(feature=feature))
                   .SerializeToString())
  paths.write_bytes(paths.join(split_dir, "classes.json"),
                    json.dumps({"classes": CLASSES, "templates": ["a photo of a {}."]}).encode())


def copy_tree(src, dst):
  for directory, _, files in tf.io.gfile.walk(src):
    target = dst + directory[len(src):]
    tf.io.gfile.makedirs(target)
    for name in files:
      tf.io.gfile.copy(f"{directory.rstrip('/')}/{name}", f"{target.rstrip('/')}/{name}")


@pytest.fixture(scope="module")
def checkpoint_on_the_bucket(gcs, tmp_path_factory):
  """The tiny schedule trained on disk, its final checkpoint copied to the bucket."""
  del gcs
  workdir = str(tmp_path_factory.mktemp("local_run"))
  train.train_and_evaluate(train_utils.tiny_config(*SETTINGS), workdir,
                           make_dataset=train_utils.make_dataset)
  remote = f"{ROOT}/copied/checkpoint_{TOTAL_STEPS}"
  copy_tree(f"{workdir}/checkpoint_{TOTAL_STEPS}", remote)
  return remote


def test_eval_only_with_pretrain_dir_and_data_on_the_bucket(checkpoint_on_the_bucket, tmp_path):
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, (NUM_EVAL_IMAGES, 20, 20, 3)).astype(np.uint8)
  labels = rng.randint(0, len(CLASSES), NUM_EVAL_IMAGES)
  remote_data, local_data = f"{ROOT}/demo/test", str(tmp_path / "demo" / "test")
  write_demo_split(remote_data, images, labels)
  write_demo_split(local_data, images, labels)
  local_ckpt = str(tmp_path / "checkpoint_10")
  copy_tree(checkpoint_on_the_bucket, local_ckpt)

  def evaluate(pretrain_dir, data, workdir):
    config = train_utils.tiny_config(*SETTINGS, "eval_only=True", "laion_path=",
                                     f"eval_dataset=demo:{data}", f"pretrain_dir={pretrain_dir}")
    return eval_only.run_eval_only(config, workdir)

  remote = evaluate(checkpoint_on_the_bucket, remote_data, f"{ROOT}/eval")
  local = evaluate(local_ckpt, local_data, str(tmp_path / "eval"))
  assert remote["zeroshot/demo/num_images"] == NUM_EVAL_IMAGES
  assert remote == local  # the same checkpoint and data, read from the bucket or from disk
  assert tf.io.gfile.glob(f"{ROOT}/eval/events.out.tfevents.*")


@pytest.mark.parametrize("workdir", ["gs://no-such-bucket/run"])
def test_a_missing_bucket_is_refused_in_one_line_before_any_compute(gcs, workdir, monkeypatch):
  del gcs

  def no_trainer(*args, **kwargs):
    raise AssertionError("nothing may be built or compiled for an unwritable workdir")

  monkeypatch.setattr(trainer_lib, "Trainer", no_trainer)
  with pytest.raises(config_lib.ConfigError) as err:
    train.train_and_evaluate(train_utils.tiny_config(*SETTINGS), workdir,
                             make_dataset=train_utils.make_dataset)
  message = str(err.value)
  assert "\n" not in message and message.startswith(f"--workdir: workdir {workdir} is not writable")
  assert "no-such-bucket" in message.split("is not writable:", 1)[1]  # the storage's own reason


def test_the_paths_layer_gives_the_same_results_on_disk_and_on_the_bucket(gcs, tmp_path):
  del gcs
  seen = []
  for root in (str(tmp_path / "layer"), f"{ROOT}/layer"):
    sub = paths.join(root, "a", "b")
    paths.makedirs(sub)
    paths.makedirs(sub)  # an existing directory is fine
    paths.write_bytes(paths.join(sub, "x.tmp"), b"12345")
    paths.replace(paths.join(sub, "x.tmp"), paths.join(sub, "x.bin"))
    seen.append((paths.listdir(sub), paths.getsize(paths.join(sub, "x.bin")),
                 paths.read_bytes(paths.join(sub, "x.bin")), paths.isdir(paths.join(root, "a")),
                 paths.exists(paths.join(sub, "x.tmp")), paths.basename(sub)))
    paths.rmtree(paths.join(root, "a"))
    assert not paths.exists(paths.join(sub, "x.bin"))
    with pytest.raises(OSError):
      paths.read_bytes(paths.join(root, "missing"))
  assert seen[0] == seen[1] == (["x.bin"], 5, b"12345", True, False, "b")


def test_reconstruction_png_is_written_to_the_bucket(gcs):
  del gcs
  from flip.evals import reconstruction  # pylint: disable=g-import-not-at-top
  image = np.random.RandomState(0).randint(0, 256, (6, 10, 3)).astype(np.uint8)
  reconstruction.write_png(image, f"{ROOT}/pngs/grid.png")
  decoded = tf.io.decode_png(paths.read_bytes(f"{ROOT}/pngs/grid.png")).numpy()
  np.testing.assert_array_equal(decoded, image)


@pytest.mark.parametrize("fmt", ["tfrecord", "webdataset"])
def test_laion_shards_on_the_bucket_give_the_same_examples_as_on_disk(gcs, tmp_path, fmt):
  """img2dataset shards (with the defects of real crawls) read from the bucket and from disk."""
  del gcs
  import test_data_laion  # pylint: disable=g-import-not-at-top (its config and shard builder)
  local, remote = str(tmp_path / fmt), f"{ROOT}/laion/{fmt}"
  samples = test_data_laion.build(local, fmt)
  copy_tree(local, remote)
  seen = []
  for directory in (local, remote):
    examples, counts = test_data_laion.one_epoch(test_data_laion.make_config(directory))
    seen.append((sorted(tuple(e["txt"]) for e in examples), test_data_laion.skip_dict(counts)))
  assert seen[0] == seen[1]
  assert seen[1][1] == laion_fixtures.expected_skips(samples)
  assert len(seen[1][0]) == len(laion_fixtures.expected_valid(samples))
