"""Linear probe of an M3AE ViT-B/16 checkpoint on ImageNet-1k with M3AE's probe recipe.

    python3 main.py --workdir=$WD --config=configs/cfg_linprobe_m3ae.py --config.pretrain_dir=$PRE

ImageNet is read as configured for the MAE family (tfds `imagenet2012`, an image folder), or from
M3AE's ImageNet HDF5 files with the `hdf5:` data-set name (flip.data.dataset_spec):

    --config.data.train=hdf5:/data/imagenet.hdf5 \
    --config.evals.classification.dataset=hdf5:/data/imagenet.hdf5

trains on their `train_jpg` / `train_labels` and evaluates on `val_jpg` / `val_labels` (one file
or several, comma-separated paths or globs, any filesystem tf.io.gfile reads).

`config.pretrain_dir` is an M3AE run (cfg_m3ae_base.py): its `img_encoder` is loaded (the image
type embedding folded into the patch bias, flip.tasks.common), frozen, and a BatchNorm without
affine parameters plus a linear head are trained. M3AE's recipe: SGD with momentum 0.9, peak lr
0.1 at batch 2048, no weight decay, 90 epochs with 10 of warmup. The image side sees what it was
pretrained on: 256 px, 16 px patches, CC12M pixel statistics. Other sizes:
`--config.model.model_img.hidden_size=...` etc. as in cfg_m3ae_base.M3AE_SIZES.
"""

from configs import cfg_linprobe_base
from configs import cfg_m3ae_base
from configs import cfg_mae_base
from configs import default

BATCH_SIZE = 2048  # M3AE
PEAK_LR = 0.1  # M3AE: at batch 2048


def m3ae_encoder(config, size: str = "base"):
  """The image side of an M3AE checkpoint of `size` on a probe / fine-tuning config."""
  vit = cfg_m3ae_base.M3AE_SIZES[size]
  default.set_img_tower(config, patch=vit["patch"], width=vit["width"], depth=vit["depth"],
                        heads=vit["heads"])
  config.image_size = 256  # M3AE
  config.image_normalization = "cc12m"  # M3AE's pretraining statistics
  config.model.model_img.use_cls_token = True  # M3AE's encoder has a class token
  return config


def get_config(arg=None):
  config = m3ae_encoder(cfg_linprobe_base.get_linprobe_config("base"))
  config.model.model_img.pool = "cls"  # ours: MAE's probe feature
  config.opt_type = "sgd"  # M3AE
  config.opt.momentum = 0.9  # M3AE
  config.opt.weight_decay = 0.0  # M3AE
  config.batch_size = BATCH_SIZE
  config.learning_rate = PEAK_LR * 256 / BATCH_SIZE  # per 256: peak 0.1 at batch 2048
  config.num_epochs = 90.0  # M3AE
  config.warmup_epochs = 10.0  # M3AE
  return cfg_mae_base.apply_image_arg(config, arg)
