"""An open_clip model imported by `python -m flip.convert.open_clip import ... --dst <dir>`.

    python main.py --workdir=$WD --config=configs/cfg_open_clip.py:<dir> --config.eval_only=True \
        --config.eval_dataset=<image folder or tfds name>

`<dir>` is the converter's output: this config is configs/default.py with the keys of
`<dir>/flip_config.json` applied (the architecture: towers, pooling, QuickGELU, LayerScale,
causal text, open_clip's tokenizer and context length, OpenAI pixel statistics) and
`pretrain_dir=<dir>`, so evaluation, unmasked tuning or further training start from the imported
weights. Other keys are overridden on the command line as usual.
"""

import json
import os

from configs import default

FLIP_CONFIG_FILE = "flip_config.json"  # flip.convert.open_clip.FLIP_CONFIG_FILE


def apply_overrides(config, overrides, where):
  """Sets dotted keys; a key whose parent is not a ConfigDict of the config is one line."""
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
      if part not in node:
        raise ValueError(f"{where}: key {dotted!r} has no place in the config ({part!r} missing)")
      node = node[part]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return config


def get_config(arg=None):
  if not arg:
    raise ValueError("configs/cfg_open_clip.py needs the converted directory: "
                     "--config=configs/cfg_open_clip.py:<dir>")
  path = os.path.join(arg, FLIP_CONFIG_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"{path} not found: is {arg} a directory written by "
                     "`python -m flip.convert.open_clip import`?")
  with open(path) as f:
    overrides = json.load(f)
  config = apply_overrides(default.get_config(), overrides, path)
  config.pretrain_dir = arg
  return config
