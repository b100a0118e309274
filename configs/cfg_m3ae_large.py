"""M3AE ViT-L/16 pretraining: cfg_m3ae_base.py with the large encoder (same recipe)."""

from configs import cfg_m3ae_base


def get_config(arg=None):
  return cfg_m3ae_base.apply_m3ae_arg(cfg_m3ae_base.get_m3ae_config("large"), arg)
