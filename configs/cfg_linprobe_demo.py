"""Linear probe of the MAE demo encoder on Fashion-MNIST (`make demo-mae`; cfg_linprobe_base's
recipe, shrunk). Pass the pretrained run with `--config.pretrain_dir`; without it the encoder is
random (the baseline a trained encoder must beat)."""

from configs import cfg_linprobe_base
from configs import cfg_mae_base
from configs import cfg_mae_demo


def get_config(arg=None):
  config = cfg_mae_demo.demo_data_and_encoder(cfg_linprobe_base.get_linprobe_config("base"))
  config.model.model_img.pool = "avg"
  config.aug.area_range = (0.5, 1.0)
  config.batch_size = 512
  config.learning_rate = 0.1  # MAE's probe lr per 256
  config.warmup_epochs = 0.2
  config.num_epochs = 2.0
  config.log_every_steps = 50
  config.save_every_epochs = 2.0
  config.eval_every_epochs = 0.0  # held-out accuracy once, at the end
  return cfg_mae_base.apply_image_arg(config, arg)
