"""The MAE demo: pretraining on the Fashion-MNIST demo images (`make demo-mae`), 2 CPU cores.

Same keys as cfg_mae_base, shrunk to minutes on a 2-core CPU: 28 px images in 7 px patches
(4 x 4 = 16, 4 kept at MAE's mask ratio 0.75), a 4-block encoder of width 64, a 2-block decoder of
width 64, two virtual epochs of batch 128. The images are those of `flip.data.demo` (the captions
are ignored); a virtual epoch is one pass over its 60,000 training images. `cfg_linprobe_demo.py`
and `cfg_finetune_demo.py` probe and fine-tune the result (their encoder keys come from
`DEMO_ENCODER` here).

Why these numbers: 16 patches instead of 49 make a step much cheaper (the demo runs at ~11 steps/s
on 2 cores, docs/MAE.md), so the demo gets more updates for the same wall time; short runs learn
more from more, smaller batches (128, not MAE's 4096). The base lr is 10x MAE's 1.5e-4: a small
model trained for two epochs instead of 800.
"""

from configs import cfg_mae_base
from configs import default

DEMO_DATA = "demo:data/demo"
DEMO_SAMPLES = 60000  # Fashion-MNIST train split
DEMO_CLASSES = 10
DEMO_ENCODER = dict(patch=7, width=64, depth=4, heads=4)
DEMO_IMAGE_SIZE = 28
DEMO_BATCH_SIZE = 128


def demo_data_and_encoder(config):
  """The demo's data keys, encoder size and batch size on any MAE-family config."""
  config.data.train = DEMO_DATA
  config.data.num_classes = DEMO_CLASSES
  for entry in config.evals.values():  # held-out evaluation on the demo's test split
    entry.dataset = DEMO_DATA
    if "batch_size" in entry:
      entry.batch_size = 1000
  config.samples_per_epoch = DEMO_SAMPLES
  config.image_size = DEMO_IMAGE_SIZE
  default.set_img_tower(config, patch=DEMO_ENCODER["patch"], width=DEMO_ENCODER["width"],
                        depth=DEMO_ENCODER["depth"], heads=DEMO_ENCODER["heads"])
  config.aug.eval_crop_fraction = 1.0  # the images are already centred 28 px crops
  config.batch_size = DEMO_BATCH_SIZE
  config.keep_checkpoints = 1
  config.checkpoint_every_steps = 0
  config.log_every_steps = 50
  return config


def get_config(arg=None):
  config = demo_data_and_encoder(cfg_mae_base.get_mae_config("base"))
  # bfloat16 compute, float32 accumulation and parameters (flip.models.precision): measured
  # faster than float32 on CPUs with bfloat16 matrix units at the same held-out figures
  # (docs/BENCHMARKS.md, "The MAE demo in bfloat16"); "float32" runs the float32 program.
  config.dtype = "bfloat16"
  config.model.decoder.hidden_size = 64
  config.model.decoder.mlp_dim = 256
  config.model.decoder.num_layers = 2
  config.model.decoder.num_heads = 4
  config.aug.area_range = (0.5, 1.0)  # small images: milder crops than MAE's (0.2, 1)
  config.learning_rate = 1.5e-3  # per 256
  config.warmup_epochs = 0.2
  config.num_epochs = 2.0
  config.save_every_epochs = 2.0
  config.eval_every_epochs = 0.0  # reconstruction grid once, at the end
  return cfg_mae_base.apply_image_arg(config, arg)
