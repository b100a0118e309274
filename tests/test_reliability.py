"""Reliability of the training loop, in process (fast): numeric faults, checkpoint writes that
fail, checkpoint loading without unpickling, bad configuration refused before any compute, and bad
training data counted and skipped while every valid example is trained on.

References are independent of the code under test: the float64 schedule formula and the lr
recovered from the parameter update (train_utils), hashes of checkpoint files taken before a
failure, Python's audit events (`pickle.find_class` is raised by every unpickling of a class or
function), and for bad data the BERT vocabulary file read as plain text plus a sequential
simulation of the reader over the samples `laion_fixtures` wrote (each sample's fate is fixed
when its defect is injected). The subprocess versions (main.py killed, preempted, on two
processes, on a full disk) are in test_reliability_main.py.
"""

import collections
import errno
import hashlib
import os
import pathlib
import shutil
import sys
from typing import Dict, List, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from t5x import checkpoints as t5x_checkpoints

import laion_fixtures
import train_utils
from flip import checkpoints
from flip import config as config_lib
from flip.tasks import contrastive
from flip import train
from flip import trainer as trainer_lib
from flip.data import laion


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  with train_utils.persistent_compilation_cache(
      str(tmp_path_factory.getbasetemp() / "jax_compilation_cache")):
    yield


def poisoned_compute_grads(original):
  """FlipTask.compute_grads where a batch of POISON_TOKEN captions has a NaN loss and Inf grads."""

  def compute_grads(self, params, batch, rng, accum_steps=1, **kwargs):
    loss, metrics, grads = original(self, params, batch, rng, accum_steps, **kwargs)
    poison = jnp.all(batch["txt"] == train_utils.POISON_TOKEN)
    loss = jnp.where(poison, jnp.nan, loss)
    grads = jax.tree.map(lambda g: jnp.where(poison, jnp.inf, g), grads)
    return loss, metrics, grads

  return compute_grads


def tree_hash(path: pathlib.Path) -> Dict[str, str]:
  """sha256 of every file under `path`, by relative name."""
  return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(path.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- numeric faults

def test_lr_applied_after_a_skipped_step_is_the_logged_lr(monkeypatch, tmp_path):
  """Step 2 is non-finite and skipped. Step 3 must apply the schedule's lr for step 3 (the loop's
  step), which is what the loop logs, not the lr of step 2 (the optimizer's count of updates)."""
  monkeypatch.setattr(contrastive.FlipTask, "compute_grads",
                      poisoned_compute_grads(contrastive.FlipTask.compute_grads))
  config = train_utils.tiny_config("checkpoint_every_steps=2", "num_train_steps=3")
  make_dataset = train_utils.poisoned_dataset_factory(poison_steps=(2,), num_steps=3)
  out = train.train_and_evaluate(config, str(tmp_path), make_dataset=make_dataset)
  assert train_utils.logged_scalars(str(tmp_path), "nonfinite_steps_total") == {1: 0, 2: 1, 3: 1}

  before = train_utils.flat_tree(checkpoints.load_params_tree(
      checkpoints.checkpoint_dir(str(tmp_path), 2)))
  after = train_utils.flat_tree(out["state"].params)
  mu, nu = train_utils.adam_moments(out["state"])
  counts = {k.split("/")[-2]: int(v) for k, v in
            train_utils.flat_tree(out["state"].param_states).items() if k.endswith("count")}
  adam_updates = 2  # steps 1 and 3; Adam's bias correction counts the updates its moments saw
  assert int(out["state"].step) == 3 and adam_updates in counts.values()
  applied = train_utils.applied_adam_lr(before, after, mu, nu, adam_updates, config.opt.b1,
                                        config.opt.b2)
  epoch_of_step = lambda step: (step - 1) * config.batch_size / config.samples_per_epoch
  expected = train_utils.formula_lr(config, epoch_of_step(3))
  logged = train_utils.logged_scalars(str(tmp_path), "lr")[3]
  print(f"step 3 after a skipped step 2: applied lr {applied:.6g}, logged {logged:.6g}, "
        f"formula {expected:.6g}, one step behind {train_utils.formula_lr(config, epoch_of_step(2)):.6g}")
  assert logged == pytest.approx(expected, rel=1e-6)
  assert applied == pytest.approx(expected, rel=1e-4)
  # Inside warmup the lr of step 2 is half of step 3's: what the optimizer's count alone gave.
  assert applied != pytest.approx(train_utils.formula_lr(config, epoch_of_step(2)), rel=0.1)


def _with_nan_moment(host_state):
  """The state with Adam's second moment of `txt_proj/kernel` set to NaN (params stay finite)."""

  def poison(path, leaf):
    names = [train_utils.key_name(k) for k in path]
    if "nu" in names and "txt_proj" in names:
      return np.full_like(leaf, np.nan)
    return leaf

  return jax.tree_util.tree_map_with_path(poison, host_state)


def test_nonfinite_optimizer_state_is_never_checkpointed(tmp_path):
  """A checkpoint whose optimizer moment holds NaN (parameters finite) is resumed: the step's
  update is non-finite (loss and gradient are finite), so it is skipped and counted, and the final
  save refuses the state, naming the moment. Nothing is written."""
  config = train_utils.tiny_config("num_train_steps=1")
  trainer = train_utils.build_trainer(config)
  host = _with_nan_moment(jax.device_get(trainer.init_state()))
  data_iter = iter(train_utils.make_dataset(config, 0, 1, config.seed_tf))
  t5x_checkpoints.Checkpointer(trainer.state_shape, trainer.partitioner, str(tmp_path),
                               dataset_iterator=data_iter).save(
                                   train_utils.place_state(trainer, host))
  assert checkpoints.complete_steps(str(tmp_path)) == [0]

  with pytest.raises(FloatingPointError) as error:
    train.train_and_evaluate(config, str(tmp_path), make_dataset=train_utils.make_dataset)
  message = str(error.value)
  assert "\n" not in message and message.startswith("refusing to checkpoint step 1: ")
  assert "/nu/" in message and "txt_proj/kernel" in message
  loss = train_utils.logged_scalars(str(tmp_path), "loss")
  assert set(loss) == {1} and np.isfinite(loss[1])
  assert train_utils.logged_scalars(str(tmp_path), "nonfinite_steps_total") == {1: 1}
  assert checkpoints.complete_steps(str(tmp_path)) == [0]
  assert checkpoints.incomplete_dirs(str(tmp_path)) == []


def test_check_finite_covers_every_leaf_of_a_train_state_on_device():
  config = train_utils.tiny_config()
  trainer = train_utils.build_trainer(config)
  state = trainer.init_state()
  checkpoints.check_finite(state.state_dict(), "step 0")
  bad = train_utils.place_state(trainer, _with_nan_moment(jax.device_get(state)))
  with pytest.raises(FloatingPointError, match=r"state/param_states/.*nu/txt_proj/kernel"):
    checkpoints.check_finite(bad.state_dict(), "step 0")
  names = checkpoints.nonfinite_leaves(bad.state_dict())
  assert len(names) == 1  # exactly the poisoned moment; params and mu are finite


# --------------------------------------------------------------------------- failed writes

def test_a_failed_checkpoint_write_is_one_line_and_the_previous_checkpoint_is_intact(
    monkeypatch, tmp_path):
  """ENOSPC injected in t5x's array writer while saving step 4 (after it wrote a file into its
  temporary directory): one-line CheckpointWriteError naming the step, the directory and the OS
  error; the temporary directory is removed; checkpoint_2 is bitwise what it was; a resume after
  the disk is freed continues from it."""
  workdir = tmp_path / "wd"
  config = train_utils.tiny_config("checkpoint_every_steps=2", "num_train_steps=4")
  write = t5x_checkpoints.Checkpointer._write_state_to_tensorstore  # pylint: disable=protected-access
  seen = {}

  def failing_write(self, ckpt_dir, train_state, *args, **kwargs):
    if int(train_state.step) == 4:
      (pathlib.Path(ckpt_dir) / "target.partial").write_bytes(b"\0" * 1024)
      seen["tmp_dir"] = ckpt_dir
      seen["previous"] = tree_hash(workdir / "checkpoint_2")
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), ckpt_dir)
    return write(self, ckpt_dir, train_state, *args, **kwargs)

  monkeypatch.setattr(t5x_checkpoints.Checkpointer, "_write_state_to_tensorstore", failing_write)
  with pytest.raises(checkpoints.CheckpointWriteError) as error:
    train.train_and_evaluate(config, str(workdir), make_dataset=train_utils.make_dataset)
  message = str(error.value)
  print(message)
  assert "\n" not in message
  assert message == (f"could not write the checkpoint of step 4 to {workdir}: [Errno 28] No space "
                     f"left on device; the last complete checkpoint {workdir}/checkpoint_2 is "
                     "intact")
  assert ".tmp-" in seen["tmp_dir"] and not os.path.exists(seen["tmp_dir"])
  assert checkpoints.complete_steps(str(workdir)) == [2]
  assert tree_hash(workdir / "checkpoint_2") == seen["previous"]

  monkeypatch.setattr(t5x_checkpoints.Checkpointer, "_write_state_to_tensorstore", write)
  out = train.train_and_evaluate(config, str(workdir), make_dataset=train_utils.make_dataset)
  assert out["step"] == 4 and checkpoints.complete_steps(str(workdir)) == [2, 4]
  steps_per_run = [sorted(train_utils.logged_scalars(p, "loss"))
                   for p in train_utils.event_files(str(workdir))]
  assert steps_per_run == [[1, 2, 3, 4], [3, 4]]


# --------------------------------------------------------------------------- no unpickling

_AUDIT = {"active": False, "events": []}


def _audit_hook(event, args, audit=_AUDIT):
  # `audit` is bound now: at interpreter shutdown the module's globals are already gone.
  if audit["active"] and event == "pickle.find_class":
    audit["events"].append(args)


@pytest.fixture(scope="module")
def pickle_audit():
  """Records `pickle.find_class` events while active (audit hooks cannot be removed: the hook is
  installed once and switched on and off)."""
  if not _AUDIT.get("installed"):
    sys.addaudithook(_audit_hook)
    _AUDIT["installed"] = True

  class Audit:
    def __enter__(self):
      _AUDIT["events"].clear()
      _AUDIT["active"] = True
      return _AUDIT["events"]

    def __exit__(self, *exc):
      _AUDIT["active"] = False

  return Audit()


class _Probe:
  pass


def test_resume_and_pretrain_dir_never_unpickle(pickle_audit, tmp_path):
  """A full resume (train state + tf.data iterator + sidecar) and a pretrain_dir load run under
  an audit hook: not one class or function is looked up by an unpickler. The hook is shown to
  catch an unpickling of a class first."""
  import pickle  # pylint: disable=g-import-not-at-top
  with pickle_audit as events:
    pickle.loads(pickle.dumps(_Probe()))
  assert [e[1] for e in events] == ["_Probe"]

  config = train_utils.tiny_config("checkpoint_every_steps=2", "num_train_steps=2")
  train.train_and_evaluate(config, str(tmp_path / "run"), make_dataset=train_utils.make_dataset)
  resumed = train_utils.tiny_config("checkpoint_every_steps=2", "num_train_steps=3")
  pretrained = train_utils.tiny_config(f"pretrain_dir={tmp_path / 'run'}", "num_train_steps=1")
  with pickle_audit as events:
    out = train.train_and_evaluate(resumed, str(tmp_path / "run"),
                                   make_dataset=train_utils.make_dataset)
    train.train_and_evaluate(pretrained, str(tmp_path / "tuned"),
                             make_dataset=train_utils.make_dataset)
  assert out["step"] == 3
  assert events == []


# --------------------------------------------------------------------------- bad configuration

@pytest.fixture
def no_compute(monkeypatch):
  """Makes any initialisation, restore or training step fail loudly."""

  def forbidden(*args, **kwargs):
    raise AssertionError("compute started before the configuration was refused")

  monkeypatch.setattr(trainer_lib.Trainer, "init_state", forbidden)
  monkeypatch.setattr(trainer_lib.Trainer, "train_step", forbidden)
  monkeypatch.setattr(t5x_checkpoints.Checkpointer, "restore", forbidden)


@pytest.fixture(scope="module")
def other_architecture_run(tmp_path_factory):
  """A complete checkpoint of a model with a 2-block text tower and 24-wide projections."""
  workdir = tmp_path_factory.mktemp("other_arch")
  config = train_utils.tiny_config("model.model_txt.transformer.num_layers=2",
                                   "model.clr.proj_dim_out=24")
  trainer = train_utils.build_trainer(config)
  t5x_checkpoints.Checkpointer(trainer.state_shape, trainer.partitioner, str(workdir)).save(
      trainer.init_state())
  return workdir


BAD_CONFIGS = {
    "batch_not_divisible": (("batch_size=12",),
                            "config.batch_size 12 is not divisible by the data-parallel size 8"),
    "mesh_larger_than_devices": (("partitioning.mesh_shape=(16, 1)",),
                                 "mesh (data=16, model=1) needs 16 devices, but 8 are available"),
    "model_axis_larger_than_devices": (("partitioning.num_partitions=16",),
                                       "num_partitions=16 does not divide the 8 available"),
    "missing_laion_path": (("laion_path=/nonexistent/laion",),
                           "training data: config.laion_path entry '/nonexistent/laion': no "
                           "*.tfrecord or *.tar files found"),
    "empty_laion_path": (("laion_path=",), "training data: config.laion_path is empty"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_configuration_is_refused_before_any_compute(name, no_compute, tmp_path):
  overrides, expected = BAD_CONFIGS[name]
  config = train_utils.tiny_config(*overrides)
  make_dataset = None if "laion_path" in name else train_utils.make_dataset
  with pytest.raises(config_lib.ConfigError) as error:
    train.train_and_evaluate(config, str(tmp_path / "wd"), make_dataset=make_dataset)
  assert expected in str(error.value) and "\n" not in str(error.value)
  assert not (tmp_path / "wd").exists()  # refused before the workdir was even created


def test_pretrain_dir_of_another_architecture_is_refused_before_any_compute(
    no_compute, other_architecture_run, tmp_path):
  config = train_utils.tiny_config(f"pretrain_dir={other_architecture_run}")
  with pytest.raises(config_lib.ConfigError) as error:
    train.train_and_evaluate(config, str(tmp_path / "wd"), make_dataset=train_utils.make_dataset)
  message = str(error.value)
  assert "\n" not in message and message.startswith(f"config.pretrain_dir: {other_architecture_run}")
  assert "without a place" in message and "txt_encoder/Transformer/encoderblock_01/" in message
  assert "2 wrong shapes (" in message and "img_proj/kernel (32, 24) vs (32, 16)" in message


def test_unwritable_workdir_is_refused_before_any_compute(no_compute, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  config = train_utils.tiny_config()
  with pytest.raises(config_lib.ConfigError) as error:
    train.train_and_evaluate(config, str(blocker / "wd"), make_dataset=train_utils.make_dataset)
  assert str(error.value) == (f"--workdir: workdir {blocker / 'wd'} is not writable: [Errno 20] "
                              "Not a directory")


# --------------------------------------------------------------------------- bad data

BATCH_SIZE = 16
# Good shards: 2 x 12 valid samples. Bad shards: 2 x 25 samples with every defect laion_fixtures
# knows (8 skipped, 4 valid variants). One good and one bad shard are cut inside their last sample,
# and a zero-byte shard sits beside them: 24 + 50 - 8 - 2 = 64 valid samples = 4 batches.
NUM_GOOD, GOOD_SHARDS, NUM_BAD, BAD_SHARDS = 24, 2, 50, 2
BAD_DEFECTS = {1: "corrupt_jpeg", 4: "truncated_jpeg", 7: "zero_byte_image", 10: "empty_caption",
               13: "whitespace_caption", 16: "invalid_utf8", 19: "missing_image",
               22: "missing_caption", 25: "huge_caption", 28: "png", 31: "grey", 34: "rgba"}
EPOCHS = 2
EXTENSION = {"tfrecord": ".tfrecord", "webdataset": ".tar"}


def _write_group(fmt: str, directory: str, samples, num_shards: int) -> List[str]:
  if fmt == "tfrecord":
    return laion_fixtures.write_tfrecord_shards(directory, samples, num_shards)
  return laion_fixtures.write_webdataset_shards(directory, samples, num_shards)


def build_bad_data(root: pathlib.Path, fmt: str) -> Tuple[str, Dict[str, list]]:
  """A directory of good, defective, truncated and empty shards; {file name: its samples}."""
  data_dir = root / "mixed"
  data_dir.mkdir(parents=True)
  files = {}
  for group, samples, num_shards, cut in (
      ("good", laion_fixtures.make_samples(NUM_GOOD, salt=1, caption_prefix="a picture"),
       GOOD_SHARDS, 0),
      ("bad", laion_fixtures.make_samples(NUM_BAD, BAD_DEFECTS, salt=2, caption_prefix="a photo"),
       BAD_SHARDS, 1)):
    paths = _write_group(fmt, str(root / group), samples, num_shards)
    laion_fixtures.truncate_last_sample(paths[cut], samples)
    for shard, path in enumerate(paths):
      name = f"{group}-{shard:05d}{EXTENSION[fmt]}"
      shutil.move(path, data_dir / name)
      files[name] = [s for s in samples if s.shard == shard]
  (data_dir / f"empty-00000{EXTENSION[fmt]}").write_bytes(b"")
  files[f"empty-00000{EXTENSION[fmt]}"] = []
  return str(data_dir), files


def bert_ids(caption: str, max_len: int) -> Tuple[int, ...]:
  """Token ids of a lower-case caption of whole BERT words, from the vocabulary file itself."""
  vocab_file = pathlib.Path(train_utils.REPO_ROOT) / "flip" / "assets" / "bert_uncased_vocab.txt"
  if not hasattr(bert_ids, "table"):
    bert_ids.table = {w: i for i, w in enumerate(vocab_file.read_text().splitlines())}
  ids = [bert_ids.table[w] for w in caption.split()[:max_len]]
  return tuple(ids + [0] * (max_len - len(ids)))


def expected_counts_per_step(files, order_per_epoch: Sequence[Sequence[str]], row_file: Sequence[str],
                             batch_size: int) -> List[Dict[str, int]]:
  """Cumulative skip counts at the last example of every batch, reading the files one after
  another in the observed order: a sample's skip is counted before the next valid example; a
  truncated file's lost sample is counted when its end is reached."""
  stream = []  # reason per element, in reading order
  for order in order_per_epoch:
    for name in order:
      samples = files[name]
      stream += [s.expected_reason for s in samples if not s.lost_to_truncation]
      stream += ["truncated_file" for s in samples if s.lost_to_truncation]
  counts, per_valid = collections.Counter(), []
  for reason in stream:
    if reason == laion_fixtures.REASON_OK:
      per_valid.append(dict(counts))
    else:
      counts[reason] += 1
  assert len(per_valid) == len(row_file)
  return [per_valid[end - 1] for end in range(batch_size, len(row_file) + 1, batch_size)]


@pytest.mark.parametrize("fmt", ["tfrecord", "webdataset"])
def test_bad_data_is_counted_by_reason_and_every_valid_example_is_trained_on(
    fmt, monkeypatch, tmp_path, capsys):
  data_dir, files = build_bad_data(tmp_path, fmt)
  valid = [s for ss in files.values() for s in ss if s.expected_reason == laion_fixtures.REASON_OK]
  assert len(valid) == 64 and len(valid) % BATCH_SIZE == 0
  steps = EPOCHS * len(valid) // BATCH_SIZE
  # Files are read one after another, examples unshuffled, so the position of every defect in the
  # stream follows from the file order (observed) and the counts can be predicted per step.
  config = train_utils.tiny_config(
      f"laion_path={data_dir}", "model.model_txt.vocab_size=30523", "laion_cycle_length=1",
      "shuffle_buffer_size=1", f"num_train_steps={steps}", "checkpoint_every_steps=1000")
  max_len = config.aug.txt.max_len
  seen: List[np.ndarray] = []
  original_step = trainer_lib.Trainer.train_step

  def recording_step(self, state, batch):
    seen.append(np.asarray(batch["txt"]).copy())
    return original_step(self, state, batch)

  monkeypatch.setattr(trainer_lib.Trainer, "train_step", recording_step)
  out = train.train_and_evaluate(config, str(tmp_path / "wd"))
  assert out["step"] == steps and len(seen) == steps

  # Nothing else dropped: every valid sample is trained on exactly once per epoch.
  # The caption as written (the huge one repeats itself for 100 kB and is truncated by the tokenizer).
  file_of = {bert_ids(s.caption_bytes.decode("utf-8"), max_len): name for name, ss in files.items() for s in ss
             if s.expected_reason == laion_fixtures.REASON_OK}
  rows = [tuple(int(t) for t in row) for batch in seen for row in batch]
  assert collections.Counter(rows) == collections.Counter(
      {ids: EPOCHS for ids in file_of})

  row_file = [file_of[r] for r in rows]
  orders = []
  for epoch in range(EPOCHS):
    epoch_files = row_file[epoch * len(valid):(epoch + 1) * len(valid)]
    order = list(dict.fromkeys(epoch_files))
    # Sequential reading: each file's examples are contiguous.
    assert sum(1 for a, b in zip(epoch_files, epoch_files[1:]) if a != b) == len(order) - 1
    orders.append(order)
  expected = expected_counts_per_step(files, orders, row_file, BATCH_SIZE)
  logged = {reason: train_utils.logged_scalars(str(tmp_path / "wd"), f"data/skipped/{reason}")
            for reason in laion.SKIP_REASON_NAMES}
  for step in range(1, steps + 1):
    got = {r: int(v[step]) for r, v in logged.items() if v[step]}
    assert got == expected[step - 1], step
  per_epoch = laion_fixtures.expected_skips([s for ss in files.values() for s in ss])
  assert per_epoch == {"undecodable_image": 3, "empty_caption": 2, "invalid_utf8": 1,
                       "missing_image": 1, "missing_caption": 1, "truncated_file": 2}
  final = {r: int(v[steps]) for r, v in logged.items() if v[steps]}
  assert all(per_epoch[r] <= final[r] <= EPOCHS * per_epoch[r] for r in per_epoch)
  print(f"{fmt}: {len(rows)} examples trained on ({len(valid)} valid x {EPOCHS} epochs); "
        f"skipped per epoch {per_epoch}; logged at step {steps}: {final}")
  console = capsys.readouterr().out
  assert "skipped " in console.splitlines()[-1]
