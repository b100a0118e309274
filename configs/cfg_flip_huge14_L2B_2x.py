"""FLIP ViT-H/14 on LAION-2B, 20000 virtual ImageNet epochs (FLIP's cfg_flip_huge14_L2B_2x)."""

from configs import default


def get_config(arg=None):
  config = default.get_config()
  config.num_epochs = 20000.0  # FLIP
  config.model.model_img.mask_ratio = 0.5  # FLIP
  config.warmup_epochs = 200.0  # FLIP huge
  config.learning_rate = 2e-6  # FLIP: LAION-2B
  default.set_img_tower(config, patch=14, width=1280, depth=32, heads=16)  # FLIP huge
  default.set_txt_tower(config, width=1024, depth=24, heads=16)  # FLIP huge
  config.model.clr.proj_dim_out = 1024  # FLIP huge
  config.opt.flatten_params = True  # FLIP huge
  return default.apply_arg(config, arg)
