"""MAE ViT-H/14 pretraining on ImageNet-1k (MAE PRETRAIN.md; same recipe as cfg_mae_base)."""

from configs import cfg_mae_base


def get_config(arg=None):
  return cfg_mae_base.apply_image_arg(cfg_mae_base.get_mae_config("huge14"), arg)
