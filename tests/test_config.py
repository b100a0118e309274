"""Tests for flip.config (loading with dotted overrides, one-line errors, validation) and for the
numbers in configs/*.py against the FLIP facts listed in DESIGN.md."""

import pathlib

import ml_collections
import pytest

from flip import config as config_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
LARGE = "configs/cfg_flip_large.py"
CONFIG_PATHS = sorted(f"configs/{p.name}" for p in (REPO_ROOT / "configs").glob("*.py")
                      if p.stem != "__init__")

# FLIP's unmasked-tuning command line (DESIGN.md), plus the other documented overrides.
UNMASKED_TUNING = ["model.model_img.mask_ratio=0.0", "learning_rate=4e-8", "num_epochs=100",
                   "warmup_epochs=20"]
OTHER_OVERRIDES = ["partitioning.partition_states=True",
                   "model.model_img.transformer.remat_policy=actcp", "batch_size=4096",
                   "laion_path=/data/laion/{00000..00099}.tfrecord",
                   "eval_dataset=imagenet2012:5.*.*", "resume_dir=/runs/flip_large",
                   "pretrain_dir=/runs/pretrained", "eval_only=True"]


@pytest.fixture(autouse=True)
def run_from_repo_root(monkeypatch):
  monkeypatch.chdir(REPO_ROOT)


def load(path, overrides=()):
  return config_lib.load_config(path, list(overrides))


def get(config, dotted):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def config_error(path, overrides=()):
  with pytest.raises(config_lib.ConfigError) as info:
    load(path, overrides)
  message = str(info.value)
  assert "\n" not in message and "Traceback" not in message, message
  return message


def validation_error(config):
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate_config(config)
  message = str(info.value)
  assert "\n" not in message, message
  return message


# --- the documented command lines -----------------------------------------------------------------


def test_unmasked_tuning_override_line_parses_with_the_right_types():
  config = load(LARGE, UNMASKED_TUNING + OTHER_OVERRIDES)
  expected = {
      "model.model_img.mask_ratio": (0.0, float),
      "learning_rate": (4e-8, float),
      "num_epochs": (100.0, float),
      "warmup_epochs": (20.0, float),
      "partitioning.partition_states": (True, bool),
      "model.model_img.transformer.remat_policy": ("actcp", str),
      "batch_size": (4096, int),
      "laion_path": ("/data/laion/{00000..00099}.tfrecord", str),
      "eval_dataset": ("imagenet2012:5.*.*", str),
      "resume_dir": ("/runs/flip_large", str),
      "pretrain_dir": ("/runs/pretrained", str),
      "eval_only": (True, bool),
  }
  for key, (value, value_type) in expected.items():
    got = get(config, key)
    assert type(got) is value_type, (key, got)  # pylint: disable=unidiomatic-typecheck
    assert got == value, key
  config_lib.validate_config(config)
  # Keys not overridden keep the file's values.
  assert config.model.model_img.hidden_size == 1024
  assert config.opt.b2 == 0.95


def test_overrides_do_not_leak_between_loads():
  load(LARGE, ["learning_rate=1.0"])
  assert load(LARGE).learning_rate == 4e-6


def test_tuple_override():
  config = load(LARGE, ["model.model_img.patches.size=(14, 14)"])
  assert tuple(config.model.model_img.patches.size) == (14, 14)
  config_lib.validate_config(config)


def test_loaded_config_is_locked_against_new_keys():
  config = load(LARGE)
  with pytest.raises(AttributeError):
    config.not_a_key = 1


# --- one-line errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("override,bad_key,suggestion", [
    ("model.model_img.mask_ration=0.0", "mask_ration", "config.model.model_img.mask_ratio"),
    ("learning_rat=4e-8", "learning_rat", "config.learning_rate"),
    ("model.model_imgg.mask_ratio=0.0", "model_imgg", "config.model.model_img"),
    ("partitioning.partition_state=True", "partition_state",
     "config.partitioning.partition_states"),
])
def test_misspelled_key_is_named_with_a_suggestion(override, bad_key, suggestion):
  message = config_error(LARGE, UNMASKED_TUNING[1:] + [override])
  assert bad_key in message
  assert f"did you mean {suggestion}?" in message


def test_unknown_key_without_close_match_is_still_named():
  message = config_error(LARGE, ["zzzz_qqqq=1"])
  assert "zzzz_qqqq" in message
  assert "did you mean" not in message


@pytest.mark.parametrize("override,key", [
    ("batch_size=abc", "config.batch_size"),
    ("batch_size=1.5", "config.batch_size"),
    ("num_epochs=ten", "config.num_epochs"),
    ("model.model_img.mask_ratio=half", "config.model.model_img.mask_ratio"),
    ("partitioning.partition_states=maybe", "config.partitioning.partition_states"),
])
def test_wrong_typed_value_names_the_key(override, key):
  message = config_error(LARGE, [override])
  assert key in message
  assert override.split("=", 1)[1] in message


def test_missing_config_file_is_named():
  message = config_error("configs/cfg_flip_larg.py")
  assert "configs/cfg_flip_larg.py" in message
  assert "not found" in message


def test_unknown_config_argument_is_one_line_naming_the_file():
  message = config_error(f"{LARGE}:bogus")
  assert LARGE in message
  assert "unknown config argument 'bogus'" in message


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIG_PATHS)
@pytest.mark.parametrize("arg", ["", ":smoke"])
def test_every_shipped_config_validates(path, arg):
  config = load(path + arg)
  assert isinstance(config, ml_collections.ConfigDict)
  config_lib.validate_config(config)


@pytest.mark.parametrize("override,key", [
    ("model.model_img.transformer.qkv_layout=joint",
     "config.model.model_img.transformer.qkv_layout"),
    ("model.model_txt.transformer.qkv_layout=stacked",
     "config.model.model_txt.transformer.qkv_layout"),
    ("model.model_img.pool=max", "config.model.model_img.pool"),
    ("model.model_img.mask_ratio=1.0", "config.model.model_img.mask_ratio"),
    ("model.model_img.mask_ratio=-0.25", "config.model.model_img.mask_ratio"),
    ("image_size=225", "config.image_size"),
    ("model.model_img.patches.size=(14, 14)", "config.model.model_img.patches.size"),
    ("model.model_img.transformer.num_heads=7", "config.model.model_img.transformer.num_heads"),
    ("model.clr.loss=hinge", "config.model.clr.loss"),
    ("opt_type=adam", "config.opt_type"),
    ("batch_size=0", "config.batch_size"),
    ("model.model_img.transformer.droppath_rate=1.0",
     "config.model.model_img.transformer.droppath_rate"),
])
def test_validate_config_refuses_bad_values_naming_the_key(override, key):
  config = load(LARGE + (":smoke" if "patches.size" in override else ""), [override])
  message = validation_error(config)
  assert key in message
  assert override.split("=", 1)[1].strip("()").split(",")[0] in message


def test_validate_config_refuses_batch_not_divisible_by_accumulation():
  message = validation_error(load(LARGE, ["batch_size=1000", "grad_accum_steps=3"]))
  assert "config.batch_size" in message and "config.grad_accum_steps" in message


def test_validate_config_refuses_cls_pool_without_cls_token():
  message = validation_error(load(LARGE, ["model.model_img.pool=cls",
                                          "model.model_img.use_cls_token=False"]))
  assert "config.model.model_img.use_cls_token" in message


@pytest.mark.parametrize("name", ["none", "minimal", "full", "actcp", "anything"])
def test_remat_policy_accepts_every_name_as_flip_does(name):
  config = load(LARGE, [f"model.model_img.transformer.remat_policy={name}",
                        f"model.model_txt.transformer.remat_policy={name}"])
  config_lib.validate_config(config)


def test_remat_policy_refuses_an_empty_name():
  message = validation_error(load(LARGE, ["model.model_img.transformer.remat_policy="]))
  assert "config.model.model_img.transformer.remat_policy" in message


# --- the FLIP numbers (DESIGN.md) -----------------------------------------------------------------

SHARED_FLIP_FACTS = {
    "learning_rate": 4e-6, "batch_size": 65536, "samples_per_epoch": 1281167,
    "opt_type": "adamw", "opt.b1": 0.9, "opt.b2": 0.95, "opt.weight_decay": 0.2,
    "exclude_wd": True, "aug.area_range": (0.5, 1.0), "aug.flip": True,
    "aug.txt.tokenizer": "tf_bert", "aug.txt.max_len": 32, "image_size": 224,
    "model.model_txt.vocab_size": 30523, "model.clr.proj_out_bias": False,
    "model.clr.tau_learnable": True, "model.clr.tau_init": 0.07, "model.clr.tau": 0.01,
    "model.clr.max_logit_scale": 100.0, "model.model_img.sincos": True,
    "model.model_img.pool": "avg_all", "model.model_txt.pool": "first",
    "model.model_img.use_cls_token": True, "model.model_txt.pad_mask": False,
    "model.model_img.transformer.qkv_layout": "separate",
    "model.model_txt.transformer.qkv_layout": "separate",
    "model.model_img.transformer.remat_policy": "none",
    "model.model_img.transformer.gelu": "tanh", "model.model_txt.transformer.gelu": "tanh",
}
TOWERS = {  # (img patch, width, depth, heads), (txt width, depth, heads), projection
    "base": ((16, 768, 12, 12), (512, 12, 8), 512),
    "large": ((16, 1024, 24, 16), (768, 12, 12), 768),
    "huge": ((14, 1280, 32, 16), (1024, 24, 16), 1024),
}
FLIP_CONFIGS = {
    # name: (towers, num_epochs, warmup_epochs, base lr)
    "cfg_flip_base": ("base", 10000.0, 40.0, 4e-6),
    "cfg_flip_large": ("large", 10000.0, 40.0, 4e-6),
    "cfg_flip_huge14": ("huge", 10000.0, 200.0, 4e-6),
    "cfg_flip_large_L2B_2x": ("large", 20000.0, 40.0, 2e-6),
    "cfg_flip_huge14_L2B_2x": ("huge", 20000.0, 200.0, 2e-6),
}


@pytest.mark.parametrize("name", sorted(FLIP_CONFIGS))
def test_flip_config_numbers(name):
  towers, num_epochs, warmup_epochs, learning_rate = FLIP_CONFIGS[name]
  config = load(f"configs/{name}.py")
  for key, value in SHARED_FLIP_FACTS.items():
    if key == "learning_rate":
      value = learning_rate
    got = get(config, key)
    assert (tuple(got) if isinstance(value, tuple) else got) == value, (name, key)
  (patch, width, depth, heads), (txt_width, txt_depth, txt_heads), proj = TOWERS[towers]
  img, txt = config.model.model_img, config.model.model_txt
  assert tuple(img.patches.size) == (patch, patch)
  assert (img.hidden_size, img.transformer.num_layers, img.transformer.num_heads,
          img.transformer.mlp_dim) == (width, depth, heads, 4 * width)
  assert (txt.hidden_size, txt.transformer.num_layers, txt.transformer.num_heads,
          txt.transformer.mlp_dim) == (txt_width, txt_depth, txt_heads, 4 * txt_width)
  assert config.model.clr.proj_dim_out == proj
  assert config.num_epochs == num_epochs
  assert config.warmup_epochs == warmup_epochs
  assert 0.5 <= img.mask_ratio < 1.0  # FLIP pretrains masked
  assert config.opt.flatten_params == (towers == "huge")  # FLIP: its H/14 configs only


def test_smoke_argument_shrinks_only_sizes():
  full, smoke = load(LARGE), load(LARGE + ":smoke")
  assert smoke.model.model_img.hidden_size < full.model.model_img.hidden_size
  assert smoke.image_size < full.image_size
  for key in ("learning_rate", "opt.b2", "opt.weight_decay", "model.model_img.mask_ratio",
              "model.model_txt.vocab_size", "partitioning.partition_states"):
    assert get(smoke, key) == get(full, key), key


# ---------------------------------------------------------------- config.evals and FLIP's keys

def test_eval_dataset_is_the_zeroshot_entry_dataset_through_overrides():
  from flip.evals import registry  # pylint: disable=g-import-not-at-top
  base = config_lib.load_config("configs/cfg_flip_base.py")
  assert base.evals.zeroshot.dataset == base.eval_dataset == "imagenet2012:5.*.*"
  assert registry.enabled_names(base) == ["zeroshot"]
  other = config_lib.load_config("configs/cfg_flip_base.py", ["eval_dataset=demo:/data/demo"])
  assert other.evals.zeroshot.dataset == "demo:/data/demo"
  off = config_lib.load_config("configs/cfg_flip_base.py", ["eval_dataset="])
  assert off.evals.zeroshot.dataset == "" and registry.enabled_names(off) == []
  demo = config_lib.load_config("configs/cfg_demo.py")
  assert demo.evals.zeroshot.dataset == "demo:data/demo/test"
  assert demo.evals.zeroshot.every_epochs == 0.0  # cfg_demo: evaluate once, at the end


def test_entry_periods_follow_eval_every_epochs_unless_set():
  base = config_lib.load_config("configs/cfg_flip_base.py", ["eval_every_epochs=5"])
  assert base.evals.zeroshot.every_epochs == base.evals.retrieval.every_epochs == 5.0
  own = config_lib.load_config("configs/cfg_flip_base.py", ["evals.zeroshot.every_epochs=2",
                                                           "evals.zeroshot.batch_size=512"])
  assert own.evals.zeroshot.every_epochs == 2.0 and own.evals.zeroshot.batch_size == 512
  assert own.eval_every_epochs == own.evals.retrieval.every_epochs == 1000.0
  mae = config_lib.load_config("configs/cfg_mae_base.py", ["eval_every_epochs=3"])
  assert mae.evals.reconstruction.every_epochs == 3.0


def test_old_evaluation_keys_are_gone_and_their_values_live_in_entries():
  flip_smoke = config_lib.load_config("configs/cfg_flip_large.py:smoke")
  assert "zeroshot" not in flip_smoke and flip_smoke.evals.zeroshot.batch_size == 16
  assert flip_smoke.evals.zeroshot.templates == "templates_full"
  assert flip_smoke.evals.retrieval.dataset == "" and flip_smoke.evals.retrieval.batch_size == 16
  for path, name, batch_size in (("configs/cfg_linprobe_base.py", "classification", 1024),
                                 ("configs/cfg_finetune_demo.py", "classification", 1000),
                                 ("configs/cfg_mae_base.py", "reconstruction", None)):
    config = config_lib.load_config(path)
    assert "visualize" not in config
    assert sorted(config.data) == ["num_classes", "shuffle_buffer_size", "train"]
    assert list(config.evals) == [name]
    assert config.evals[name].get("batch_size") == batch_size
  mae = config_lib.load_config("configs/cfg_mae_base.py:smoke")
  assert (mae.evals.reconstruction.num_images, mae.evals.reconstruction.seed) == (4, 0)
  mae_demo = config_lib.load_config("configs/cfg_mae_demo.py")
  assert mae_demo.evals.reconstruction.dataset == mae_demo.data.train == "demo:data/demo"
  assert mae_demo.evals.reconstruction.num_images == 8


def test_flatten_params_is_refused_with_model_parallelism():
  message = validation_error(load(LARGE, ["opt.flatten_params=True",
                                          "partitioning.num_partitions=2"]))
  assert "config.opt.flatten_params" in message and "num_partitions" in message
  config_lib.validate_config(load("configs/cfg_flip_huge14.py"))  # FLIP's own H/14 use is fine
