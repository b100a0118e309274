"""Entry point: `python3 main.py --workdir=DIR --config=configs/cfg_….py [--config.KEY=VALUE …]
[--gin_file=gin/….gin] [--gin.BINDING=VALUE]`.

Masked pretraining, unmasked tuning (`--config.pretrain_dir`, `--config.model.model_img.mask_ratio=0`)
and zero-shot evaluation (`--config.eval_only=True`) all go through here, as in FLIP, and so do the
MAE family's tasks (`config.task`: mae, linprobe, finetune). Training is `flip.train`, the only
importer of the loop; `--config.eval_only=True` restores a checkpoint (`config.pretrain_dir`, else
the newest in the workdir) and runs the evaluators of `config.evals` on it (`flip.evals`), the
same ones training runs: zero-shot and retrieval for FLIP, held-out top-1/top-5 for a linear probe
or a fine-tuned classifier, the reconstruction grid and held-out loss for MAE. Configs hold
numbers (ml_collections, type-checked overrides); gin files wire components (partitioner class, axis
rules, task). Configuration problems are refused before any compute with one line naming the key.
Multi-process runs (several hosts, or several processes on one machine for testing) pass
`--coordinator_address`, `--num_processes` and `--process_id` (or rely on the cluster's
auto-detection on TPU/SLURM), which calls `jax.distributed.initialize`.

Exit status (what a job scheduler or a retry loop sees; docs/RELIABILITY.md):
  0    finished (num_epochs / num_train_steps reached, or eval_only done);
  1    a runtime failure reported in one line: a checkpoint that cannot be read or written (disk
       full, permissions: the previous checkpoint is intact), evaluation data that cannot be used;
  2    refused before any compute, one line naming the problem: a config key or value, the
       workdir, the mesh against the devices, the training data, `pretrain_dir`;
  3    numeric divergence: too many consecutive non-finite steps, or a non-finite state refused
       at checkpoint time (the last good checkpoint is named);
  128 + N  stopped by signal N (SIGTERM 143, SIGINT 130) after writing a final checkpoint.
"""

import os
import sys
import tokenize
from typing import Any, Optional

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from flip import config as config_lib
from flip import process_setup

EXIT_RUNTIME_ERROR = 1
EXIT_CONFIG_ERROR = 2  # flip.config.exit_on_config_error
EXIT_NONFINITE = 3
EXIT_SIGNAL_BASE = 128  # the shell's convention for "terminated by signal N"
SENTENCEPIECE = "sentencepiece"  # config.aug.txt.tokenizer of flip.data.text's SentencePiece model
LAION_CHECK_TEXT = "LAION source "  # flip.data.laion's assertion on a source without valid data

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and tensorboard events.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/…py).",
                                          lock_config=True)
_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "gin files wiring components (gin/…gin).")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [],
                                          "gin bindings; --gin.NAME=VALUE is rewritten to this.")
_GIN_SEARCH_PATHS = flags.DEFINE_list("gin_search_paths", [os.path.dirname(__file__) or "."],
                                      "Directories to search for gin files and includes.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for jax.distributed (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
_CPU_COLLECTIVES = flags.DEFINE_string("cpu_collectives", "gloo",
                                       "CPU collectives implementation for multi-process CPU runs.")


def rewrite_gin_args(argv):
  """`--gin.NAME=VALUE` -> `--gin_bindings=NAME = VALUE` (t5x's spelling, without its log line
  before absl's flags are parsed); a `--gin.NAME` without a value is a ConfigError."""
  rewritten = []
  for arg in argv:
    if arg.startswith("--gin."):
      if "=" not in arg:
        raise config_lib.ConfigError(f"{arg}: a gin binding is --gin.NAME=VALUE")
      name, value = arg[len("--gin."):].split("=", 1)
      arg = f"--gin_bindings={name} = {value}"
    rewritten.append(arg)
  return rewritten


def parse_flags(argv):
  """absl flag parsing with `--gin.X=Y` rewriting and one-line config errors."""
  try:
    return config_lib.parse_config_flags(rewrite_gin_args(argv), flags.FLAGS)
  except config_lib.ConfigError as err:
    config_lib.exit_on_config_error(err)


def gin_error_line(err: BaseException) -> str:
  """One line for a gin file or binding that gin cannot open or parse (missing file or include,
  syntax error, unknown configurable, parameter or reference), naming the file or binding."""
  if isinstance(err, SyntaxError):
    where = f"{err.filename}, line {err.lineno}" if err.filename else (
        f"--gin_bindings line {err.lineno} of {_GIN_BINDINGS.value}")
    return f"gin: {where}: {err.msg}"
  if isinstance(err, tokenize.TokenError):
    return f"gin: cannot parse the bindings {_GIN_BINDINGS.value}: {err.args[0]}"
  lines = [line.strip() for line in str(err).splitlines() if line.strip().strip("^")]
  return "gin: " + " ".join(lines)


def check_paths(config: Any, workdir: str) -> None:
  """Refuses, before any heavy import, local paths that cannot be what they name: a workdir that
  is a file, a `resume_dir` that does not exist (a typo would silently start from scratch), an
  `aug.txt.spm_path` that is missing or not a SentencePiece model."""
  if "://" not in workdir and os.path.exists(workdir) and not os.path.isdir(workdir):
    raise config_lib.ConfigError(f"--workdir={workdir} is a file, not a directory")
  resume_dir = config.resume_dir
  if resume_dir and "://" not in resume_dir and not os.path.isdir(resume_dir):
    raise config_lib.ConfigError(f"config.resume_dir: {resume_dir} is not a directory")
  text_settings = config.get("aug", {}).get("txt") or {}  # image-only tasks have no text tower
  spm_path = text_settings.get("spm_path", "")
  if text_settings.get("tokenizer") == SENTENCEPIECE and spm_path and "://" not in spm_path:
    if not os.path.isfile(spm_path):
      raise config_lib.ConfigError(
          f"config.aug.txt.spm_path: SentencePiece model not found: {spm_path}")
    import sentencepiece  # pylint: disable=g-import-not-at-top
    try:
      sentencepiece.SentencePieceProcessor(model_file=spm_path)
    except (RuntimeError, OSError) as err:
      raise config_lib.ConfigError(f"config.aug.txt.spm_path: {spm_path} is not a SentencePiece "
                                   f"model ({' '.join(str(err).split())})") from None


def check_resume_checkpoint(config: Any, workdir: str) -> None:
  """Reads the msgpack file and array specs of the checkpoint training will resume from (the
  workdir's newest, else `config.resume_dir`'s): an unreadable one is a CheckpointError naming it
  rather than a traceback from inside the restore."""
  from flip import checkpoints  # pylint: disable=g-import-not-at-top
  for directory in (workdir, config.resume_dir):
    step = checkpoints.latest_complete_step(directory) if directory else None
    if step is not None:
      checkpoints.read_checkpoint(checkpoints.checkpoint_dir(directory, step), lazy=True)
      return


def training_data_error_line(err: BaseException) -> Optional[str]:
  """The LAION pipeline's in-graph check (a source or shard that yields no valid example in an
  epoch: every record unreadable or bad) as one line naming the source; None for other errors."""
  text = str(err).replace("\\'", "'")
  start = text.find(LAION_CHECK_TEXT)
  if start < 0:
    return None
  message = text[start:].splitlines()[0]
  return "training data: " + " ".join(message.replace("[", " ").replace("]", " ").split())


def _initialize_distributed():
  if _COORDINATOR.value is None:
    return
  import jax  # pylint: disable=g-import-not-at-top
  if _CPU_COLLECTIVES.value:
    jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                             num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required")
  config = _CONFIG.value
  try:
    config_lib.validate_config(config)
    check_paths(config, _WORKDIR.value)
  except config_lib.ConfigError as err:
    config_lib.exit_on_config_error(err)

  # Heavy imports only after the command line has been accepted, and before gin is parsed and
  # locked (the modules register gin configurables when imported).
  import gin  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from flip import checkpoints  # pylint: disable=g-import-not-at-top
  from flip import train  # pylint: disable=g-import-not-at-top
  from flip.evals import core as evals_core  # pylint: disable=g-import-not-at-top
  from flip.evals import eval_only  # pylint: disable=g-import-not-at-top
  for path in _GIN_SEARCH_PATHS.value:
    gin.add_config_file_search_path(path)
  try:
    gin.parse_config_files_and_bindings(_GIN_FILES.value, _GIN_BINDINGS.value,
                                        finalize_config=True)
  except (OSError, SyntaxError, ValueError, tokenize.TokenError) as err:
    config_lib.exit_on_config_error(config_lib.ConfigError(gin_error_line(err)))

  _initialize_distributed()
  try:
    if config.eval_only:
      eval_only.run_eval_only(config, _WORKDIR.value)
      return
    check_resume_checkpoint(config, _WORKDIR.value)
    result = train.train_and_evaluate(config, _WORKDIR.value)
  except config_lib.ConfigError as err:
    config_lib.exit_on_config_error(err)
  except FloatingPointError as err:  # train.NonFiniteError, or a non-finite state not saved
    print(f"error: {err}", file=sys.stderr)
    sys.exit(EXIT_NONFINITE)
  except (checkpoints.CheckpointError, checkpoints.CheckpointWriteError,
          evals_core.EvalError) as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(EXIT_RUNTIME_ERROR)
  except tf.errors.InvalidArgumentError as err:
    line = training_data_error_line(err)
    if line is None:
      raise
    print(f"error: {line}", file=sys.stderr)
    sys.exit(EXIT_RUNTIME_ERROR)
  if result["preempted"]:
    print(f"stopped by signal {result['signal']} at step {result['step']} after writing its "
          f"checkpoint; exit status {EXIT_SIGNAL_BASE + result['signal']}", file=sys.stderr)
    sys.exit(EXIT_SIGNAL_BASE + result["signal"])


if __name__ == "__main__":
  process_setup.configure_process()  # before flag parsing imports t5x, jax and tensorflow
  logging.set_verbosity(logging.INFO)
  app.run(main, flags_parser=parse_flags)
