"""FLIP ViT-B/16 on LAION-400M, 10000 virtual ImageNet epochs (FLIP's cfg_flip_base)."""

from configs import default


def get_config(arg=None):
  config = default.get_config()
  config.num_epochs = 10000.0  # FLIP
  config.model.model_img.mask_ratio = 0.5  # FLIP
  default.set_img_tower(config, patch=16, width=768, depth=12, heads=12)  # FLIP base
  default.set_txt_tower(config, width=512, depth=12, heads=8)  # FLIP base
  config.model.clr.proj_dim_out = 512  # FLIP base
  return default.apply_arg(config, arg)
