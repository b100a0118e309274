"""The embedded demo: FLIP on real Fashion-MNIST image-caption pairs, trained on 2 CPU cores.

`make demo` builds the data (`flip.data.demo`: the 60,000 training images with captions drawn from
templates and synonyms per class, in img2dataset's TFRecord layout; the 10,000 test images kept for
zero-shot evaluation with templates never used for training captions), pretrains this config with
half the patches dropped, evaluates zero-shot, then tunes unmasked for a short while.

Same keys as the FLIP configs; only the numbers are shrunk. A virtual epoch here is one pass over
the 60,000 training images.
"""

from configs import default

DEMO_DATA_DIR = "data/demo"


def get_config(arg=None):
  config = default.get_config()
  config.laion_path = f"{DEMO_DATA_DIR}/train"
  config.eval_dataset = f"demo:{DEMO_DATA_DIR}/test"
  config.image_size = 28
  config.samples_per_epoch = 60000  # Fashion-MNIST train split

  default.set_img_tower(config, patch=4, width=128, depth=4, heads=4)  # 7x7 = 49 patches
  default.set_txt_tower(config, width=128, depth=2, heads=4)
  config.model.clr.proj_dim_out = 128
  config.model.model_img.mask_ratio = 0.5
  config.aug.txt.max_len = 16  # demo captions are short; FLIP uses 32
  config.aug.area_range = (0.6, 1.0)
  config.aug.flip = True

  # bfloat16 compute with float32 accumulation, parameters and optimizer state
  # (flip.models.precision): faster on CPUs with bfloat16 matrix units at the same zero-shot
  # accuracy (docs/BENCHMARKS.md, "Mixed precision"); "float32" runs the float32 program.
  config.dtype = "bfloat16"
  config.batch_size = 256
  config.learning_rate = 1e-3  # per 256: a small model from scratch tolerates a large lr
  config.opt.weight_decay = 0.05
  config.warmup_epochs = 0.5
  config.num_epochs = 1.5  # 352 steps: about 6.5 minutes on 2 quiet cores, 76 % zero-shot top-1
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 2
  config.eval_every_epochs = 0.0  # evaluate once, at the end
  return default.apply_arg(config, arg)
