"""The M3AE demo: pretraining on the Fashion-MNIST demo set as HDF5 (`make demo-m3ae`), 2 CPU
cores.

The data are `flip.data.demo_hdf5`'s files: the 60,000 training images with their generated
captions (`paired.h5`) and, as the text-only source, captions drawn with another seed
(`text.h5`), mixed at `data.text_only_rate`. The encoder, decoder, batch size, schedule and pixel
normalisation are the MAE demo's (cfg_mae_demo), so the probe of `cfg_linprobe_demo.py` compares
the two pretrainings on equal terms; captions are cut at 12 tokens (the longest demo caption). The
text-only loss weight is non-zero here (M3AE's default is 0) so that the text-only source takes
part in the demo. Both text weights are 0.1 (M3AE: 0.5 for captions): on the demo's vocabulary
the text terms at 0.5 take this 4-block encoder from the images (probe 52 % against 49 % for a
random encoder, 65 % at 0.1; docs/M3AE.md).

The tokenizer is BERT uncased WordPiece on `vocab.txt`, the BERT entries the demo captions use
(flip.data.demo_hdf5: the same word pieces, renumbered), so the token head has 128 rows instead of
30,522: over the full vocabulary that head is most of an M3AE step at this model size
(docs/M3AE.md). `--config.model.m3ae.vocab_file= --config.model.m3ae.vocab_size=30522` runs the
demo on the full BERT vocabulary.
"""

from configs import cfg_m3ae_base
from configs import cfg_mae_demo
from flip.data import demo_hdf5

DEMO_FILES = "data/demo-m3ae"


def get_config(arg=None):
  config = cfg_mae_demo.demo_data_and_encoder(cfg_m3ae_base.get_m3ae_config("base"))
  config.data.train = f"{DEMO_FILES}/paired.h5"
  config.data.text_only = f"{DEMO_FILES}/text.h5"
  config.data.text_only_rate = 0.2  # ours
  config.image_normalization = "imagenet"  # the MAE demo's, which the demo probe uses
  config.evals.captions.dataset = f"{DEMO_FILES}/{demo_hdf5.HELDOUT_FILE}"
  config.model.m3ae.vocab_file = f"{DEMO_FILES}/{demo_hdf5.VOCAB_FILE}"
  config.model.m3ae.vocab_size = demo_hdf5.DEMO_VOCAB_SIZE
  config.model.m3ae.text_max_len = 12
  config.model.m3ae.unpaired_text_max_len = 12
  config.model.m3ae.text_loss_weight = 0.1  # ours, see above
  config.model.m3ae.unpaired_text_loss_weight = 0.1  # ours
  config.model.decoder.hidden_size = 64
  config.model.decoder.mlp_dim = 256
  config.model.decoder.num_layers = 2
  config.model.decoder.num_heads = 4
  config.aug.area_range = (0.5, 1.0)  # the MAE demo's
  config.learning_rate = 1.5e-3  # per 256, the MAE demo's
  config.warmup_epochs = 0.2
  config.num_epochs = 2.0
  config.save_every_epochs = 2.0
  config.eval_every_epochs = 0.0
  return cfg_m3ae_base.apply_m3ae_arg(config, arg)
