"""M3AE ViT-S/16 pretraining: cfg_m3ae_base.py with the small encoder (same recipe)."""

from configs import cfg_m3ae_base


def get_config(arg=None):
  return cfg_m3ae_base.apply_m3ae_arg(cfg_m3ae_base.get_m3ae_config("small"), arg)
