"""Linear probe of a pretrained ViT-H/14 on ImageNet-1k: cfg_linprobe_base's recipe, 50 epochs
(MAE LINPROBE.md: 50 epochs suffice for ViT-L/H instead of ViT-B's 90)."""

from configs import cfg_mae_base
from configs import cfg_linprobe_base


LARGE_MODEL_PROBE_EPOCHS = 50.0  # MAE LINPROBE.md, ViT-L/H


def get_config(arg=None):
  config = cfg_linprobe_base.get_linprobe_config("huge14")
  config.num_epochs = LARGE_MODEL_PROBE_EPOCHS
  return cfg_mae_base.apply_image_arg(config, arg)
