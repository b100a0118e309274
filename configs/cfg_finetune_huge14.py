"""Fine-tuning of a pretrained ViT-H/14 on ImageNet-1k (same recipe as cfg_finetune_base)."""

from configs import cfg_mae_base
from configs import cfg_finetune_base


def get_config(arg=None):
  return cfg_mae_base.apply_image_arg(cfg_finetune_base.get_finetune_config("huge14"), arg)
