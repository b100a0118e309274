"""End-to-end fine-tuning of a pretrained ViT-B/16 on ImageNet-1k (MAE FINETUNE.md).

    python3 main.py --workdir=$WD --config=configs/cfg_finetune_base.py --config.pretrain_dir=$PRE

`config.pretrain_dir` is an MAE, FLIP or other run of this project (its `img_encoder` parameters are
loaded; the head starts fresh). Layer-wise lr decay 0.65, drop path 0.1, label smoothing 0.1,
mixup 0.8 / cutmix 1.0, RandAugment m9 mstd0.5, random erasing 0.25, AdamW (0.9, 0.999), wd 0.05,
base lr 5e-4 per 256 at batch 1024, 100 epochs with 5 of warmup, the average of the patch tokens
as the feature (MAE's global pool). ViT-L/H: `cfg_finetune_large.py`, `cfg_finetune_huge14.py`.
A FLIP image tower has separate q/k/v and tanh GELU: add
`--config.model.model_img.transformer.qkv_layout=separate`
`--config.model.model_img.transformer.gelu=tanh`.
"""

import ml_collections

from configs import cfg_mae_base

# MAE FINETUNE.md per model size: base lr per 256, layer decay, epochs, drop path.
RECIPES = {
    "base": dict(learning_rate=5e-4, layer_decay=0.65, num_epochs=100.0, droppath=0.1),
    "large": dict(learning_rate=1e-3, layer_decay=0.75, num_epochs=50.0, droppath=0.2),
    "huge14": dict(learning_rate=1e-3, layer_decay=0.75, num_epochs=50.0, droppath=0.3),
}


def get_finetune_config(size: str) -> ml_collections.ConfigDict:
  recipe = RECIPES[size]
  config = cfg_mae_base.image_family_config(size)
  config.task = "finetune"
  config.model.model_img.pool = "avg"  # MAE: global pool of the patch tokens
  config.model.model_img.transformer.droppath_rate = recipe["droppath"]  # MAE
  config.classifier = ml_collections.ConfigDict()
  config.classifier.frozen_encoder = False
  config.classifier.feature_batchnorm = False
  config.classifier.head_init_std = 2e-5  # MAE: trunc_normal_(head.weight, std=2e-5)
  config.classifier.layer_decay = recipe["layer_decay"]  # MAE
  config.classifier.label_smoothing = 0.1  # MAE

  config.opt_type = "adamw"
  config.opt.b1 = 0.9  # MAE
  config.opt.b2 = 0.999  # MAE
  config.opt.weight_decay = 0.05  # MAE
  config.learning_rate = recipe["learning_rate"]  # MAE: base lr per 256
  config.batch_size = 1024  # MAE
  config.num_epochs = recipe["num_epochs"]  # MAE
  config.warmup_epochs = 5.0  # MAE
  config.min_abs_lr = 1e-6  # MAE: min_lr 1e-6
  config.warmup_abs_lr = 0.0

  config.aug.area_range = (0.08, 1.0)  # timm create_transform default scale
  config.aug.flip = True
  config.aug.randaug = ml_collections.ConfigDict()
  config.aug.randaug.num_layers = 2  # MAE: rand-m9-mstd0.5-inc1
  config.aug.randaug.magnitude = 9.0
  config.aug.randaug.magnitude_std = 0.5
  config.aug.mixup = ml_collections.ConfigDict()
  config.aug.mixup.mixup_alpha = 0.8  # MAE
  config.aug.mixup.cutmix_alpha = 1.0  # MAE
  config.aug.mixup.prob = 1.0  # timm default
  config.aug.mixup.switch_prob = 0.5  # timm default
  config.aug.reprob = 0.25  # MAE: random erasing probability
  config.save_every_epochs = 10.0
  config.eval_every_epochs = 10.0  # ours: held-out top-1/top-5
  config.log_every_steps = 100
  config.evals.classification = cfg_mae_base.classification_eval(config)
  return config


def get_config(arg=None):
  return cfg_mae_base.apply_image_arg(get_finetune_config("base"), arg)
