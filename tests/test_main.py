"""main.py end to end, as a user runs it: FLIP's three command lines on demo-format data.

Each run is a fresh `python main.py` process (one CPU device, like a user's laptop), on a small
slice of the real Fashion-MNIST demo set in img2dataset's TFRecord layout and the demo config's
smoke size. Checks what a user sees and what lands on disk: checkpoints, tensorboard events, the
printed zero-shot line, and one-line refusals of bad input before any compute.
"""

import glob
import os
import pathlib
import re
import subprocess
import sys

import pytest

from flip.data import demo
import reliability_harness as harness  # scripts/, on the path from conftest.py

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE_STEPS = 4


def run_main(*args, timeout=600):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # a user's process: one CPU device
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  return subprocess.run([sys.executable, str(REPO_ROOT / "main.py"), *args], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


def stderr_lines(result):
  return harness.clean_stderr_lines(result.stderr)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory, fashion_mnist_dir):
  out = tmp_path_factory.mktemp("demo") / "data"
  paths = demo.build_demo(str(fashion_mnist_dir), str(out), num_train=512, num_test=200,
                          train_shards=4, test_shards=2)
  return paths


def demo_args(workdir, data):
  return [f"--workdir={workdir}", "--config=configs/cfg_demo.py:smoke",
          f"--config.laion_path={data.train_dir}", f"--config.eval_dataset=demo:{data.test_dir}",
          f"--config.num_train_steps={SMOKE_STEPS}", "--config.checkpoint_every_steps=2",
          "--config.log_every_steps=2", "--config.evals.zeroshot.batch_size=40"]


def zeroshot_from_stdout(stdout):
  """(top-1, top-5) in percent from the printed evaluation line."""
  match = re.search(r"zeroshot/demo/top1 ([0-9.]+)%.*zeroshot/demo/top5 ([0-9.]+)%", stdout)
  assert match, stdout[-2000:]
  return float(match.group(1)), float(match.group(2))


def test_help_prints_the_flags():
  result = run_main("--help")
  assert result.returncode in (0, 1), result.stderr[-2000:]  # absl's --help exits with 1
  assert "Traceback" not in result.stderr
  out = result.stdout + result.stderr
  for flag in ("--workdir", "--config", "--gin_file", "--gin_bindings"):
    assert flag in out


@pytest.mark.parametrize("override, named", [
    ("--config.model.model_img.mask_rato=0.0", "config.model.model_img.mask_rato"),
    ("--config.batch_size=abc", "config.batch_size"),
    ("--config.model.model_img.transformer.qkv_layout=foo",
     "config.model.model_img.transformer.qkv_layout"),
])
def test_bad_config_is_refused_in_one_line_before_any_work(tmp_path, override, named):
  workdir = tmp_path / "wd"
  result = run_main(f"--workdir={workdir}", "--config=configs/cfg_flip_large.py", override,
                    timeout=120)
  assert result.returncode == 2
  lines = stderr_lines(result)
  assert len(lines) == 1, lines
  assert named in lines[0]
  assert not workdir.exists()  # nothing started


def test_flip_command_lines_on_demo_data(tmp_path, demo_data):
  pretrain, tune, evaldir = tmp_path / "pretrain", tmp_path / "tune", tmp_path / "eval"

  # 1. Masked pretraining: checkpoints, tensorboard events, zero-shot printed at the end.
  result = run_main(*demo_args(pretrain, demo_data))
  assert result.returncode == 0, result.stderr[-3000:]
  assert (pretrain / f"checkpoint_{SMOKE_STEPS}" / "checkpoint").exists()
  assert glob.glob(str(pretrain / f"checkpoint_{SMOKE_STEPS}" / "train_ds-*"))  # iterator state
  assert glob.glob(str(pretrain / "events.out.tfevents.*"))
  logged = re.findall(r"^step (\d+)/(\d+) \| loss ([0-9.]+)", result.stdout, re.M)
  assert [int(s) for s, _, _ in logged] == [2, 4]
  top1, top5 = zeroshot_from_stdout(result.stdout)
  assert 0.0 <= top1 <= top5 <= 100.0

  # 2. Unmasked tuning from it (FLIP's override line).
  result = run_main(*demo_args(tune, demo_data), f"--config.pretrain_dir={pretrain}",
                    "--config.model.model_img.mask_ratio=0.0", "--config.learning_rate=4e-8",
                    "--config.num_epochs=100", "--config.warmup_epochs=20")
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tune / f"checkpoint_{SMOKE_STEPS}" / "checkpoint").exists()

  # 3. eval_only from the pretrained params, with laion_path unset: same numbers as the hook.
  result = run_main(f"--workdir={evaldir}", "--config=configs/cfg_demo.py:smoke",
                    "--config.laion_path=", f"--config.eval_dataset=demo:{demo_data.test_dir}",
                    "--config.evals.zeroshot.batch_size=40",
                    f"--config.pretrain_dir={pretrain}", "--config.eval_only=True")
  assert result.returncode == 0, result.stderr[-3000:]
  assert zeroshot_from_stdout(result.stdout) == pytest.approx((top1, top5), abs=1e-9)


def test_eval_only_with_a_missing_checkpoint_names_the_path(tmp_path, demo_data):
  missing = tmp_path / "no_such_run"
  result = run_main(f"--workdir={tmp_path / 'wd'}", "--config=configs/cfg_demo.py:smoke",
                    f"--config.eval_dataset=demo:{demo_data.test_dir}",
                    f"--config.pretrain_dir={missing}", "--config.eval_only=True", timeout=300)
  assert result.returncode != 0
  lines = stderr_lines(result)
  assert len(lines) == 1, lines
  assert str(missing) in lines[0]
