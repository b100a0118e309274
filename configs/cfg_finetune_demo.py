"""A short fine-tuning of the MAE demo encoder on Fashion-MNIST (`make demo-mae`;
cfg_finetune_base's recipe, shrunk). Pass the pretrained run with `--config.pretrain_dir`."""

from configs import cfg_finetune_base
from configs import cfg_mae_base
from configs import cfg_mae_demo


def get_config(arg=None):
  config = cfg_mae_demo.demo_data_and_encoder(cfg_finetune_base.get_finetune_config("base"))
  config.aug.area_range = (0.5, 1.0)
  config.aug.randaug.magnitude = 5.0  # 28 px images: milder than MAE's 9
  config.batch_size = 256
  config.learning_rate = 1e-3
  config.classifier.layer_decay = 0.75
  config.model.model_img.transformer.droppath_rate = 0.1
  config.warmup_epochs = 0.1
  config.num_epochs = 1.0
  config.log_every_steps = 50
  config.save_every_epochs = 1.0
  config.eval_every_epochs = 0.0  # held-out accuracy once, at the end
  return cfg_mae_base.apply_image_arg(config, arg)
