"""Linear probe of a pretrained ViT-B/16 on ImageNet-1k (MAE LINPROBE.md / paper Appendix A.2).

    python3 main.py --workdir=$WD --config=configs/cfg_linprobe_base.py --config.pretrain_dir=$PRE

`config.pretrain_dir` is an MAE, FLIP or other run of this project: its `img_encoder` parameters
are loaded, frozen, and a BatchNorm without affine parameters plus a linear head are trained with
LARS. The encoder keys must describe the checkpoint's encoder: MAE's has a class token (probed, as
in MAE) and a fused q/k/v; a FLIP image tower has separate q/k/v and tanh GELU, so probe it with
`--config.model.model_img.transformer.qkv_layout=separate
--config.model.model_img.transformer.gelu=tanh --config.model.model_img.pool=avg_all` (FLIP's
feature: the average of all tokens).
`cfg_linprobe_large.py` / `cfg_linprobe_huge14.py` change only the encoder size.
"""

import ml_collections

from configs import cfg_mae_base


def get_linprobe_config(size: str) -> ml_collections.ConfigDict:
  config = cfg_mae_base.image_family_config(size)
  config.task = "linprobe"
  config.classifier = ml_collections.ConfigDict()
  config.classifier.frozen_encoder = True  # MAE linear probe
  config.classifier.feature_batchnorm = True  # MAE: BatchNorm1d(affine=False, eps=1e-6) before the head
  config.classifier.head_init_std = 0.01  # MAE: trunc_normal_(head.weight, std=0.01)
  config.classifier.layer_decay = 1.0  # off
  config.classifier.label_smoothing = 0.0  # MAE probe: plain cross-entropy

  config.opt_type = "lars"  # MAE
  config.opt.momentum = 0.9  # MAE's LARS
  config.opt.trust_coefficient = 0.001  # MAE's LARS
  config.opt.weight_decay = 0.0  # MAE
  config.learning_rate = 0.1  # MAE: base lr per 256
  config.batch_size = 16384  # MAE
  config.num_epochs = 90.0  # MAE (ViT-B/L; 90 epochs)
  config.warmup_epochs = 10.0  # MAE
  config.min_abs_lr = 0.0
  config.warmup_abs_lr = 0.0

  config.aug.area_range = (0.08, 1.0)  # MAE probe: RandomResizedCrop(224) + flip
  config.aug.flip = True
  config.aug.randaug = ml_collections.ConfigDict({"num_layers": 0, "magnitude": 9.0,
                                                  "magnitude_std": 0.5})  # off
  config.aug.mixup = ml_collections.ConfigDict({"mixup_alpha": 0.0, "cutmix_alpha": 0.0,
                                                "prob": 1.0, "switch_prob": 0.5})  # off
  config.aug.reprob = 0.0  # off
  config.save_every_epochs = 10.0
  config.eval_every_epochs = 10.0  # ours: held-out top-1/top-5
  config.log_every_steps = 50
  config.evals.classification = cfg_mae_base.classification_eval(config)
  return config


def get_config(arg=None):
  return cfg_mae_base.apply_image_arg(get_linprobe_config("base"), arg)
