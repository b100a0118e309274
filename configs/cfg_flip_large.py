"""FLIP ViT-L/16 on LAION-400M, 10000 virtual ImageNet epochs (FLIP's cfg_flip_large)."""

from configs import default


def get_config(arg=None):
  config = default.get_config()
  config.num_epochs = 10000.0  # FLIP: ~32 epochs of LAION-400M
  config.model.model_img.mask_ratio = 0.5  # FLIP
  config.partitioning.partition_states = True  # FLIP: saves memory
  return default.apply_arg(config, arg)
