"""M3AE ViT-B/16 pretraining on paired image-text HDF5 data (CC12M), and the builder every M3AE
config shares.

    python3 main.py --workdir=$WD --config=configs/cfg_m3ae_base.py \
      --config.data.train=/data/cc12m.hdf5 [--config.data.text_only=/data/wiki.hdf5]

Numbers that are facts carry their source: M3AE = Geng et al. 2022, "Multimodal Masked
Autoencoders Learn Transferable Representations", and its README's command lines. Keys marked
"ours" are this project's (docs/M3AE.md lists them). `cfg_m3ae_small.py` / `cfg_m3ae_large.py`
change only the encoder size (`M3AE_SIZES` also has `huge`); every M3AE config takes `:smoke`.
"""

import ml_collections

from configs import cfg_mae_base
from configs import default

# Encoder sizes (ViT-S/B/L/H with 16 px patches; M3AE's model_type small / base / large / huge).
M3AE_SIZES = {
    "small": dict(patch=16, width=384, depth=12, heads=6),
    "base": dict(patch=16, width=768, depth=12, heads=12),
    "large": dict(patch=16, width=1024, depth=24, heads=16),
    "huge": dict(patch=16, width=1280, depth=32, heads=16),
}
BERT_VOCAB_SIZE = 30522  # BERT-base uncased (M3AE's tokenizer)
PEAK_LR = 1.5e-4  # M3AE: peak lr at batch 4096
BATCH_SIZE = 4096  # M3AE
SMOKE_TEXT = dict(text_max_len=16, unpaired_text_max_len=32)


def get_m3ae_config(size: str) -> ml_collections.ConfigDict:
  vit = M3AE_SIZES[size]
  config = cfg_mae_base.get_mae_config("base")
  default.set_img_tower(config, patch=vit["patch"], width=vit["width"], depth=vit["depth"],
                        heads=vit["heads"])
  config.task = "m3ae"
  config.image_size = 256  # M3AE: 256 px images (a 16 x 16 patch grid)
  config.image_normalization = "cc12m"  # M3AE's CC12M statistics (flip.models.normalization)
  config.model.model_img.mask_ratio = 0.0  # unused: the image mask ratio is m3ae.image_mask_ratio
  config.model.norm_pix_loss = True  # ours: MAE's target (M3AE's code has the same option)
  config.model.m3ae = ml_collections.ConfigDict()
  m3ae = config.model.m3ae
  m3ae.image_mask_ratio = 0.75  # M3AE
  m3ae.text_mask_ratio = 0.75  # M3AE
  m3ae.use_type_embedding = True  # M3AE
  m3ae.image_loss_weight = 1.0  # M3AE README
  m3ae.text_loss_weight = 0.5  # M3AE README
  m3ae.unpaired_text_loss_weight = 0.0  # M3AE README
  m3ae.loss_all_patches = False  # M3AE: loss on the masked patches only
  m3ae.discretized_image = False  # M3AE: True = VQGAN code targets (needs vqgan.weights)
  m3ae.vocab_size = BERT_VOCAB_SIZE
  m3ae.vocab_file = ""  # ours: a WordPiece vocabulary file, "" = BERT uncased (the package's)
  m3ae.text_max_len = 64  # M3AE: paired captions
  m3ae.unpaired_text_max_len = 256  # M3AE: text-only examples
  # ours: the frozen tokenizer of discretized_image (flip.models.vqgan): the user's weights file
  # (.npz or .msgpack; never downloaded) and its architecture, MaskGIT's ImageNet-256 by default.
  m3ae.vqgan = ml_collections.ConfigDict()
  m3ae.vqgan.weights = ""
  m3ae.vqgan.filters = 128  # MaskGIT ImageNet-256 VQGAN
  m3ae.vqgan.num_res_blocks = 2  # MaskGIT
  m3ae.vqgan.channel_multipliers = (1, 1, 2, 2, 4)  # MaskGIT: 256 px -> 16 x 16 codes
  m3ae.vqgan.embedding_dim = 256  # MaskGIT
  m3ae.vqgan.codebook_size = 1024  # MaskGIT

  config.data.train = ""  # paired HDF5 file(s): `jpg` + `caption` (comma-separated, globs)
  config.data.text_only = ""  # ours: text-only HDF5 file(s) with `text`, "" = none
  config.data.text_only_rate = 0.5  # ours: mixture rate of the text-only source (paired: 1 - it)

  config.learning_rate = PEAK_LR * 256 / BATCH_SIZE  # per 256: peak 1.5e-4 at batch 4096
  config.batch_size = BATCH_SIZE
  config.num_epochs = 100.0  # M3AE
  config.warmup_epochs = 5.0  # M3AE
  config.opt_type = "adamw"
  config.opt.b1 = 0.9  # M3AE
  config.opt.b2 = 0.95  # M3AE
  config.opt.weight_decay = 0.05  # M3AE
  config.opt.no_decay_names = tuple(config.opt.no_decay_names) + (
      "type_embedding", "image_type_embedding", "text_type_embedding", "text_mask_token")
  config.aug.area_range = (0.2, 1.0)  # ours: MAE's crop (M3AE resizes and crops CC12M images)
  config.save_every_epochs = 5.0
  config.eval_every_epochs = 5.0  # ours: reconstruction grid and captions
  # ours: masked and predicted captions as text in tensorboard (flip.evals.caption_reconstruction)
  config.evals.captions = default.eval_entry(
      config, "caption_reconstruction", "",  # held-out HDF5 file(s), paired or text-only; "" = off
      num_captions=8,  # captions shown
      seed=0)  # seed of their image and text masks
  return config


def apply_m3ae_arg(config: ml_collections.ConfigDict, arg) -> ml_collections.ConfigDict:
  """`:smoke` of an M3AE config: the MAE-family smoke sizes and short texts."""
  config = cfg_mae_base.apply_image_arg(config, arg)
  if arg:
    config.model.m3ae.update(SMOKE_TEXT)
  return config


def get_config(arg=None):
  return apply_m3ae_arg(get_m3ae_config("base"), arg)
