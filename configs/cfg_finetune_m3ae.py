"""End-to-end fine-tuning of an M3AE ViT-B/16 checkpoint on ImageNet-1k with M3AE's recipe.

    python3 main.py --workdir=$WD --config=configs/cfg_finetune_m3ae.py --config.pretrain_dir=$PRE

The image side of the M3AE run is loaded as by cfg_linprobe_m3ae.py (256 px, CC12M statistics,
type embedding folded). M3AE's recipe: layer-wise lr decay 0.60, mixup 0.8, cutmix 1.0, switch
probability 0.5, label smoothing 0.1, drop path 0.1, batch 1024, peak lr 1e-3, 100 epochs with 5
of warmup; the rest (AdamW, RandAugment, erasing, global pool) is cfg_finetune_base's (MAE's).
M3AE's ImageNet HDF5 files are read with the `hdf5:` data-set name, as in cfg_linprobe_m3ae.py:
`--config.data.train=hdf5:/data/imagenet.hdf5` and
`--config.evals.classification.dataset=hdf5:/data/imagenet.hdf5`.
"""

from configs import cfg_finetune_base
from configs import cfg_linprobe_m3ae
from configs import cfg_mae_base

BATCH_SIZE = 1024  # M3AE
PEAK_LR = 1e-3  # M3AE: at batch 1024


def get_config(arg=None):
  config = cfg_linprobe_m3ae.m3ae_encoder(cfg_finetune_base.get_finetune_config("base"))
  config.classifier.layer_decay = 0.60  # M3AE
  config.classifier.label_smoothing = 0.1  # M3AE
  config.model.model_img.transformer.droppath_rate = 0.1  # M3AE
  config.aug.mixup.mixup_alpha = 0.8  # M3AE
  config.aug.mixup.cutmix_alpha = 1.0  # M3AE
  config.aug.mixup.switch_prob = 0.5  # M3AE
  config.batch_size = BATCH_SIZE
  config.learning_rate = PEAK_LR * 256 / BATCH_SIZE  # per 256: peak 1e-3 at batch 1024
  config.num_epochs = 100.0  # M3AE
  config.warmup_epochs = 5.0  # M3AE
  return cfg_mae_base.apply_image_arg(config, arg)
