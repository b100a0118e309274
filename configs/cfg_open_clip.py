"""open_clip's CLIP architectures: an imported open_clip model, or open_clip's ViT-B-16 itself.

    python -m flip.convert.open_clip import --src=<weights> --model=ViT-B-16 --dst=<dir>
    python main.py --workdir=$WD --config=configs/cfg_open_clip.py:<dir> --config.eval_only=True \
        --config.eval_dataset=<image folder or tfds name>

With `:<dir>` (the converter's output) this is configs/default.py with the keys of
`<dir>/flip_config.json` applied (the architecture: towers, pooling, QuickGELU, LayerScale, causal
text, open_clip's tokenizer and context length, OpenAI pixel statistics) and `pretrain_dir=<dir>`,
so evaluation, unmasked tuning or further training start from the imported weights. Without an
argument it is open_clip's ViT-B-16 architecture (model_configs/ViT-B-16.json) mapped the same
way, from scratch; `:smoke` shrinks that to the CPU smoke size. Other keys are overridden on the
command line as usual.
"""

import json

from configs import default
from flip import paths
from flip.convert import open_clip_arch

FLIP_CONFIG_FILE = "flip_config.json"  # flip.convert.open_clip.FLIP_CONFIG_FILE
# open_clip 3.3's model_configs/ViT-B-16.json.
VIT_B_16 = {"embed_dim": 512,
            "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8,
                         "layers": 12}}


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
  if not arg or arg == "smoke":
    overrides = open_clip_arch.flip_overrides(open_clip_arch.parse_model_config(VIT_B_16))
    return default.apply_arg(apply_overrides(default.get_config(), overrides, "ViT-B-16"), arg)
  path = paths.join(arg, FLIP_CONFIG_FILE)  # local, or gs:// through tf.io.gfile
  if not paths.exists(path):
    raise ValueError(f"{path} not found: is {arg} a directory written by "
                     "`python -m flip.convert.open_clip import`?")
  with paths.open_file(path, "r") as f:
    overrides = json.load(f)
  config = apply_overrides(default.get_config(), overrides, path)
  config.pretrain_dir = arg
  return config
