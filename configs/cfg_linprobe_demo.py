"""Linear probe of the MAE demo encoder on Fashion-MNIST (`make demo-mae`; cfg_linprobe_base's
probe, shrunk). Pass the pretrained run with `--config.pretrain_dir`; without it the encoder is
random (the baseline a trained encoder must beat).

The probe is the recipe's (frozen encoder, BatchNorm without affine, linear head, no weight decay,
no mixing or erasing) but with SGD + momentum instead of LARS: LARS moves the head's kernel by at
most lr x trust coefficient (1e-3) x its norm per step, which MAE's ~7,000 steps (90 epochs at
batch 16384) add up and a one-epoch demo does not. Measured on the demo encoder (docs/MAE.md):
LARS at lr 0.1 12.5 % held-out top-1, at lr 10 63.6 %, this SGD probe 68.1 %.
`--config.opt_type=lars --config.learning_rate=...` runs the LARS probe.
"""

from configs import cfg_linprobe_base
from configs import cfg_mae_base
from configs import cfg_mae_demo


def get_config(arg=None):
  config = cfg_mae_demo.demo_data_and_encoder(cfg_linprobe_base.get_linprobe_config("base"))
  # bfloat16 compute, float32 accumulation and parameters (flip.models.precision): measured
  # faster than float32 on CPUs with bfloat16 matrix units at the same held-out figures
  # (docs/BENCHMARKS.md, "The MAE demo in bfloat16"); "float32" runs the float32 program.
  config.dtype = "bfloat16"
  config.model.model_img.pool = "avg"  # the feature the fine-tuning uses too
  config.aug.area_range = (0.5, 1.0)
  config.opt_type = "sgd"
  config.opt.momentum = 0.9
  config.learning_rate = 1.0  # per 256
  config.warmup_epochs = 0.1
  config.num_epochs = 1.0
  config.save_every_epochs = 1.0
  config.eval_every_epochs = 0.0  # held-out accuracy once, at the end
  return cfg_mae_base.apply_image_arg(config, arg)
