"""Held-out top-1/top-5 of classifier tasks (flip.evals.classification), eval_only of their
checkpoints (flip.evals.eval_only) and main.py's eval_only.

The evaluation set is an image folder written here: 37 PNG images of the model's input size (so
the evaluation resize + centre crop at crop fraction 1 hands the model exactly these pixels) in
10 class folders; 37 is neither a multiple of the evaluation batch (16: two full batches and one
of 5) nor of the 8 simulated devices. The probe's state has a random head whose classes 0 and 1
are identical (tied logits on every image) and random BatchNorm statistics; labels are chosen
from the model's logits so that the set holds top-1 hits, misses at every rank, and ties at the
top-1 and top-5 boundaries.

References: the task's `logits` called directly (plain jit, one device, outside the evaluator and
its partitioner) ranked in float64 numpy with the tie rule (an image counts for top-k when fewer
than k classes score at least as high as its label); a head whose logits are its bias alone, scored
by hand; for `run_eval_only` and main.py's eval_only, the evaluator's own metrics on the saved
state.
"""

import os
import re
import subprocess
import sys

import flax
import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
from t5x import checkpoints as t5x_checkpoints

from flip import builders
from flip import checkpoints
from flip import config as config_lib
from flip.evals import classification
from flip.evals import core
from flip.evals import eval_only
from flip.evals import registry
from flip.models import classifier as classifier_lib
from flip.tasks import classifier as classifier_tasks
import reliability_harness as harness  # scripts/, on the path from conftest.py
import train_utils

PROBE_SMOKE = "configs/cfg_linprobe_base.py:smoke"
FINETUNE_SMOKE = "configs/cfg_finetune_base.py:smoke"
MAE_SMOKE = "configs/cfg_mae_base.py:smoke"
NUM_CLASSES = 10
NUM_IMAGES = 37
EVAL_BATCH = 16
IMAGE_SIZE = 16
WIDTH = 32
TWINS = (0, 1)  # classes with identical head weights: their logits tie on every image
# 16 px images in 8 px patches, one block of width 32; a (4, 2) mesh so the head is model-sharded.
OVERRIDES = (f"image_size={IMAGE_SIZE}", "model.model_img.patches.size=(8, 8)",
             f"model.model_img.hidden_size={WIDTH}", "model.model_img.transformer.mlp_dim=64",
             "model.model_img.transformer.num_heads=2", "model.model_img.transformer.num_layers=1",
             f"data.num_classes={NUM_CLASSES}", "data.train=",
             f"evals.classification.batch_size={EVAL_BATCH}",
             "aug.eval_crop_fraction=1.0", "partitioning.num_partitions=2")
# Rank (0-based position in the descending order of the logits) of each image's label, cycled.
LABEL_POSITIONS = (0, 0, 1, 2, 3, 4, 5, 6, 8, 9)
SAVED_STEP = 0
TOPK = core.TOPK


def probe_config(folder, *overrides):
  return config_lib.load_config(
      PROBE_SMOKE, list(OVERRIDES) + [f"evals.classification.dataset=folder:{folder}"]
      + list(overrides))


def tie_rule_ranks(logits, labels):
  """How many other classes score at least as high as the label (float64)."""
  logits = np.asarray(logits, np.float64)
  label_logit = logits[np.arange(len(labels)), labels][:, None]
  return np.sum(logits >= label_logit, axis=1) - 1


def write_folder(root, images, labels):
  for c in range(NUM_CLASSES):
    os.makedirs(os.path.join(root, f"class_{c:02d}"), exist_ok=True)
  for i, (image, label) in enumerate(zip(images, labels)):
    Image.fromarray(image).save(os.path.join(root, f"class_{label:02d}", f"{i:03d}.png"))


class Probe:
  """A probe state (random head with twin classes, random BatchNorm statistics), its images,
  labels chosen from its logits, the folder holding them and the checkpoint of the state."""

  def __init__(self, root):
    self.folder = str(root / "eval")
    self.workdir = str(root / "run")
    self.config = probe_config(self.folder)
    self.trainer = train_utils.build_trainer(self.config)
    self.task = self.trainer.task
    host = jax.device_get(self.trainer.init_state())
    self.init_host_state = host
    rng = np.random.default_rng(0)
    params = flax.core.unfreeze(host.params)
    kernel = rng.normal(size=(WIDTH, NUM_CLASSES)).astype(np.float32)
    bias = rng.normal(size=NUM_CLASSES).astype(np.float32)
    kernel[:, TWINS[1]], bias[TWINS[1]] = kernel[:, TWINS[0]], bias[TWINS[0]]
    params["head"] = {"kernel": kernel, "bias": bias}
    stats = {classifier_lib.BATCH_STATS: {"head_norm": {
        "mean": rng.normal(size=WIDTH).astype(np.float32),
        "var": rng.uniform(0.2, 3.0, size=WIDTH).astype(np.float32)}}}
    self.params = params
    self.host_state = host.replace_params(flax.core.freeze(params)).replace_flax_mutables(
        flax.core.freeze(stats))
    self.state = train_utils.place_state(self.trainer, self.host_state)

    self.images = rng.integers(0, 256, (NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    self.logits = direct_logits(self.task, params, stats, self.images)
    order = np.argsort(-self.logits, axis=1, kind="stable")
    positions = np.resize(LABEL_POSITIONS, NUM_IMAGES)
    self.labels = order[np.arange(NUM_IMAGES), positions].astype(np.int32)
    # Where the twins sit at the top-1 or the top-5 boundary, the label is a twin.
    self.labels[np.isin(twin_positions(self.logits), (0, TOPK - 1))] = TWINS[0]
    write_folder(self.folder, self.images, self.labels)
    t5x_checkpoints.Checkpointer(self.trainer.state_shape, self.trainer.partitioner,
                                 self.workdir).save(self.state)


def twin_positions(logits):
  """0-based position of the first twin in each image's descending order of logits."""
  order = np.argsort(-logits, axis=1, kind="stable")
  return np.argmax(order == TWINS[0], axis=1)


def direct_logits(task, params, mutables, images):
  """The task's logits with plain jit on one device (no partitioner), as float64."""
  with jax.default_device(jax.devices()[0]):
    logits = jax.jit(task.logits)(params, mutables, images)
  return np.asarray(logits, np.float64)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
  return Probe(tmp_path_factory.mktemp("probe"))


@pytest.fixture(scope="module")
def hook(probe, tmp_path_factory):
  """The probe config's evaluators, built as the loop builds them (the trainer's partitioner)."""
  context = eval_only.make_context(probe.config, probe.task, probe.trainer.partitioner,
                                   str(tmp_path_factory.mktemp("hook")))
  evaluators = registry.build_evaluators(probe.config, context)
  assert [type(ev) for ev in evaluators] == [classification.ClassificationEvaluator]
  assert evaluators[0].every_steps == 1000  # eval_every_epochs 10 x 1600 samples / batch 16
  assert isinstance(probe.task, classifier_tasks.LinearProbeTask)
  return evaluators[0]


def run_hook(hook, state, step=SAVED_STEP):
  return hook.run(state.params, state.flax_mutables, step)


def metric_keys(name="eval"):
  prefix = f"classification/{name}"
  return f"{prefix}/top1", f"{prefix}/top{TOPK}", f"{prefix}/num_images"


# ---------------------------------------------------------------- the hook against float64 numpy

def test_the_folder_hands_the_model_exactly_the_written_images(probe, hook):
  source = hook.source
  assert source.num_examples == NUM_IMAGES and len(source.classnames) == NUM_CLASSES
  read = list(source.dataset(0, 1, IMAGE_SIZE, crop_fraction=1.0).as_numpy_iterator())
  got = {ex["image"].tobytes(): int(ex["label"]) for ex in read}
  want = {image.tobytes(): int(label) for image, label in zip(probe.images, probe.labels)}
  assert got == want


def test_hook_top1_top5_equal_the_float64_tie_rule_on_the_task_logits(probe, hook):
  logits, labels = probe.logits, probe.labels
  np.testing.assert_array_equal(logits[:, TWINS[0]], logits[:, TWINS[1]])
  # No near-ties apart from the twins: float32 rounding of another computation cannot reorder.
  others = np.abs(logits - logits[np.arange(NUM_IMAGES), labels][:, None])
  twin_label = np.isin(labels, TWINS)
  others[np.arange(NUM_IMAGES), labels] = np.inf
  others[twin_label[:, None] & np.isin(np.arange(NUM_CLASSES), TWINS)[None, :]] = np.inf
  assert others.min() > 1e-3

  ranks = tie_rule_ranks(logits, labels)
  want_top1 = np.mean(ranks < 1)
  want_top5 = np.mean(ranks < TOPK)
  # The set exercises what the rule decides: a twin label first in the order (a hit for an argmax
  # that breaks ties by index, a miss here), a twin label fifth (a top-5 miss here), and hits and
  # misses at both k.
  position = np.argmax(np.argsort(-logits, axis=1, kind="stable") == labels[:, None], axis=1)
  first_twin = labels == TWINS[0]
  assert np.any(first_twin & (position == 0)) and np.any(first_twin & (position == TOPK - 1))
  assert np.sum(position < 1) > np.sum(ranks < 1) and np.sum(position < TOPK) > np.sum(ranks < TOPK)
  assert 0 < want_top1 < want_top5 < 1

  metrics = run_hook(hook, probe.state)
  top1, top5, count = metric_keys()
  assert metrics == {top1: want_top1, top5: want_top5, count: NUM_IMAGES}


def test_hook_with_a_bias_only_head_scores_ties_by_hand(probe, hook):
  # Logits are the bias on every image: classes 0, 1 tie at the top, 2 is next, then 3, 4, 5 tie.
  bias = np.array([3.0, 3.0, 2.0, 1.0, 1.0, 1.0, 0.0, -1.0, -2.0, -3.0], np.float32)
  params = dict(probe.params, head={"kernel": np.zeros((WIDTH, NUM_CLASSES), np.float32),
                                    "bias": bias})
  state = train_utils.place_state(
      probe.trainer, probe.host_state.replace_params(flax.core.freeze(params)))
  metrics = run_hook(hook, state)
  # Nobody is alone at the top: top-1 is 0. Within top-5: labels 0, 1 (one class as high) and 2
  # (two higher); labels 3-5 have five classes at least as high (the set holds some 3s and 4s, which
  # a count of strictly higher classes alone would let in).
  top1, top5, count = metric_keys()
  assert metrics[top1] == 0.0
  assert metrics[top5] == np.sum(np.isin(probe.labels, (0, 1, 2))) / NUM_IMAGES
  assert 0 < metrics[top5] < np.sum(np.isin(probe.labels, (0, 1, 2, 3, 4))) / NUM_IMAGES
  assert metrics[count] == NUM_IMAGES


# ---------------------------------------------------------------- eval_only of a saved checkpoint

def test_run_eval_only_gives_the_hook_metrics_of_the_saved_state(probe, hook, tmp_path, capsys):
  want = run_hook(hook, probe.state)
  # The BatchNorm statistics matter: the probe's initial ones give other numbers.
  init_stats = train_utils.place_state(
      probe.trainer, probe.host_state.replace_flax_mutables(probe.init_host_state.flax_mutables))
  assert run_hook(hook, init_stats) != want
  capsys.readouterr()

  config = probe_config(probe.folder, f"pretrain_dir={probe.workdir}", "eval_only=True")
  workdir = str(tmp_path / "eval")
  got = eval_only.run_eval_only(config, workdir)
  assert got == want
  ckpt_dir = checkpoints.checkpoint_dir(probe.workdir, SAVED_STEP)
  assert capsys.readouterr().out.strip().splitlines()[-1] == (
      f"eval_only {ckpt_dir}: {core.format_metrics(want)}")
  top1, _, _ = metric_keys()
  assert train_utils.logged_scalars(workdir, top1) == {SAVED_STEP: pytest.approx(want[top1])}


# ---------------------------------------------------------------- the loop's evaluation and refusals

def test_the_evaluator_prints_its_line_and_counts_the_period_in_steps(probe, hook, capsys):
  metrics = run_hook(hook, probe.state, 7)
  assert capsys.readouterr().out.strip().splitlines()[-1] == (
      f"eval at step 7: {core.format_metrics(metrics)}")
  config = probe_config(probe.folder, "evals.classification.every_epochs=0.5",
                        "samples_per_epoch=160", "batch_size=16")
  context = eval_only.make_context(config, probe.task, probe.trainer.partitioner, "")
  (periodic,) = registry.build_evaluators(config, context)
  assert periodic.every_steps == 5  # round(0.5 * 160 / 16)


def test_a_classification_entry_on_a_task_without_logits_is_refused_in_one_line(probe):
  config = config_lib.load_config(MAE_SMOKE, ["evals.reconstruction.dataset="])
  with config.unlocked():
    config.evals.classification = ml_collections.ConfigDict(
        {"type": "classification", "dataset": f"folder:{probe.folder}"})
  task = builders.build_task(config)
  context = registry.EvalContext(config, task, probe.trainer.partitioner, None, {}, "")
  with pytest.raises(config_lib.ConfigError) as err:
    registry.build_evaluators(config, context)
  assert str(err.value) == (
      "config.evals.classification.type='classification' needs CLASSIFIES, which task 'mae' does "
      "not have: set --config.evals.classification.dataset= to turn it off")


def test_a_data_set_with_other_classes_is_refused_naming_the_entry(probe):
  config = probe_config(probe.folder, "data.num_classes=12")
  context = eval_only.make_context(config, probe.task, probe.trainer.partitioner, "")
  with pytest.raises(core.EvalError, match=r"^config\.evals\.classification\.dataset .* has 10 "
                     r"classes but config\.data\.num_classes=12$"):
    registry.build_evaluators(config, context)


# ---------------------------------------------------------------- main.py's eval_only

def run_main(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, str(train_utils.REPO_ROOT / "main.py"), *args],
                        cwd=train_utils.REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=300)


def test_main_eval_only_of_the_probe_checkpoint_prints_the_evaluator_metrics(probe, hook,
                                                                            tmp_path):
  want = run_hook(hook, probe.state)
  overrides = [f"--config.{o}" for o in OVERRIDES + (
      f"evals.classification.dataset=folder:{probe.folder}", f"pretrain_dir={probe.workdir}",
      "eval_only=True", "partitioning.num_partitions=1")]  # one device in the subprocess
  result = run_main(f"--workdir={tmp_path / 'eval'}", f"--config={PROBE_SMOKE}", *overrides)
  assert result.returncode == 0, result.stderr[-2000:]
  ckpt_dir = checkpoints.checkpoint_dir(probe.workdir, SAVED_STEP)
  assert result.stdout.strip().splitlines()[-1] == (
      f"eval_only {ckpt_dir}: {core.format_metrics(want)}")


def test_main_refuses_eval_only_with_nothing_to_evaluate_in_one_line_with_exit_status_2(
    probe, tmp_path):
  workdir = tmp_path / "wd"
  result = run_main(f"--workdir={workdir}", f"--config={PROBE_SMOKE}", "--config.eval_only=True",
                    f"--config.pretrain_dir={probe.workdir}",
                    "--config.evals.classification.dataset=")
  assert result.returncode == 2, result.stderr[-2000:]
  lines = harness.clean_stderr_lines(result.stderr)
  assert len(lines) == 1, lines
  assert "nothing to evaluate: config.evals.classification.dataset is empty" in lines[0]
  assert not workdir.exists()
