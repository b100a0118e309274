"""FLIP ViT-L/16 on LAION-2B, 20000 virtual ImageNet epochs (FLIP's cfg_flip_large_L2B_2x)."""

from configs import default


def get_config(arg=None):
  config = default.get_config()
  config.num_epochs = 20000.0  # FLIP
  config.model.model_img.mask_ratio = 0.5  # FLIP
  config.partitioning.partition_states = True  # FLIP
  config.learning_rate = 2e-6  # FLIP: LAION-2B
  return default.apply_arg(config, arg)
