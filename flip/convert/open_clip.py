"""open_clip CLIP checkpoints in and out: `python -m flip.convert.open_clip import|export ...`.

    python -m flip.convert.open_clip import --src <weights .safetensors | .bin | .pt> \
        (--model <open_clip model name, e.g. ViT-B-16> | --model-config <model config JSON>) \
        --dst <new dir>
    python -m flip.convert.open_clip import --src <open_clip local dir / Hugging Face snapshot: \
        open_clip_config.json + open_clip_model.safetensors (or open_clip_pytorch_model.bin)> \
        --dst <new dir>
    python main.py --workdir=$WD --config=configs/cfg_open_clip.py:<dir> --config.eval_only=True \
        --config.eval_dataset=<image folder or tfds name>

    python -m flip.convert.open_clip export --src <checkpoint dir> --config <our config> \
        --dst <file.safetensors>

Import reads an open_clip CLIP state dict (`safetensors.numpy`; `.bin`/`.pt` only through
`torch.load(weights_only=True)`, which runs no code from the file; a `{"state_dict": ...}` wrapper
and a `module.` prefix, as open_clip's training saves them, are unwrapped), maps every tensor onto
our FlipModel (flip.convert.open_clip_map) for the architecture of the model config
(flip.convert.open_clip_arch: `--model` names a JSON of open_clip's own `model_configs/`, read
without importing open_clip; `--model-config` a JSON file, also an `open_clip_config.json` with
`model_cfg` and `preprocess_cfg`) and writes into `--dst`:
  checkpoint_0/            our parameters (a t5x checkpoint without optimizer state, as
                           flip.convert.flip_t5x writes), what `config.pretrain_dir` loads;
  flip_config.json         the config keys of this architecture, which configs/cfg_open_clip.py
                           applies over configs/default.py (and sets pretrain_dir to the dir);
  open_clip_config.json    the model config it came from.
Export writes our FLIP checkpoint's parameters as an open_clip CLIP state dict (safetensors) that
`open_clip.create_model` loads with strict=True, and next to it `<name>.json`, the open_clip model
config (`open_clip.add_model_config(<name>.json)` registers it as `<name>`).
Any problem is one line naming the key, file or setting (exit status 2).
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from flip import checkpoints
from flip import config as config_lib
from flip import paths
from flip.convert import open_clip_arch as arch_lib
from flip.convert import open_clip_map as map_lib

FLIP_CONFIG_FILE = "flip_config.json"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "cfg_open_clip.py")
SAFETENSORS = ".safetensors"
# The weight files open_clip's `local-dir:` / hf-hub loading looks for, in its order of preference.
DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
               "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
INSTALL_HINT = "pip install '.[openclip]'"


class ConversionError(ValueError):
  """An input that cannot be converted, in one line."""


# --- reading ------------------------------------------------------------------------------------

def _torch_to_numpy(value: Any, key: str, src: str) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  if not isinstance(value, torch.Tensor):
    raise ConversionError(f"{src}: {key} is a {type(value).__name__}, not a tensor")
  if value.is_floating_point():
    value = value.float()
  return value.detach().cpu().numpy()


def read_state_dict(src: str) -> Dict[str, np.ndarray]:
  """The state dict in `src` as numpy arrays (safetensors, or torch's weights-only unpickler)."""
  if not paths.exists(src):
    raise ConversionError(f"--src {src} does not exist")
  suffix = os.path.splitext(src)[1].lower()
  if suffix == SAFETENSORS:
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
    with paths.open_file(src, "rb") as f:
      try:
        state = st_numpy.load(f.read())
      except Exception as err:  # pylint: disable=broad-except
        raise ConversionError(f"--src {src}: not a readable safetensors file "
                              f"({' '.join(str(err).split())})") from None
  elif suffix in TORCH_SUFFIXES:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConversionError(f"--src {src}: reading {suffix} files needs torch ({INSTALL_HINT}); "
                            "or pass the .safetensors weights") from None
    with paths.open_file(src, "rb") as f:
      try:
        loaded = torch.load(f, map_location="cpu", weights_only=True)
      except Exception as err:  # pylint: disable=broad-except
        raise ConversionError(f"--src {src}: torch.load(weights_only=True) refused it "
                              f"({' '.join(str(err).split())[:200]})") from None
    if isinstance(loaded, Mapping) and "state_dict" in loaded:
      loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
      raise ConversionError(f"--src {src} holds a {type(loaded).__name__}, not a state dict")
    state = {k: _torch_to_numpy(v, k, src) for k, v in loaded.items()}
  else:
    raise ConversionError(f"--src {src}: expected {SAFETENSORS} or one of {TORCH_SUFFIXES}")
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return state


def open_clip_config_dir() -> str:
  """open_clip's `model_configs/` directory, found without importing open_clip (or torch)."""
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    raise ConversionError(f"--model needs the open_clip package for its model configs "
                          f"({INSTALL_HINT}); or pass --model-config <json>")
  return os.path.join(list(spec.submodule_search_locations)[0], "model_configs")


def read_model_config(model: Optional[str], model_config: Optional[str]) -> Dict[str, Any]:
  """The open_clip model config named by `--model` or read from `--model-config`."""
  if bool(model) == bool(model_config):
    raise ConversionError("pass exactly one of --model <open_clip model name> and "
                          "--model-config <json>")
  if model:
    path = os.path.join(open_clip_config_dir(), f"{model}.json")
    if not os.path.isfile(path):
      raise ConversionError(f"--model {model}: open_clip has no model config {path}")
  else:
    path = model_config
    if not paths.exists(path):
      raise ConversionError(f"--model-config {path} does not exist")
  with paths.open_file(path, "r") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as err:
      raise ConversionError(f"{path}: not JSON ({err})") from None


def resolve_source(src: str, model: Optional[str],
                   model_config: Optional[str]) -> Tuple[str, Dict[str, Any], str]:
  """(weights file, model config, where it came from) of `--src` and the model flags; a
  directory is open_clip's local-dir layout (its open_clip_config.json unless a flag names one)."""
  if paths.exists(src) and paths.isdir(src):
    found = [name for name in DIR_WEIGHTS if paths.exists(paths.join(src, name))]
    if not found:
      raise ConversionError(f"--src {src} is a directory without open_clip weights "
                            f"({', '.join(DIR_WEIGHTS)})")
    weights = paths.join(src, found[0])
    if not model and not model_config:
      model_config = paths.join(src, OPEN_CLIP_CONFIG_FILE)
      if not paths.exists(model_config):
        raise ConversionError(f"--src {src} has no {OPEN_CLIP_CONFIG_FILE}: pass --model or "
                              "--model-config")
    src = weights
  where = f"--model {model}" if model else f"{model_config}"
  return src, read_model_config(model, model_config), where


# --- import -------------------------------------------------------------------------------------

def flip_config_for(directory: str) -> Any:
  """Our config for a converted directory: configs/cfg_open_clip.py:<directory>."""
  return config_lib.load_config(f"{CONFIG_FILE}:{directory}")


def _check_against_model(flat: Mapping[str, np.ndarray], shapes: Any) -> None:
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  target = traverse_util.flatten_dict(dict(shapes), sep="/")
  missing = sorted(set(target) - set(flat))
  extra = sorted(set(flat) - set(target))
  misshaped = sorted(f"{k} {flat[k].shape} vs {tuple(target[k].shape)}"
                     for k in set(flat) & set(target) if flat[k].shape != tuple(target[k].shape))
  if missing or extra or misshaped:
    raise ConversionError(f"the mapped parameters do not fit the model cfg_open_clip builds: "
                          f"missing {missing[:3]}, extra {extra[:3]}, misshaped {misshaped[:3]}")


def import_open_clip(src: str, model_cfg: Mapping[str, Any], dst: str,
                     where: str = "model config") -> str:
  """open_clip weights `src` of architecture `model_cfg` -> our `dst` directory (see module)."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from flip.convert import flip_t5x  # pylint: disable=g-import-not-at-top
  if paths.exists(dst) and paths.listdir(dst):
    raise ConversionError(f"--dst {dst} is not empty")
  arch = arch_lib.parse_model_config(model_cfg, where)
  flat = map_lib.to_flip(read_state_dict(src), arch, source=src)
  overrides = arch_lib.flip_overrides(arch)
  with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, FLIP_CONFIG_FILE), "w") as f:
      json.dump(overrides, f, indent=1)
    config = flip_config_for(tmp)
  config_lib.validate_config(config)  # what main.py checks before it runs
  _, shapes, axes = flip_t5x.model_and_shapes(config)
  _check_against_model(flat, shapes)
  params = traverse_util.unflatten_dict(flat, sep="/")
  out = flip_t5x.write_params_checkpoint(dst, params, axes)
  for name, content in ((FLIP_CONFIG_FILE, overrides), (OPEN_CLIP_CONFIG_FILE, dict(model_cfg))):
    with paths.open_file(paths.join(dst, name), "w") as f:
      json.dump(content, f, indent=1)
  return out


# --- export -------------------------------------------------------------------------------------

def flip_params(src: str, config: Any) -> Dict[str, np.ndarray]:
  """The parameters of our checkpoint `src`, fitted to `config`'s model, flat {path: array}."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from flip.convert import flip_t5x  # pylint: disable=g-import-not-at-top
  _, shapes, _ = flip_t5x.model_and_shapes(config)
  ckpt_dir = checkpoints.find_checkpoint_dir(src)
  contents = checkpoints.load_state_tree(ckpt_dir)
  params = checkpoints.match_params(contents.get("target", {}), shapes, source=ckpt_dir)
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def export_open_clip(src: str, config: Any, dst: str) -> str:
  """Our checkpoint `src` (model of `config`) -> open_clip state dict `dst` + model config JSON;
  returns the JSON's path."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  if not dst.endswith(SAFETENSORS):
    raise ConversionError(f"--dst {dst}: the export is a {SAFETENSORS} file")
  arch = arch_lib.arch_from_flip_config(config)
  flat = map_lib.canonical_params(flip_params(src, config), config, arch)
  bias = flat.get("logit_bias")
  state = map_lib.to_open_clip(flat, arch, source=src)
  model_cfg = arch_lib.open_clip_model_config(
      arch, None if bias is None else float(np.reshape(bias, ())))
  json_path = dst[:-len(SAFETENSORS)] + ".json"
  with paths.open_file(dst, "wb") as f:
    f.write(st_numpy.save(state))
  with paths.open_file(json_path, "w") as f:
    json.dump(model_cfg, f, indent=1)
  return json_path


# --- command line -------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m flip.convert.open_clip",
                                   description="open_clip CLIP weights in and out.")
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="open_clip state dict -> our pretrain_dir")
  imp.add_argument("--src", required=True, help=".safetensors, or .bin/.pt (weights only), or "
                   "an open_clip local dir / Hugging Face snapshot")
  imp.add_argument("--model", help="open_clip model name (its model_configs/<name>.json)")
  imp.add_argument("--model-config", dest="model_config", help="open_clip model config JSON")
  imp.add_argument("--dst", required=True, help="new directory")
  exp = sub.add_parser("export", help="our checkpoint -> open_clip state dict (safetensors)")
  exp.add_argument("--src", required=True, help="our checkpoint (dir or checkpoint_<step>)")
  exp.add_argument("--config", required=True, help="our config of that model, e.g. "
                   "configs/cfg_open_clip.py:<dir>")
  exp.add_argument("--dst", required=True, help="<file>.safetensors (and <file>.json is written)")
  return parser


def main(argv=None) -> int:
  from flip import process_setup  # pylint: disable=g-import-not-at-top
  args = _parser().parse_args(argv)
  process_setup.configure_process()
  try:
    if args.command == "import":
      src, model_cfg, where = resolve_source(args.src, args.model, args.model_config)
      out = import_open_clip(src, model_cfg, args.dst, where)
      print(f"wrote {out}; evaluate with --config={os.path.relpath(CONFIG_FILE)}:{args.dst} "
            "--config.eval_only=True --config.eval_dataset=<images>")
    else:
      config = config_lib.load_config(args.config)
      out = export_open_clip(args.src, config, args.dst)
      mean, std = arch_lib.preprocess_stats(arch_lib.arch_from_flip_config(config))
      print(f"wrote {args.dst} and {out} (open_clip.add_model_config('{out}')); preprocess "
            f"images with mean={mean} std={std}")
  except (ConversionError, arch_lib.ArchError, map_lib.MappingError, checkpoints.CheckpointError,
          config_lib.ConfigError) as err:
    print(f"flip.convert.open_clip: {str(err).splitlines()[0]}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
