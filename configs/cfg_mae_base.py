"""MAE ViT-B/16 pretraining on ImageNet-1k, and the image-only base every MAE-family config shares.

Numbers that are facts carry their source: MAE = He et al., "Masked Autoencoders Are Scalable
Vision Learners" (CVPR 2022) and its official recipes (facebookresearch/mae PRETRAIN.md,
FINETUNE.md, LINPROBE.md). Keys marked "ours" are this project's (docs/MAE.md lists them all).

`image_family_config(size)` is `configs/default.py` without FLIP's text tower, contrastive head,
LAION keys and evaluations, with a ViT of the given size and the `config.data` section
(flip.data.classification) that pretraining, probing and fine-tuning read; each task's config adds
its own entry to `config.evals` (MAE: "reconstruction"; probe and fine-tuning: "classification"). Every MAE-family config
takes `:smoke` (a CPU-sized run of the same experiment, like the FLIP configs).
"""

import ml_collections

from configs import default

# ViT sizes (Dosovitskiy et al. 2021; MAE uses B/16, L/16, H/14).
VIT_SIZES = {
    "base": dict(patch=16, width=768, depth=12, heads=12),
    "large": dict(patch=16, width=1024, depth=24, heads=16),
    "huge14": dict(patch=14, width=1280, depth=32, heads=16),
}
IMAGENET_TFDS = "imagenet2012:5.*.*"
IMAGENET_CLASSES = 1000

# The CPU smoke size (same keys, tiny numbers), as default.SMOKE for the FLIP configs.
SMOKE = dict(image_size=32, patch=8, width=64, depth=2, heads=2, decoder_width=32,
             decoder_depth=1, decoder_heads=2, batch_size=16, samples_per_epoch=1600,
             num_epochs=2.0, warmup_epochs=0.5, log_every_steps=10, eval_batch_size=16,
             num_images=4)

# Keys of the FLIP default that an image-only task never reads.
_TEXT_AND_LAION_KEYS = ("laion_path", "laion_rates", "laion_filter", "shuffle_buffer_size",
                        "laion_cycle_length", "laion_read_chunk_bytes", "evals")


def image_family_config(size: str = "base") -> ml_collections.ConfigDict:
  config = default.get_config()
  for key in _TEXT_AND_LAION_KEYS:
    del config[key]
  del config.model.model_txt
  del config.model.clr
  del config.aug.txt
  config.eval_dataset = ""  # zero-shot needs a text tower; each task adds its own config.evals
  config.evals = ml_collections.ConfigDict()

  config.data = ml_collections.ConfigDict()
  config.data.train = IMAGENET_TFDS  # ours: tfds name, image folder or demo:<dir> (train split)
  config.data.num_classes = IMAGENET_CLASSES
  config.data.shuffle_buffer_size = 10000  # ours: encoded examples per host (saved with the iterator)

  config.image_size = 224  # MAE
  vit = VIT_SIZES[size]
  default.set_img_tower(config, patch=vit["patch"], width=vit["width"], depth=vit["depth"],
                        heads=vit["heads"])
  config.model.model_img.use_cls_token = True  # MAE's ViT has a class token
  config.model.model_img.pool = "cls"
  config.model.model_img.transformer.qkv_layout = "fused"  # ours (MAE's PyTorch ViT fuses qkv)
  config.model.model_img.transformer.gelu = "exact"  # MAE (PyTorch nn.GELU)
  config.model.model_img.mask_ratio = 0.0
  config.aug.eval_crop_fraction = 0.875  # MAE evaluation: resize 256, centre crop 224
  return config


def classification_eval(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Held-out top-1/top-5 of a probe or fine-tuning (flip.evals.classification)."""
  return default.eval_entry(
      config, "classification",
      IMAGENET_TFDS,  # ours: held-out split (tfds validation), "" = none
      batch_size=1024,  # ours: global images per evaluation step
      max_images=0)  # ours: 0 = all


def get_mae_config(size: str) -> ml_collections.ConfigDict:
  """MAE pretraining of a ViT of `size` (MAE PRETRAIN.md; numbers shared by B, L and H)."""
  config = image_family_config(size)
  config.task = "mae"
  config.model.model_img.mask_ratio = 0.75  # MAE
  config.model.norm_pix_loss = True  # MAE: the paper's default target
  config.model.decoder = ml_collections.ConfigDict()
  config.model.decoder.hidden_size = 512  # MAE: decoder width 512
  config.model.decoder.num_layers = 8  # MAE: decoder depth 8
  config.model.decoder.num_heads = 16  # MAE
  config.model.decoder.mlp_dim = 2048  # MAE: mlp ratio 4
  config.model.decoder.dropout_rate = 0.0
  config.model.decoder.attention_dropout_rate = 0.0
  config.model.decoder.droppath_rate = 0.0
  config.model.decoder.remat_policy = "none"
  config.model.decoder.layernorm_epsilon = 1e-6  # MAE: partial(nn.LayerNorm, eps=1e-6)
  config.model.decoder.gelu = "exact"

  config.learning_rate = 1.5e-4  # MAE: base lr per 256
  config.batch_size = 4096  # MAE
  config.warmup_epochs = 40.0  # MAE
  config.num_epochs = 800.0  # MAE: 800 (paper's ablations; 1600 for the best numbers)
  config.min_abs_lr = 0.0  # MAE
  config.warmup_abs_lr = 0.0
  config.samples_per_epoch = default.IMAGENET_TRAIN_SAMPLES
  config.opt_type = "adamw"
  config.opt.b1 = 0.9  # MAE
  config.opt.b2 = 0.95  # MAE
  config.opt.weight_decay = 0.05  # MAE
  config.aug.area_range = (0.2, 1.0)  # MAE: RandomResizedCrop(scale=(0.2, 1.0)) + flip
  config.aug.flip = True
  config.save_every_epochs = 20.0  # MAE: checkpoint every 20 epochs
  config.eval_every_epochs = 20.0  # ours: reconstruction grid
  config.log_every_steps = 100
  # ours: reconstruction grid (tensorboard) and held-out loss (flip.evals.reconstruction)
  config.evals.reconstruction = default.eval_entry(
      config, "reconstruction", IMAGENET_TFDS,  # held-out split (tfds validation); "" = off
      num_images=8,  # grid rows
      seed=0)  # seed of the grid's masks
  return config


def apply_image_arg(config: ml_collections.ConfigDict, arg) -> ml_collections.ConfigDict:
  """The optional `:smoke` argument of every MAE-family config."""
  if not arg:
    return config
  if arg != "smoke":
    raise ValueError(f"unknown config argument {arg!r} (known: 'smoke')")
  s = SMOKE
  config.image_size = s["image_size"]
  default.set_img_tower(config, patch=s["patch"], width=s["width"], depth=s["depth"],
                        heads=s["heads"])
  if "decoder" in config.model:
    config.model.decoder.hidden_size = s["decoder_width"]
    config.model.decoder.mlp_dim = 4 * s["decoder_width"]
    config.model.decoder.num_layers = s["decoder_depth"]
    config.model.decoder.num_heads = s["decoder_heads"]
  config.batch_size = s["batch_size"]
  config.samples_per_epoch = s["samples_per_epoch"]
  config.num_epochs = s["num_epochs"]
  config.warmup_epochs = s["warmup_epochs"]
  config.log_every_steps = s["log_every_steps"]
  for entry in config.evals.values():
    if "batch_size" in entry:
      entry.batch_size = s["eval_batch_size"]
    if "num_images" in entry:
      entry.num_images = min(entry.num_images, s["num_images"])
  return config


def get_config(arg=None):
  return apply_image_arg(get_mae_config("base"), arg)
