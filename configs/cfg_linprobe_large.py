"""Linear probe of a pretrained ViT-L/16 on ImageNet-1k (same recipe as cfg_linprobe_base)."""

from configs import cfg_mae_base
from configs import cfg_linprobe_base


def get_config(arg=None):
  return cfg_mae_base.apply_image_arg(cfg_linprobe_base.get_linprobe_config("large"), arg)
