"""Defaults shared by every FLIP experiment (FLIP's key names; ViT-L/16 + BERT-base-size text).

Numbers that are facts carry their source: FLIP = the official FLIP configs (configs/default.py of
facebookresearch/flip) and paper (Li et al., "Scaling Language-Image Pre-training via Masking",
CVPR 2023). Keys marked "ours" are additions of this project.

Every `cfg_*.py` accepts an optional argument after a colon, e.g.
`--config=configs/cfg_flip_large.py:smoke`, which shrinks the same experiment to a CPU-sized smoke
run (big_vision's `runlocal` idea) without changing any other key.
"""

import ml_collections

IMAGENET_TRAIN_SAMPLES = 1281167  # one "virtual ImageNet epoch" (FLIP)


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  # ours: the task (flip.tasks.registry): flip | mae | linprobe | finetune (MAE family: docs/MAE.md)
  config.task = "flip"

  # Data.
  config.eval_dataset = "imagenet2012:5.*.*"  # tfds name (FLIP); or an image folder / "demo:<dir>"
  config.laion_path = ""  # img2dataset tfrecord/webdataset dir, pattern, or comma-separated list
  config.laion_rates = ""  # ours: mixture rates, one per laion_path entry ("" = by file count)
  config.laion_filter = ""  # ours: e.g. "similarity>=0.28,NSFW!=NSFW" on img2dataset's columns
  config.shuffle_buffer_size = 10000  # ours: encoded examples per host (saved with the iterator)
  config.laion_cycle_length = 16  # ours: files read in parallel per host
  config.laion_read_chunk_bytes = 262144  # ours: read size; records are cut out of chunks
  config.image_size = 224  # FLIP
  config.image_normalization = "imagenet"  # ours: pixel statistics (flip.models.normalization)
  config.samples_per_epoch = IMAGENET_TRAIN_SAMPLES  # FLIP: epochs are virtual ImageNet epochs

  # Schedule (virtual epochs of samples_per_epoch).
  config.learning_rate = 4e-6  # base lr per 256 samples (FLIP)
  # FLIP: the released configs/default.py (facebookresearch/flip at its public release) has 40.0
  # (20.0 in earlier development commits; 20 is what the README's unmasked-tuning line sets).
  config.warmup_epochs = 40.0
  config.min_abs_lr = 0.0  # FLIP
  config.warmup_abs_lr = 0.0  # FLIP
  config.num_epochs = 10000.0  # FLIP: ~32 epochs of LAION-400M
  config.num_train_steps = -1  # ours: >0 stops after this many steps (schedule unchanged)
  config.batch_size = 65536  # FLIP
  config.grad_accum_steps = 1  # ours: micro-batches per step; the update equals the full batch's

  # Optimizer (FLIP).
  config.opt_type = "adamw"  # adamw | sgd | lars
  config.opt = ml_collections.ConfigDict()
  config.opt.b1 = 0.9
  config.opt.b2 = 0.95
  config.opt.weight_decay = 0.2
  config.opt.momentum = 0.9  # ours: sgd/lars only
  config.opt.clip_grad = 0.0  # ours: global-norm clipping, 0 = off
  # FLIP (t5x/FLIP's adamw): keep Adam's moments of 2-D parameters as [rows * cols, 1] columns
  # (a state layout for sharding over data; the same updates). H/14 configs set True.
  config.opt.flatten_params = False
  # ours: what exclude_wd excludes (whole path components; "*_bias" = the fused attention biases)
  config.opt.no_decay_names = ("bias", "*_bias", "scale", "pos_embedding", "cls", "logit_scale",
                               "logit_bias", "mask_token")
  config.opt_mu_dtype = "float32"  # FLIP
  config.exclude_wd = True  # FLIP: no decay on bias, norm, pos-embedding, cls, logit scale

  # Augmentation (FLIP).
  config.aug = ml_collections.ConfigDict()
  config.aug.area_range = (0.5, 1.0)
  config.aug.aspect_ratio_range = (3.0 / 4.0, 4.0 / 3.0)
  config.aug.flip = True
  # Evaluation: resize the shorter side to image_size / eval_crop_fraction, centre-crop image_size.
  # 1.0 is FLIP's (eval_pad = 0) and CLIP/open_clip's zero-shot preprocessing.
  config.aug.eval_crop_fraction = 1.0
  config.aug.txt = ml_collections.ConfigDict()
  config.aug.txt.tokenizer = "tf_bert"  # tf_bert | sentencepiece | byte
  config.aug.txt.max_len = 32
  config.aug.txt.cls_token = False
  config.aug.txt.spm_path = ""  # ours: SentencePiece model file for tokenizer=sentencepiece

  # Run control.
  config.log_every_steps = 200  # FLIP
  config.save_every_epochs = 100.0  # FLIP
  config.checkpoint_every_steps = 0  # ours: >0 overrides save_every_epochs
  config.keep_checkpoints = 3  # ours: keep the last N checkpoints
  config.resume_dir = ""  # FLIP: resume from this dir instead of workdir
  config.pretrain_dir = ""  # FLIP: load params only (unmasked tuning, evaluation)
  config.eval_only = False  # FLIP
  config.eval_every_epochs = 1000.0  # ours: config.evals during training (and at the end)
  config.seed_jax = 0  # FLIP
  config.seed_tf = 0  # FLIP
  config.dtype = "float32"  # ours: compute dtype (bfloat16 for accelerators); params stay float32
  config.max_consecutive_nonfinite = 20  # ours: stop after this many skipped non-finite steps

  # Evaluations (ours; flip.evals, docs/EVALUATORS.md): named entries, each with its type, dataset
  # ("" = off), global batch size and period (every_epochs: the same as eval_every_epochs unless
  # set), plus its type's keys.
  config.evals = ml_collections.ConfigDict()
  # FLIP's zero-shot evaluation reads FLIP's key: --config.eval_dataset= turns it off.
  config.evals.zeroshot = eval_entry(
      config, "zeroshot", config.get_ref("eval_dataset"), batch_size=1024,
      templates="templates_full",  # key in flip/assets/imagenet_zeroshot.json (CLIP's 80)
      canonicalize=False,  # reported numbers: the training tokenizer only
      classnames_file="",  # image folders: default <dir>/classnames.txt
      max_images=0)  # 0 = all
  # Held-out LAION-layout caption TFRecords; "" = off.
  config.evals.retrieval = eval_entry(config, "retrieval", "", batch_size=1024, max_images=0)

  # Partitioning: keys are the partitioner's constructor arguments (flip.partitioning).
  config.partitioning = ml_collections.ConfigDict()
  config.partitioning.num_partitions = 1  # FLIP: model-parallel size
  config.partitioning.partition_states = False  # FLIP: shard optimizer state over data (ZeRO-1)
  config.partitioning.parameter_partitioning_dims = 1  # t5x: 2 = shard params over data too
  config.partitioning.activation_partitioning_dims = 1  # t5x
  config.partitioning.mesh_shape = ()  # ours: explicit (data, model) mesh, e.g. (4, 2) on 8 CPUs

  # Model (FLIP).
  config.model = ml_collections.ConfigDict()
  config.model.model_img = get_config_img()
  config.model.model_txt = get_config_txt()
  config.model.clr = ml_collections.ConfigDict()
  config.model.clr.loss = "softmax"  # ours: softmax (CLIP/FLIP InfoNCE) | sigmoid (SigLIP)
  config.model.clr.tau = 0.01  # FLIP: fixed temperature when not learnable
  config.model.clr.tau_learnable = True  # FLIP
  config.model.clr.tau_init = 0.07  # CLIP/FLIP: logit scale starts at ln(1/0.07)
  config.model.clr.max_logit_scale = 100.0  # CLIP/FLIP: scale clipped to [1, 100]
  config.model.clr.sigmoid_init_scale = 10.0  # SigLIP paper
  config.model.clr.sigmoid_init_bias = -10.0  # SigLIP paper
  config.model.clr.proj_dim_out = 768  # FLIP (L/16)
  config.model.clr.proj_out_bias = False  # FLIP

  return apply_arg(config, arg)


def eval_entry(config, type_name, dataset, **keys):
  """An entry of config.evals; its period follows config.eval_every_epochs unless it is set."""
  entry = ml_collections.ConfigDict()
  entry.type = type_name
  entry.dataset = dataset
  entry.every_epochs = config.get_ref("eval_every_epochs") + 0.0
  entry.update(keys)
  return entry


def get_config_img():
  """ViT-L/16 image tower (FLIP)."""
  config = ml_collections.ConfigDict()
  config.mask_ratio = 0.5
  config.sincos = True
  config.patches = ml_collections.ConfigDict({"size": (16, 16)})
  config.hidden_size = 1024
  config.use_cls_token = True  # FLIP: a class token, with no position embedding
  # FLIP: the average of all encoded tokens, class token included (avg_all | avg = patch tokens
  # only | cls)
  config.pool = "avg_all"
  config.layernorm_epsilon = 1e-6  # JAX ViT
  # ours, to host open_clip's and timm's ViTs (docs/INTEROP.md): patch embedding bias, a learned
  # table with a class-token row (needs sincos=False), a LayerNorm before the transformer, timm's
  # fc_norm (LayerNorm on the pooled vector instead of at the end of the transformer)
  config.patch_bias = True
  config.cls_posemb = False
  config.ln_pre = False
  config.pooled_norm = False
  config.transformer = ml_collections.ConfigDict()
  config.transformer.mlp_dim = 4096
  config.transformer.num_heads = 16
  config.transformer.num_layers = 24
  config.transformer.attention_dropout_rate = 0.0
  config.transformer.dropout_rate = 0.0
  config.transformer.droppath_rate = 0.0
  # FLIP's names: none | minimal (save dots without batch dims) | any other (actcp, full) = full
  # per-block remat
  config.transformer.remat_policy = "none"
  # FLIP: flax's nn.gelu, whose default is the tanh approximation (tanh | exact = erf |
  # quick = QuickGELU of OpenAI CLIP weights)
  config.transformer.gelu = "tanh"
  config.transformer.qkv_layout = "separate"  # FLIP: separate q/k/v (separate | fused = ours)
  config.transformer.causal = False  # ours: True = causal attention (open_clip's text tower)
  # ours: LayerScale init value (timm, open_clip); unset = no LayerScale
  config.transformer.layer_scale_init = ml_collections.config_dict.placeholder(float)
  return config


def get_config_txt():
  """BERT-base-size text tower (FLIP)."""
  config = ml_collections.ConfigDict()
  config.vocab_size = 30523  # FLIP: BERT uncased 30522 + 1
  config.hidden_size = 768
  config.pool = "first"  # FLIP: first token (first | avg | eot = open_clip's argmax pooling)
  config.pad_mask = False  # FLIP: no attention mask in the text tower (True = ours: mask padding)
  config.layernorm_epsilon = 1e-6
  config.transformer = ml_collections.ConfigDict()
  config.transformer.mlp_dim = 3072
  config.transformer.num_heads = 12
  config.transformer.num_layers = 12
  config.transformer.attention_dropout_rate = 0.0
  config.transformer.dropout_rate = 0.0
  config.transformer.droppath_rate = 0.0
  config.transformer.remat_policy = "none"
  config.transformer.gelu = "tanh"  # FLIP (flax's nn.gelu default)
  config.transformer.qkv_layout = "separate"  # FLIP
  config.transformer.causal = False  # FLIP: bidirectional (True: open_clip's causal text)
  config.transformer.layer_scale_init = ml_collections.config_dict.placeholder(float)
  return config


def set_img_tower(config, *, patch, width, depth, heads):
  config.model.model_img.patches.size = (patch, patch)
  config.model.model_img.hidden_size = width
  config.model.model_img.transformer.mlp_dim = 4 * width
  config.model.model_img.transformer.num_heads = heads
  config.model.model_img.transformer.num_layers = depth


def set_txt_tower(config, *, width, depth, heads):
  config.model.model_txt.hidden_size = width
  config.model.model_txt.transformer.mlp_dim = 4 * width
  config.model.model_txt.transformer.num_heads = heads
  config.model.model_txt.transformer.num_layers = depth


# The CPU smoke size: same keys, tiny numbers (seconds per step on 2 cores).
SMOKE = dict(image_size=32, patch=8, img_width=64, img_depth=2, img_heads=2, txt_width=64,
             txt_depth=2, txt_heads=2, proj=64, batch_size=16, samples_per_epoch=1600,
             num_epochs=2.0, warmup_epochs=0.5, log_every_steps=10)


def apply_arg(config, arg):
  """Applies the optional `:arg` of a config path ("smoke" is the only one)."""
  if not arg:
    return config
  if arg != "smoke":
    raise ValueError(f"unknown config argument {arg!r} (known: 'smoke')")
  s = SMOKE
  config.image_size = s["image_size"]
  set_img_tower(config, patch=s["patch"], width=s["img_width"], depth=s["img_depth"],
                heads=s["img_heads"])
  set_txt_tower(config, width=s["txt_width"], depth=s["txt_depth"], heads=s["txt_heads"])
  config.model.clr.proj_dim_out = s["proj"]
  config.batch_size = s["batch_size"]
  config.samples_per_epoch = s["samples_per_epoch"]
  config.num_epochs = s["num_epochs"]
  config.warmup_epochs = s["warmup_epochs"]
  config.log_every_steps = s["log_every_steps"]
  config.eval_dataset = ""  # smoke runs need no ImageNet
  config.evals.zeroshot.batch_size = s["batch_size"]
  config.evals.retrieval.batch_size = s["batch_size"]
  return config
