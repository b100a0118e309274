"""Every user-given path and file, given wrong, ends in one line on stderr, never a traceback.

Each case runs `python main.py` as a user does (the demo config at smoke size, one training step,
on a 64-image slice of the demo set) with one path or file broken: the workdir, the config file,
gin files, includes and bindings, `pretrain_dir`, `resume_dir`, `laion_path`, `eval_dataset`,
`aug.txt.spm_path`. Checked for each: the exit status (main.py's documented statuses: 2 for a
refusal before any compute, 1 for a failure found while running), exactly one line on stderr once
TF/XLA's C++ start-up noise is removed (reliability_harness.clean_stderr_lines), that line naming
the key or the file, and no Python traceback anywhere on stderr.
"""

import pathlib
import subprocess
import sys

from PIL import Image
import pytest

from flip.data import demo
import reliability_harness as harness  # scripts/, on the path from conftest.py

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REFUSED, RUNTIME = 2, 1  # main.py's exit statuses


@pytest.fixture(scope="module")
def bad(tmp_path_factory, fashion_mnist_dir):
  """A small demo set and a directory of broken inputs."""
  root = tmp_path_factory.mktemp("bad_input")
  data = demo.build_demo(str(fashion_mnist_dir), str(root / "data"), num_train=64, num_test=20,
                         train_shards=2, test_shards=1)
  x = root / "x"
  x.mkdir()
  (x / "a_file").write_text("not a directory\n")
  (x / "empty").mkdir()
  garbage_ckpt = x / "garbage_ckpt" / "checkpoint_5"
  garbage_ckpt.mkdir(parents=True)
  (garbage_ckpt / "checkpoint").write_bytes(bytes(range(256)) * 2)
  (x / "garbage_laion").mkdir()
  (x / "garbage_laion" / "00000.tfrecord").write_bytes(b"\x07not a tfrecord" * 40)
  (x / "include_missing.gin").write_text("include 'no_such_include.gin'\n")
  (x / "syntax.gin").write_text("this is ( not gin\n")
  (x / "syntax_config.py").write_text("def get_config(:\n")
  (x / "no_get_config.py").write_text("def something_else():\n  return None\n")
  (x / "garbage.model").write_bytes(b"\x00\x01 not a sentencepiece model" * 10)
  (x / "demo_bad_json").mkdir()
  (x / "demo_bad_json" / "00000.tfrecord").write_bytes(
      (pathlib.Path(data.test_dir) / "00000.tfrecord").read_bytes())
  (x / "demo_bad_json" / "classes.json").write_text("{not json")
  (x / "folder_empty").mkdir()
  for name in ("shirt", "sneaker"):  # two class folders, one class name
    (x / "folder_bad_classnames" / name).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(x / "folder_bad_classnames" / name / "0.jpg")
  (x / "folder_bad_classnames" / "classnames.txt").write_text("shirt\n")
  return data, x


def run_main(args):
  result = subprocess.run([sys.executable, str(REPO_ROOT / "main.py"), *args], cwd=REPO_ROOT,
                          env=harness.subprocess_env(), capture_output=True, text=True,
                          timeout=600)
  return result.returncode, result.stderr


def smoke_args(workdir, data, *extra):
  return [f"--workdir={workdir}", "--config=configs/cfg_demo.py:smoke",
          f"--config.laion_path={data.train_dir}", "--config.eval_dataset=",
          "--config.num_train_steps=1", "--config.checkpoint_every_steps=1", *extra]


# (case, main.py arguments after the smoke ones (X: the broken-inputs dir, demo:T: the demo test
# split), exit status, what the line must name). Arguments starting with "--workdir=" or
# "--config=" replace the smoke ones.
CASES = [
    ("workdir_is_a_file", ["--workdir=X/a_file"], REFUSED, ["--workdir", "X/a_file"]),
    ("config_syntax_error", ["--config=X/syntax_config.py"], REFUSED, ["X/syntax_config.py"]),
    ("config_without_get_config", ["--config=X/no_get_config.py"], REFUSED,
     ["X/no_get_config.py", "get_config"]),
    ("gin_file_missing", ["--gin_file=gin/nope.gin"], REFUSED, ["gin/nope.gin"]),
    ("gin_include_missing", ["--gin_file=X/include_missing.gin"], REFUSED,
     ["no_such_include.gin", "X/include_missing.gin"]),
    ("gin_syntax_error", ["--gin_file=X/syntax.gin"], REFUSED, ["X/syntax.gin", "line 1"]),
    ("gin_unknown_configurable", ["--gin.no_such_configurable.value=3"], REFUSED,
     ["no_such_configurable"]),
    ("gin_unknown_parameter", ["--gin.build_task.no_such_parameter=3"], REFUSED,
     ["build_task", "no_such_parameter"]),
    ("gin_binding_disagrees_with_config", ["--gin.build_task.task_name='nosuch_task'"], REFUSED,
     ["build_task.task_name", "nosuch_task"]),
    ("gin_binding_without_value", ["--gin.build_task.task_name"], REFUSED,
     ["--gin.build_task.task_name"]),
    ("gin_unparsable_value", ["--gin.build_task.task_name=[1"], REFUSED,
     ["build_task.task_name"]),
    ("pretrain_dir_missing", ["--config.pretrain_dir=X/nope"], REFUSED,
     ["config.pretrain_dir", "X/nope"]),
    ("pretrain_dir_empty", ["--config.pretrain_dir=X/empty"], REFUSED,
     ["config.pretrain_dir", "X/empty"]),
    ("pretrain_dir_garbage_checkpoint", ["--config.pretrain_dir=X/garbage_ckpt"], REFUSED,
     ["config.pretrain_dir", "X/garbage_ckpt/checkpoint_5"]),
    ("resume_dir_missing", ["--config.resume_dir=X/nope"], REFUSED,
     ["config.resume_dir", "X/nope"]),
    ("resume_dir_garbage_checkpoint", ["--config.resume_dir=X/garbage_ckpt"], RUNTIME,
     ["X/garbage_ckpt/checkpoint_5"]),
    ("laion_path_missing", ["--config.laion_path=X/nope"], REFUSED,
     ["config.laion_path", "X/nope"]),
    ("laion_path_empty", ["--config.laion_path=X/empty"], REFUSED,
     ["config.laion_path", "X/empty"]),
    ("laion_path_garbage_files", ["--config.laion_path=X/garbage_laion"], RUNTIME,
     ["X/garbage_laion"]),
    ("eval_dataset_demo_missing", ["--config.eval_dataset=demo:X/nope"], RUNTIME, ["X/nope"]),
    ("eval_dataset_demo_bad_classes_json", ["--config.eval_dataset=demo:X/demo_bad_json"],
     RUNTIME, ["X/demo_bad_json/classes.json"]),
    ("eval_dataset_folder_missing", ["--config.eval_dataset=X/nope"], RUNTIME, ["X/nope"]),
    ("eval_dataset_folder_empty", ["--config.eval_dataset=X/folder_empty"], RUNTIME,
     ["X/folder_empty"]),
    ("eval_dataset_folder_bad_classnames", ["--config.eval_dataset=X/folder_bad_classnames"],
     RUNTIME, ["X/folder_bad_classnames/classnames.txt"]),
    ("eval_only_garbage_checkpoint", ["--config.eval_dataset=demo:T",
                                      "--config.pretrain_dir=X/garbage_ckpt",
                                      "--config.eval_only=True"], RUNTIME,
     ["X/garbage_ckpt/checkpoint_5"]),
    ("eval_dataset_unknown_tfds_name", ["--config.eval_dataset=no_such_dataset_xyz"], RUNTIME,
     ["no_such_dataset_xyz"]),
    ("spm_path_missing", ["--config.aug.txt.tokenizer=sentencepiece",
                          "--config.aug.txt.spm_path=X/nope.model"], REFUSED,
     ["config.aug.txt.spm_path", "X/nope.model"]),
    ("spm_path_garbage", ["--config.aug.txt.tokenizer=sentencepiece",
                          "--config.aug.txt.spm_path=X/garbage.model"], REFUSED,
     ["config.aug.txt.spm_path", "X/garbage.model"]),
]


def _case_id(case):
  return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize("case, extra, status, named", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_path_is_one_line_naming_it(bad, tmp_path, case, extra, status, named):
  data, x = bad
  extra = [arg.replace("X/", f"{x}/").replace("demo:T", f"demo:{data.test_dir}") for arg in extra]
  named = [n.replace("X/", f"{x}/") for n in named]
  args = smoke_args(tmp_path / "wd", data)
  for arg in extra:
    flag = arg.split("=", 1)[0]
    if flag in ("--workdir", "--config"):
      args = [a for a in args if a.split("=", 1)[0] != flag]
    args.append(arg)
  code, stderr = run_main(args)
  lines = harness.clean_stderr_lines(stderr)
  assert "Traceback" not in stderr, stderr[-3000:]
  assert len(lines) == 1, lines
  assert code == status, (code, lines)
  for name in named:
    assert name in lines[0], (name, lines[0])
