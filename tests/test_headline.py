"""The README's headline claims, checked in the default suite at a size that fits it.

1. Kill -9 anywhere, resume, and the run is the run that was never killed: `python main.py` on the
   demo config at smoke size, SIGKILLed while writing a checkpoint, after a training step and
   during start-up (scripts/kill_resume.py's kill points, fewer of them and a shorter run), resumed
   each time; every logged loss equals the uninterrupted reference's and the final train state
   (parameters, optimizer state, step) is bitwise equal to it.
2. The demo learns: the demo model (configs/cfg_demo.py, real size) trained for a short while on
   the real Fashion-MNIST demo set classifies held-out test images zero-shot, from class names
   and prompt templates never seen in training, well above the 10 % of chance.
"""

import re

import pytest

from flip.data import demo
import kill_resume  # scripts/, on the path from conftest.py
import reliability_harness as harness

NUM_CLASSES = 10
CHANCE_TOP1 = 100.0 / NUM_CLASSES

# Kill -9: three kills (during a save, after a step, during start-up) of a 9-step run that saves
# every 3 steps, on a 256-image slice.
KILLS, KILL_STEPS, KILL_CHECKPOINT_EVERY = 3, 9, 3

# Zero-shot: the demo model at its real size, ACCURACY_STEPS steps of ACCURACY_BATCH on as many
# training images (one pass), evaluated on the first ACCURACY_TEST_IMAGES test images.
ACCURACY_BATCH = 64
ACCURACY_STEPS = 192
ACCURACY_LR = 3e-3  # per 256 samples
ACCURACY_TEST_IMAGES = 1000
MIN_TOP1 = 3 * CHANCE_TOP1  # percent


def test_kill_9_at_several_points_then_resume_is_bitwise_equal(tmp_path, fashion_mnist_dir):
  paths = demo.build_demo(str(fashion_mnist_dir), str(tmp_path / "data"), num_train=256,
                          num_test=16, train_shards=2, test_shards=1)
  outcome = kill_resume.run(str(tmp_path), paths.train_dir, KILLS, KILL_STEPS,
                            KILL_CHECKPOINT_EVERY, seed=0)
  print(kill_resume.summary_table(outcome))
  assert len(outcome.kills) == KILLS, "the run finished before every kill landed"
  assert [r.kind for r in outcome.kills] == list(harness.KILL_KINDS[:KILLS])
  # Each attempt after a kill restored the newest complete checkpoint (None: itself killed first).
  assert False not in outcome.resume_checks
  assert outcome.steps_missing == [] and outcome.steps_compared == KILL_STEPS
  assert outcome.losses_compared >= KILL_STEPS and outcome.max_loss_diff == 0.0
  assert outcome.arrays_compared > 0 and outcome.unequal_arrays == []


def test_demo_model_zero_shot_is_well_above_chance_after_a_short_run(tmp_path, fashion_mnist_dir):
  num_train = ACCURACY_BATCH * ACCURACY_STEPS
  paths = demo.build_demo(str(fashion_mnist_dir), str(tmp_path / "data"), num_train=num_train,
                          num_test=ACCURACY_TEST_IMAGES, train_shards=4, test_shards=1)
  args = [f"--workdir={tmp_path / 'wd'}", "--config=configs/cfg_demo.py",
          f"--config.laion_path={paths.train_dir}", f"--config.eval_dataset=demo:{paths.test_dir}",
          f"--config.batch_size={ACCURACY_BATCH}", f"--config.samples_per_epoch={num_train}",
          "--config.num_epochs=1.0", "--config.warmup_epochs=0.1",
          f"--config.learning_rate={ACCURACY_LR}", "--config.log_every_steps=20",
          "--config.checkpoint_every_steps=100000", "--config.evals.zeroshot.batch_size=250"]
  run = harness.run_main(args, harness.subprocess_env(), str(tmp_path / "stderr"), timeout=600)
  assert run.proc.returncode == 0, run.stderr[-3000:]
  assert harness.complete_steps(str(tmp_path / "wd")) == [ACCURACY_STEPS]
  match = re.search(r"zeroshot/demo/num_images (\d+) \| zeroshot/demo/top1 ([0-9.]+)%", run.stdout)
  assert match, run.stdout[-2000:]
  print(match.group(0))
  assert int(match.group(1)) == ACCURACY_TEST_IMAGES
  assert float(match.group(2)) > MIN_TOP1
