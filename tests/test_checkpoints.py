"""flip.checkpoints and the loop's restore paths, through `flip.train.train_and_evaluate`.

The module runs the tiny config's whole schedule (10 steps) once uninterrupted and once stopped
after step 5 and resumed (with a killed save's `checkpoint_7.tmp-123` left in the workdir), both
with a checkpoint every 3 steps and keep-last-2. On CPU with fixed seeds the resumed run must be
bitwise identical: every parameter and optimizer-state leaf, and every logged loss. The other
restore paths (only a step-0 checkpoint, a changed batch size and num_epochs, pretrain_dir) start
from copies of those runs' checkpoints.
"""

import dataclasses
import json
import pathlib
import shutil
from typing import Any, Dict
from unittest import mock

import flax
import jax
import numpy as np
import pytest
from t5x import checkpoints as t5x_checkpoints

import train_utils
from flip import checkpoints
from flip import config as config_lib
from flip import optim
from flip import restore_plan
from flip.tasks import contrastive
from flip import train

CHECKPOINT_SETTINGS = ("checkpoint_every_steps=3", "keep_checkpoints=2")
STOP_STEP = 5
TOTAL_STEPS = 10  # num_epochs 0.1 x 1600 samples / batch 16
LEFTOVER_TMP = "checkpoint_7.tmp-123"


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  with train_utils.persistent_compilation_cache(
      str(tmp_path_factory.getbasetemp() / "jax_compilation_cache")):
    yield


@dataclasses.dataclass
class Runs:
  uninterrupted_dir: str
  resumed_dir: str
  stopped_copy_dir: str  # the resumed run's workdir as it was after the stop at step 5
  uninterrupted: Dict[str, Any]
  stopped: Dict[str, Any]
  resumed: Dict[str, Any]
  latest_before_resume: int


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  full_dir, resumed_dir, copy_dir = (str(root / n) for n in ("full", "resumed", "stopped_copy"))
  # num_train_steps -1: the uninterrupted run ends when num_epochs worth of samples are seen.
  uninterrupted = train.train_and_evaluate(train_utils.tiny_config(*CHECKPOINT_SETTINGS),
                                           full_dir, make_dataset=train_utils.make_dataset)
  stopped = train.train_and_evaluate(
      train_utils.tiny_config(*CHECKPOINT_SETTINGS, f"num_train_steps={STOP_STEP}"),
      resumed_dir, make_dataset=train_utils.make_dataset)
  shutil.copytree(resumed_dir, copy_dir)
  # A save killed before its rename: the msgpack file is there, the directory is still .tmp-.
  leftover = pathlib.Path(resumed_dir) / LEFTOVER_TMP
  leftover.mkdir()
  (leftover / "checkpoint").write_bytes(b"truncated")
  latest = checkpoints.latest_complete_step(resumed_dir)
  resumed = train.train_and_evaluate(
      train_utils.tiny_config(*CHECKPOINT_SETTINGS, f"num_train_steps={TOTAL_STEPS}"),
      resumed_dir, make_dataset=train_utils.make_dataset)
  return Runs(full_dir, resumed_dir, copy_dir, uninterrupted, stopped, resumed, latest)


def event_steps(workdir: str, tag: str = "loss"):
  """Logged steps per event file (one file per train_and_evaluate call), oldest first."""
  return [sorted(train_utils.logged_scalars(path, tag))
          for path in train_utils.event_files(workdir)]


# --------------------------------------------------------------------------- resume

def test_uninterrupted_run_ends_at_num_epochs_with_the_scheduled_lr(runs):
  config = train_utils.tiny_config()
  assert runs.uninterrupted["step"] == TOTAL_STEPS
  epochs = train_utils.logged_scalars(runs.uninterrupted_dir, "epoch")
  assert epochs[TOTAL_STEPS] == pytest.approx(config.num_epochs)
  logged_lr = train_utils.logged_scalars(runs.uninterrupted_dir, "lr")
  assert sorted(logged_lr) == list(range(1, TOTAL_STEPS + 1))
  for step, lr in logged_lr.items():
    epoch = (step - 1) * config.batch_size / config.samples_per_epoch
    assert lr == pytest.approx(train_utils.formula_lr(config, epoch), rel=1e-6, abs=1e-12), step


def test_resumed_run_is_bitwise_equal_to_the_uninterrupted_one(runs):
  assert runs.stopped["step"] == STOP_STEP and runs.resumed["step"] == TOTAL_STEPS
  full, resumed = runs.uninterrupted["state"], runs.resumed["state"]
  assert int(full.step) == int(resumed.step) == TOTAL_STEPS
  assert train_utils.unequal_leaves(train_utils.flat_tree(resumed.params),
                                    train_utils.flat_tree(full.params)) == []
  assert train_utils.unequal_leaves(train_utils.flat_tree(resumed.param_states),
                                    train_utils.flat_tree(full.param_states)) == []
  full_losses = train_utils.logged_scalars(runs.uninterrupted_dir, "loss")
  resumed_losses = train_utils.logged_scalars(runs.resumed_dir, "loss")
  assert sorted(full_losses) == list(range(1, TOTAL_STEPS + 1))
  assert resumed_losses == full_losses  # exact float equality, step by step
  # The second call really resumed at step 5 (it did not start over).
  assert event_steps(runs.resumed_dir) == [list(range(1, STOP_STEP + 1)),
                                           list(range(STOP_STEP + 1, TOTAL_STEPS + 1))]


def test_a_killed_saves_tmp_directory_is_ignored(runs):
  assert runs.latest_before_resume == STOP_STEP
  assert checkpoints.complete_steps(runs.stopped_copy_dir) == [3, 5]
  # (the resumed run continued from step 5: see the event steps above and the bitwise equality)
  assert 7 not in checkpoints.complete_steps(runs.resumed_dir)


def test_keep_last_n_removes_old_checkpoints_and_their_sidecars(runs):
  for workdir in (runs.uninterrupted_dir, runs.resumed_dir):
    assert checkpoints.complete_steps(workdir) == [9, 10]
    metas = sorted(p.name for p in (pathlib.Path(workdir) / checkpoints.META_DIR).iterdir())
    assert metas == ["step_10.json", "step_9.json"]
    for step in (9, 10):
      ckpt = pathlib.Path(checkpoints.checkpoint_dir(workdir, step))
      assert list(ckpt.glob("train_ds-*")), f"no data iterator state in {ckpt}"


def test_sidecar_records_samples_seen_batch_and_config(runs):
  meta = checkpoints.read_meta(runs.uninterrupted_dir, TOTAL_STEPS)
  config = train_utils.tiny_config()
  assert meta["step"] == TOTAL_STEPS
  assert meta["samples_seen"] == TOTAL_STEPS * config.batch_size
  assert meta["batch_size"] == config.batch_size
  assert json.loads(meta["config"])["learning_rate"] == config.learning_rate


def test_checkpoint_round_trip_restores_every_leaf_with_its_sharding(runs):
  config = train_utils.tiny_config(*CHECKPOINT_SETTINGS)
  trainer = train_utils.build_trainer(config)
  restorer = t5x_checkpoints.Checkpointer(trainer.state_shape, trainer.partitioner,
                                          runs.uninterrupted_dir)
  restored = restorer.restore(path=checkpoints.checkpoint_dir(runs.uninterrupted_dir, TOTAL_STEPS))
  final = runs.uninterrupted["state"]
  assert train_utils.unequal_leaves(train_utils.flat_tree(restored),
                                    train_utils.flat_tree(final)) == []
  for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(final)):
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim)


def test_resume_dir_is_restored_into_a_new_workdir(runs, tmp_path):
  """config.resume_dir: continue another run's checkpoint (state and data position), saving here."""
  config = train_utils.tiny_config(*CHECKPOINT_SETTINGS, f"resume_dir={runs.uninterrupted_dir}",
                                   f"num_train_steps={TOTAL_STEPS + 1}")
  out = train.train_and_evaluate(config, str(tmp_path), make_dataset=train_utils.make_dataset)
  assert out["step"] == TOTAL_STEPS + 1 and int(out["state"].step) == TOTAL_STEPS + 1
  # Past num_epochs the lr is min_abs_lr = 0: the step leaves the parameters as they were.
  assert train_utils.logged_scalars(str(tmp_path), "lr") == {TOTAL_STEPS + 1: 0.0}
  assert train_utils.unequal_leaves(train_utils.flat_tree(out["state"].params),
                                    train_utils.flat_tree(runs.uninterrupted["state"].params)) == []
  assert checkpoints.complete_steps(str(tmp_path)) == [TOTAL_STEPS + 1]
  assert checkpoints.complete_steps(runs.uninterrupted_dir) == [9, 10]
  meta = checkpoints.read_meta(str(tmp_path), TOTAL_STEPS + 1)
  assert meta["samples_seen"] == (TOTAL_STEPS + 1) * config.batch_size


# --------------------------------------------------------------------------- edges of restore

def test_a_workdir_with_only_step_0_is_restored_by_path(runs, tmp_path):
  """t5x's own restore() refuses step 0; the loop restores it by path and continues from it."""
  config = train_utils.tiny_config(*CHECKPOINT_SETTINGS, "num_train_steps=1")
  workdir = str(tmp_path)
  trainer = train_utils.build_trainer(config)
  state = trainer.init_state()
  # Mark the saved state so restoring it is distinguishable from a fresh init: logit scale 20.
  params = flax.core.unfreeze(state.params)
  marked_log_scale = np.full((1,), np.log(20.0), np.float32)  # FLIP's layout: shape (1,)
  params["logit_scale"] = jax.device_put(marked_log_scale, params["logit_scale"].sharding)
  state = state.replace_params(flax.core.freeze(params))
  saved_params = train_utils.flat_tree(state.params)
  data_iter = iter(train_utils.make_dataset(config, 0, 1, config.seed_tf))
  t5x_checkpoints.Checkpointer(trainer.state_shape, trainer.partitioner, workdir,
                               dataset_iterator=data_iter).save(state)
  assert checkpoints.complete_steps(workdir) == [0]
  with pytest.raises(ValueError, match="No checkpoints found"):
    t5x_checkpoints.Checkpointer(trainer.state_shape, trainer.partitioner, workdir).restore()

  out = train.train_and_evaluate(config, workdir, make_dataset=train_utils.make_dataset)
  assert out["step"] == 1 and int(out["state"].step) == 1
  logged_scale = train_utils.logged_scalars(workdir, "logit_scale")
  assert logged_scale == {1: pytest.approx(float(np.exp(marked_log_scale[0])), rel=1e-6)}
  # Step 1 runs at warmup_abs_lr = 0, so the restored parameters come out unchanged.
  assert config.warmup_abs_lr == 0.0
  assert train_utils.unequal_leaves(train_utils.flat_tree(out["state"].params), saved_params) == []
  assert checkpoints.complete_steps(workdir) == [0, 1]


def test_resume_with_changed_batch_size_and_num_epochs_continues_from_samples_seen(runs, tmp_path):
  old = train_utils.tiny_config(*CHECKPOINT_SETTINGS)
  new = train_utils.tiny_config(*CHECKPOINT_SETTINGS, "batch_size=32", "num_epochs=0.2",
                                f"num_train_steps={STOP_STEP + 1}")
  workdir = str(tmp_path / "resized")
  shutil.copytree(runs.stopped_copy_dir, workdir)
  before = checkpoints.load_params_tree(checkpoints.checkpoint_dir(workdir, STOP_STEP))
  out = train.train_and_evaluate(new, workdir, make_dataset=train_utils.make_dataset)
  assert out["step"] == STOP_STEP + 1

  samples_seen = STOP_STEP * old.batch_size  # 80 samples = epoch 0.05, inside the cosine
  epoch = samples_seen / old.samples_per_epoch
  expected = train_utils.formula_lr(new, epoch)
  logged = train_utils.logged_scalars(workdir, "lr")[STOP_STEP + 1]
  assert logged == pytest.approx(expected, rel=1e-6)
  assert logged == pytest.approx(float(optim.epoch_schedule(new)(epoch)), rel=1e-6)
  # Not what counting steps (step 5 x the new batch) or keeping the old total would give.
  assert expected != pytest.approx(
      train_utils.formula_lr(new, STOP_STEP * new.batch_size / new.samples_per_epoch), rel=1e-3)
  assert expected != pytest.approx(
      train_utils.formula_lr(old, epoch) * new.batch_size / old.batch_size, rel=1e-3)

  # The lr the optimizer really applied on device in that step, from the parameter update.
  after = train_utils.flat_tree(out["state"].params)
  mu, nu = train_utils.adam_moments(out["state"])
  applied = train_utils.applied_adam_lr(train_utils.flat_tree(before), after, mu, nu,
                                        STOP_STEP + 1, new.opt.b1, new.opt.b2)
  assert applied == pytest.approx(expected, rel=1e-4)

  meta = checkpoints.read_meta(workdir, STOP_STEP + 1)
  assert meta["samples_seen"] == samples_seen + new.batch_size
  epochs = train_utils.logged_scalars(workdir, "epoch")
  assert epochs[STOP_STEP + 1] == pytest.approx((samples_seen + new.batch_size) /
                                                new.samples_per_epoch)


def test_pretrain_dir_loads_params_only_into_a_fresh_optimizer_state(runs, tmp_path):
  config = train_utils.tiny_config(f"pretrain_dir={runs.uninterrupted_dir}", "num_train_steps=1")
  out = train.train_and_evaluate(config, str(tmp_path), make_dataset=train_utils.make_dataset)
  state = out["state"]
  assert out["step"] == 1 and int(state.step) == 1
  # Step 1 runs at lr 0 (warmup from warmup_abs_lr = 0): parameters are the pretrained ones.
  pretrained = train_utils.flat_tree(runs.uninterrupted["state"].params)
  assert train_utils.unequal_leaves(train_utils.flat_tree(state.params), pretrained) == []
  # The optimizer started fresh: counts are 1, and moments after one step from zero satisfy
  # nu = (1 - b2) g^2, mu = (1 - b1) g, i.e. nu = (1 - b2) / (1 - b1)^2 mu^2.
  opt = train_utils.flat_tree(state.param_states)
  counts = {k: int(v) for k, v in opt.items() if k.split("/")[-1] == "count"}
  assert counts and set(counts.values()) == {1}
  mu, nu = train_utils.adam_moments(state)
  b1, b2 = config.opt.b1, config.opt.b2
  for key in mu:
    np.testing.assert_allclose(nu[key], (1 - b2) / (1 - b1) ** 2 * mu[key].astype(np.float64) ** 2,
                               rtol=1e-4, atol=1e-30, err_msg=key)
  assert checkpoints.complete_steps(str(tmp_path)) == [1]


def test_pretrain_dir_with_another_architecture_fails_in_one_line_naming_keys(runs):
  other = train_utils.tiny_config("model.model_txt.transformer.num_layers=2",
                                  "model.clr.proj_dim_out=24", "model.clr.tau_learnable=False")
  shapes = jax.eval_shape(contrastive.FlipTask(other).init_variables, jax.random.PRNGKey(0))["params"]
  with pytest.raises(checkpoints.CheckpointError) as error:
    checkpoints.load_pretrained_params(runs.uninterrupted_dir, shapes)
  message = str(error.value)
  assert "\n" not in message
  assert checkpoints.checkpoint_dir(runs.uninterrupted_dir, TOTAL_STEPS) in message
  assert "missing" in message and "txt_encoder/Transformer/encoderblock_01/" in message
  assert "; 1 without a place (logit_scale); " in message
  assert "2 wrong shapes (" in message and "img_proj/kernel (32, 16) vs (32, 24)" in message


def test_missing_pretrain_dir_is_named():
  with pytest.raises(checkpoints.CheckpointError, match="does not exist: /nonexistent/run"):
    checkpoints.find_checkpoint_dir("/nonexistent/run")


def test_pretrain_dir_without_complete_checkpoint_is_named(tmp_path):
  (tmp_path / LEFTOVER_TMP).mkdir()
  with pytest.raises(checkpoints.CheckpointError, match="no complete checkpoint_<step>"):
    checkpoints.find_checkpoint_dir(str(tmp_path))


# --------------------------------------------------------------------------- position embeddings

def timm_resize_reference(posemb: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
  """timm's own resampling of a learned table without prefix rows (torch, the test extra)."""
  import torch  # pylint: disable=g-import-not-at-top
  from timm.layers import resample_abs_pos_embed  # pylint: disable=g-import-not-at-top
  return resample_abs_pos_embed(torch.from_numpy(posemb), [new_h, new_w],
                                num_prefix_tokens=0).numpy()


def test_learned_position_embeddings_are_resized_for_a_new_image_size():
  small = train_utils.tiny_config("model.model_img.sincos=False")  # 16 px / 8 = 2x2 patches
  large = train_utils.tiny_config("model.model_img.sincos=False", "image_size=32")  # 4x4
  small_shapes = jax.eval_shape(contrastive.FlipTask(small).init_variables,
                                jax.random.PRNGKey(0))["params"]
  large_shapes = jax.eval_shape(contrastive.FlipTask(large).init_variables,
                                jax.random.PRNGKey(0))["params"]
  rng = np.random.RandomState(0)
  loaded = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                        flax.core.unfreeze(small_shapes))
  posemb = loaded["img_encoder"]["pos_embedding"]
  assert posemb.shape == (1, 4, 32)

  fitted = checkpoints.match_params(loaded, large_shapes, posemb_grid=(4, 4))
  resized = fitted["img_encoder"]["pos_embedding"]
  assert resized.shape == (1, 16, 32) and resized.dtype == np.float32
  np.testing.assert_allclose(resized, timm_resize_reference(posemb, 4, 4), rtol=0, atol=1e-5)
  flat_loaded, flat_fitted = train_utils.flat_tree(loaded), train_utils.flat_tree(fitted)
  assert set(flat_fitted) == set(flat_loaded)
  for key, value in flat_loaded.items():
    if key != "img_encoder/pos_embedding":
      np.testing.assert_array_equal(flat_fitted[key], value, err_msg=key)

  # Same grid: nothing to resize, values pass through untouched.
  same = checkpoints.match_params(loaded, small_shapes, posemb_grid=(2, 2))
  np.testing.assert_array_equal(same["img_encoder"]["pos_embedding"], posemb)
  # The text position table is never interpolated: a longer max_len is a mis-shaped key.
  longer_text = train_utils.tiny_config("model.model_img.sincos=False", "aug.txt.max_len=16")
  text_shapes = jax.eval_shape(contrastive.FlipTask(longer_text).init_variables,
                               jax.random.PRNGKey(0))["params"]
  with pytest.raises(checkpoints.CheckpointError, match="txt_encoder/pos_embedding"):
    checkpoints.match_params(loaded, text_shapes, posemb_grid=(2, 2))


# --------------------------------------------------------------------------- numeric checks

def test_check_finite_refuses_a_tree_with_nan_or_inf_naming_the_leaf():
  good = {"a": {"kernel": np.ones((2, 2), np.float32)}, "count": np.int32(3)}
  checkpoints.check_finite(good, "step 3")
  checkpoints.check_finite(flax.core.freeze(good), "step 3")
  for bad_value in (np.nan, np.inf):
    bad = {"a": {"kernel": np.array([[1.0, bad_value], [0.0, 1.0]], np.float32)},
           "count": np.int32(3)}
    with pytest.raises(FloatingPointError, match="refusing to checkpoint step 7: a/kernel"):
      checkpoints.check_finite(bad, "step 7")
  with pytest.raises(FloatingPointError):
    checkpoints.check_finite(jax.numpy.array([1.0, jax.numpy.nan]), "step 1")


# --- FLIP's unmasked-tuning line as a shell runs it (no pretrain_dir) -----------------------------

# FLIP's README line up to its missing line continuation: mask ratio 0 and a lower lr only.
README_TUNING = ("model.model_img.mask_ratio=0.0", "learning_rate=4e-8")


def test_tuning_line_in_the_finished_pretraining_workdir_is_refused_before_compute(runs):
  """Resuming a finished masked run with mask_ratio=0 would train nothing: refused in one line."""
  config = train_utils.tiny_config(*CHECKPOINT_SETTINGS, *README_TUNING)
  assert config.model.model_img.mask_ratio == 0.0 and not config.pretrain_dir
  with pytest.raises(config_lib.ConfigError) as info:
    train.TrainingRun(config, runs.uninterrupted_dir, make_dataset=train_utils.make_dataset)
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith("nothing to train: the checkpoint of step 10")
  assert "mask_ratio=0.5, not 0" in message and "--config.pretrain_dir=" in message
  # Nothing was written: the workdir still ends at the same checkpoint.
  assert checkpoints.latest_complete_step(runs.uninterrupted_dir) == TOTAL_STEPS


def test_tuning_line_in_a_fresh_workdir_warns_once_before_compute(tmp_path):
  config = train_utils.tiny_config(*README_TUNING)
  with mock.patch.object(train.logging, "warning") as warning:
    run = train.TrainingRun(config, str(tmp_path), make_dataset=train_utils.make_dataset)
  assert run.plan.fresh
  lines = [call.args[0] for call in warning.call_args_list if "pretrain_dir" in call.args[0]]
  assert len(lines) == 1 and "\n" not in lines[0], lines
  assert lines[0].startswith("training from scratch with model_img.mask_ratio=0")
  # With pretrain_dir, or masked, there is nothing to say.
  problem = restore_plan.start_problem(train_utils.tiny_config(), run.plan, run.last_step)
  assert problem is None


def test_a_finished_run_restarted_with_its_own_config_only_warns(runs):
  config = train_utils.tiny_config(*CHECKPOINT_SETTINGS)
  layout = mock.Mock(shard_id=0, num_shards=1)
  plan = restore_plan.plan_restore(config, runs.uninterrupted_dir, layout)
  assert plan.saved_mask_ratio == config.model.model_img.mask_ratio == 0.5
  problem = restore_plan.start_problem(config, plan, train.last_step(config, plan.progress))
  assert problem is not None and not problem.refuse
  assert problem.message.startswith("nothing to train") and "--config.num_epochs" in problem.message


def test_a_scalar_saved_where_the_model_has_shape_1_loads_and_other_shapes_are_refused():
  """A logit scale saved as a scalar (checkpoints from before it became shape (1,)) fits the
  model exactly; a real mismatch (3 values for 2) is still named."""
  target = {"logit_scale": jax.ShapeDtypeStruct((1,), np.float32),
            "kernel": jax.ShapeDtypeStruct((2, 1), np.float32)}
  loaded = {"logit_scale": np.float32(2.5), "kernel": np.asarray([7.0, 8.0], np.float32)}
  fitted = checkpoints.match_params(loaded, target)
  np.testing.assert_array_equal(fitted["logit_scale"], np.asarray([2.5], np.float32))
  np.testing.assert_array_equal(fitted["kernel"], np.asarray([[7.0], [8.0]], np.float32))
  with pytest.raises(checkpoints.CheckpointError, match=r"kernel \(3,\) vs \(2, 1\)"):
    checkpoints.match_params(dict(loaded, kernel=np.zeros(3, np.float32)), target)
