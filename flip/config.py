"""Experiment configs: loading `configs/*.py` with dotted overrides, and validating them.

Configs are ml_collections ConfigDicts (FLIP's key names; `configs/default.py` documents them).
Overrides use ml_collections' own flag syntax (`--config.model.model_img.mask_ratio=0.0`), which is
type-checked against the default's type. Every failure before training starts is a `ConfigError`
with one line that names the key: a misspelled key, a value of the wrong type, a value outside its
allowed set or range. `main.py` prints that line and exits with status 2; nothing is computed first.
"""

import difflib
import os
import sys
from typing import Any, Iterable, List, Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags

_CONFIG_FLAG = "config"


class ConfigError(ValueError):
  """A configuration problem, reported as one line naming the key."""


_TRACEBACK_HEADER = "Traceback (most recent call last):"


def _flag_error_line(err: BaseException) -> str:
  """The useful last line of an absl/ml_collections parsing error."""
  text = str(err).strip()
  if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
    text = text[1:-1]
  text = text.replace("\\n", "\n").replace("\\'", "'")
  if _TRACEBACK_HEADER in text:
    # ml_collections embeds the config file's whole traceback: keep only its last line.
    head, trace = text.split(_TRACEBACK_HEADER, 1)
    lines = [line for line in trace.splitlines() if line.strip()]
    text = head + (lines[-1] if lines else "")
  return " ".join(text.split())


def _unknown_key_message(config: ml_collections.ConfigDict, dotted: str) -> str:
  node: Any = config
  parts = dotted.split(".")
  for depth, part in enumerate(parts):
    if isinstance(node, ml_collections.ConfigDict) and part in node:
      node = node[part]
      continue
    parent = ".".join(["config"] + parts[:depth])
    keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    close = difflib.get_close_matches(part, keys, n=1)
    hint = f" (did you mean {parent}.{close[0]}?)" if close else ""
    return f"unknown config key config.{dotted}: {parent} has no key {part!r}{hint}"
  return f"config.{dotted} is not a settable key"


def override_keys(argv: Iterable[str], flag_name: str = _CONFIG_FLAG) -> List[str]:
  """Dotted keys of `--config.KEY=VALUE` / `--config.KEY VALUE` arguments, in order."""
  prefix = f"--{flag_name}."
  keys = []
  for arg in argv:
    if arg.startswith(prefix):
      keys.append(arg[len(prefix):].split("=", 1)[0])
  return keys


def check_override_keys(config: ml_collections.ConfigDict, keys: Iterable[str]) -> None:
  """Raises ConfigError naming the first override key the config does not have."""
  for dotted in keys:
    node: Any = config
    for part in dotted.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ConfigError(_unknown_key_message(config, dotted))
      node = node[part]


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path` (optionally `path:arg`) and applies `key=value` overrides, as main.py does.

  `overrides` are dotted keys without the `--config.` prefix, e.g. "learning_rate=4e-8".
  """
  argv = ["flip", f"--{_CONFIG_FLAG}={path}"] + [f"--{_CONFIG_FLAG}.{o}" for o in overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(_CONFIG_FLAG, default=None, flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  parse_config_flags(argv, flag_values)
  return flag_values[_CONFIG_FLAG].value


def _make_config_package_importable(argv: Sequence[str]) -> None:
  """Config files import their siblings as `configs.default`: put the folder's parent on the path."""
  for arg in argv:
    if arg.startswith(f"--{_CONFIG_FLAG}="):
      config_dir = os.path.dirname(os.path.abspath(arg.split("=", 1)[1].split(":", 1)[0]))
      if os.path.exists(os.path.join(config_dir, "__init__.py")):
        root = os.path.dirname(config_dir)
        if root not in sys.path:
          sys.path.insert(0, root)


def _check_config_file_exists(argv: Sequence[str]) -> None:
  """ml_collections defers a missing config file to the first use of the config: fail now."""
  for arg in argv:
    if arg.startswith(f"--{_CONFIG_FLAG}="):
      path = arg.split("=", 1)[1].split(":", 1)[0]
      if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found (--{_CONFIG_FLAG}="
                          f"{arg.split('=', 1)[1]})")


def _config_path(argv: Sequence[str]) -> str:
  paths = [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"--{_CONFIG_FLAG}=")]
  return paths[-1] if paths else "(none)"


def parse_config_flags(argv: Sequence[str],
                       flag_values: flags.FlagValues = flags.FLAGS) -> List[str]:
  """Parses argv into `flag_values` (returning the unparsed arguments, as absl does), turning any
  config problem into a one-line ConfigError."""
  _make_config_package_importable(argv)
  _check_config_file_exists(argv)
  try:
    return flag_values(list(argv))
  except SyntaxError as err:
    raise ConfigError(f"config file {err.filename}, line {err.lineno}: {err.msg}") from None
  except (ImportError, NameError) as err:
    raise ConfigError(f"config file {_config_path(argv)}: {type(err).__name__}: "
                      f"{_flag_error_line(err)}") from None
  except (AttributeError, KeyError) as err:
    keys = override_keys(argv)
    config = _base_config_or_none(argv, flag_values)
    if config is not None and keys:
      try:
        check_override_keys(config, keys)
      except ConfigError as key_err:
        raise key_err from None
    if config is None:
      raise ConfigError(f"config file {_config_path(argv)}: {_flag_error_line(err)}") from None
    raise ConfigError(f"bad config override: {_flag_error_line(err)}") from None
  except flags.Error as err:
    raise ConfigError(_flag_error_line(err)) from None
  except (TypeError, ValueError) as err:
    raise ConfigError(f"bad config value: {_flag_error_line(err)}") from None


def _base_config_or_none(argv: Sequence[str], flag_values: flags.FlagValues):
  """The config file's config without overrides, to name a bad override key precisely."""
  path = None
  for arg in argv:
    if arg.startswith(f"--{_CONFIG_FLAG}="):
      path = arg.split("=", 1)[1]
  if path is None:
    return None
  fresh = flags.FlagValues()
  fresh_argv = ["flip", f"--{_CONFIG_FLAG}={path}"]
  config_flags.DEFINE_config_file(_CONFIG_FLAG, default=None, flag_values=fresh,
                                  sys_argv=fresh_argv)
  try:
    fresh(fresh_argv)
  except Exception:  # pylint: disable=broad-except
    return None
  return fresh[_CONFIG_FLAG].value


# --- validation -------------------------------------------------------------------------------

_CHOICES = {
    "opt_type": ("adamw", "sgd", "lars"),
    "opt_mu_dtype": ("float32", "bfloat16"),
    "dtype": ("float32", "bfloat16", "float16"),
    "aug.txt.tokenizer": ("tf_bert", "sentencepiece", "byte", "open_clip"),
    "model.clr.loss": ("softmax", "sigmoid"),
    "model.model_img.pool": ("avg", "avg_all", "cls"),
    "model.model_img.transformer.gelu": ("exact", "tanh", "quick"),
    "model.model_img.transformer.qkv_layout": ("separate", "fused"),
    "model.model_txt.pool": ("first", "avg", "eot"),
    "model.model_txt.transformer.gelu": ("exact", "tanh", "quick"),
    "model.model_txt.transformer.qkv_layout": ("separate", "fused"),
}
# remat_policy takes any name, as in FLIP: "none", "minimal", and every other name = full remat.
_NAMES = ("model.model_img.transformer.remat_policy", "model.model_txt.transformer.remat_policy")
_POSITIVE = ("batch_size", "image_size", "samples_per_epoch", "num_epochs", "log_every_steps",
             "grad_accum_steps", "keep_checkpoints", "aug.txt.max_len", "model.clr.proj_dim_out",
             "partitioning.num_partitions")
_NON_NEGATIVE = ("learning_rate", "warmup_epochs", "min_abs_lr", "warmup_abs_lr",
                 "opt.weight_decay", "opt.clip_grad", "save_every_epochs",
                 "checkpoint_every_steps", "eval_every_epochs")
_RATES = ("model.model_img.transformer.dropout_rate",
          "model.model_img.transformer.attention_dropout_rate",
          "model.model_img.transformer.droppath_rate",
          "model.model_txt.transformer.dropout_rate",
          "model.model_txt.transformer.attention_dropout_rate",
          "model.model_txt.transformer.droppath_rate")


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node: Any = config
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks choices, ranges and tower shapes; raises ConfigError naming the first bad key."""
  for key, choices in _CHOICES.items():
    value = _get(config, key)
    if value is not _MISSING and value not in choices:
      raise ConfigError(f"config.{key} must be one of {choices}, got {value!r}")
  for key in _NAMES:
    value = _get(config, key)
    if value is not _MISSING and (not isinstance(value, str) or not value):
      raise ConfigError(f"config.{key} must be a policy name (none | minimal | any other name = "
                        f"full remat), got {value!r}")
  for key in _POSITIVE:
    value = _get(config, key)
    if value is not _MISSING and not value > 0:
      raise ConfigError(f"config.{key} must be > 0, got {value!r}")
  for key in _NON_NEGATIVE:
    value = _get(config, key)
    if value is not _MISSING and value < 0:
      raise ConfigError(f"config.{key} must be >= 0, got {value!r}")
  for key in _RATES:
    value = _get(config, key)
    if value is not _MISSING and not 0.0 <= value < 1.0:
      raise ConfigError(f"config.{key} must be in [0, 1), got {value!r}")
  ratio = _get(config, "model.model_img.mask_ratio")
  if ratio is not _MISSING and not 0.0 <= ratio < 1.0:
    raise ConfigError(f"config.model.model_img.mask_ratio must be in [0, 1), got {ratio!r}")
  _validate_towers(config)
  flatten = _get(config, "opt.flatten_params")
  partitions = _get(config, "partitioning.num_partitions")
  if flatten is True and partitions is not _MISSING and partitions > 1:
    raise ConfigError("config.opt.flatten_params=True keeps Adam's moments of 2-D parameters as "
                      "[rows * cols, 1] columns, which have no axis to shard over model: it needs "
                      f"config.partitioning.num_partitions=1, got {partitions}")
  if config.batch_size % config.grad_accum_steps:
    raise ConfigError(f"config.batch_size {config.batch_size} is not divisible by "
                      f"config.grad_accum_steps {config.grad_accum_steps}")


def _validate_towers(config: ml_collections.ConfigDict) -> None:
  img = _get(config, "model.model_img")
  if img is not _MISSING:
    patch = tuple(img.patches.size)
    if len(patch) != 2 or config.image_size % patch[0] or config.image_size % patch[1]:
      raise ConfigError(f"config.image_size {config.image_size} is not divisible by "
                        f"config.model.model_img.patches.size {patch}")
    if img.hidden_size % img.transformer.num_heads:
      raise ConfigError(f"config.model.model_img.hidden_size {img.hidden_size} is not divisible "
                        f"by config.model.model_img.transformer.num_heads "
                        f"{img.transformer.num_heads}")
    if img.sincos and img.hidden_size % 4:
      raise ConfigError(f"config.model.model_img.hidden_size {img.hidden_size} must be divisible "
                        "by 4 for the 2-D sin-cos position embedding (sincos=True)")
    if img.pool == "cls" and not img.use_cls_token:
      raise ConfigError("config.model.model_img.pool='cls' needs "
                        "config.model.model_img.use_cls_token=True")
  txt = _get(config, "model.model_txt")
  if txt is not _MISSING and txt.hidden_size % txt.transformer.num_heads:
    raise ConfigError(f"config.model.model_txt.hidden_size {txt.hidden_size} is not divisible by "
                      f"config.model.model_txt.transformer.num_heads {txt.transformer.num_heads}")


def exit_on_config_error(err: ConfigError) -> None:
  """Prints the one-line problem and exits with status 2 (like a usage error). Only the first
  line: gin appends "In call to configurable ..." lines to errors raised under a configurable."""
  lines = str(err).splitlines() or [""]
  print(f"config error: {lines[0]}", file=sys.stderr)
  sys.exit(2)
