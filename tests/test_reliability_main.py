"""main.py under preemption, a full disk and two processes: the reliability contract as a user
meets it (docs/RELIABILITY.md), one `python main.py` process per run.

Every run is the demo config on a slice of the real Fashion-MNIST demo set in img2dataset's
TFRecord layout, every step logged, at two model sizes: "tiny" (one-block towers, the quicker
compile) in the default run and the config's own `:smoke` size in the slow run (FLIP_SLOW_TESTS=1).
References are independent runs of the same command: an uninterrupted run for the preempted and
the disk-full ones (losses as float32 in the tensorboard events, whole checkpoints compared array
by array, bitwise); for two processes, one process with the 8 devices of this pytest process fed
the same global batches through a second data path (the two per-process input pipelines zipped
and concatenated here, their skip counts added here). Two processes reduce gradients over the
devices in another order than one process does (gloo between processes), so that comparison is to
float32 rounding, with the tolerances below, not bitwise.

The disk-full test mounts a size-limited tmpfs as the workdir (root with CAP_SYS_ADMIN; the test
fails otherwise, or skips with FLIP_ALLOW_MISSING_DATA=1), sized from the reference's checkpoint
so that the first checkpoint fits and the second does not. A workdir that turns read-only in the
middle of a run cannot be produced here: root ignores permissions, and a tmpfs cannot be remounted
read-only while the run holds its event file open; a read-only workdir at the start is refused
with exit status 2 (slow test below).

The in-process tests (numeric faults, failed writes injected, no unpickling, bad configs, bad
data) are in test_reliability.py; the kill -9 harness is scripts/kill_resume.py.
"""

import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest
import tensorflow as tf

import conftest
import reliability_harness as harness  # scripts/, on the path from conftest.py
import train_utils
from flip import config as config_lib
from flip import train
from flip.data import demo
from flip.data import laion

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Model sizes, both on the demo data: "tiny" (train_utils' one-block towers and large lr, the
# quicker compile; the text tower keeps BERT's vocabulary, the data's token ids) for the default
# run, "smoke" (the demo config's own `:smoke` size) for the slow run.
MODEL_ARGS = {
    "tiny": tuple(f"--config.{o}" for o in train_utils.TINY_OVERRIDES)
            + ("--config.model.model_txt.vocab_size=30523",),
    "smoke": (),
}
SIZES = [pytest.param("tiny"), pytest.param("smoke", marks=pytest.mark.slow)]
STEPS = 6  # steps of every run here: two checkpoints at CHECKPOINT_EVERY, room to stop in between
CHECKPOINT_EVERY = 2
NEVER = 1000  # a checkpoint interval no run here reaches: only the final (or preemption) save
SIGTERM_AFTER_STEP = 2  # the preempted run is signalled once this step is logged
TIMEOUT = 1800  # seconds per run: generous, the 2-core test machine is shared
EXIT_RUNTIME_ERROR, EXIT_CONFIG_ERROR = 1, 2  # main.py's exit statuses
# The first checkpoint must fit on the small disk, the second must not: 1.5 checkpoints of space.
DISK_CHECKPOINTS = 1.5
MP_PROCESSES, MP_LOCAL_DEVICES = 2, 4
MP_STEPS = 2 * CHECKPOINT_EVERY  # the two-process run; a one-process resume does the rest
# XLA's CPU collectives (gloo) wait 30 s for the other processes when they first connect a group
# of devices; a process started this much later must still be waited for (flip.train's barrier).
STRAGGLER_SECONDS = 45
# The multi-process data: 4 shards of 16 images, so each process (2 shards) closes an epoch every
# 4 steps; process 1's last shard is cut inside its last record.
MP_TRAIN_IMAGES, MP_SHARDS, MP_CUT_SHARD = 64, 4, 3
# Two processes and one process reduce the gradient over the 8 devices in different orders (gloo
# between processes vs XLA's in-process all-reduce), so float32 results agree to rounding, not
# bitwise: losses within LOSS_RTOL, every state array within STATE_RTOL of its largest magnitude.
# The attention key biases are the exception (train_utils.KEY_BIAS_INDEX: their exact gradient is
# 0, Adam turns rounding noise into steps of about lr): they are bounded by KEY_BIAS_LR_STEPS x
# the sum of the logged learning rates.
LOSS_RTOL = 1e-6  # about 8 float32 ulps
STATE_RTOL = 1e-4
KEY_BIAS_LR_STEPS = 2.0
# TFRecord framing: uint64 length, uint32 length CRC, data, uint32 data CRC.
TFRECORD_HEADER, TFRECORD_FOOTER = 12, 4


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  """One persistent compilation cache for every process of this module (and this one)."""
  path = str(tmp_path_factory.mktemp("jax_cache"))
  with train_utils.persistent_compilation_cache(path):
    yield path


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory, fashion_mnist_dir):
  paths = demo.build_demo(str(fashion_mnist_dir), str(tmp_path_factory.mktemp("demo") / "data"),
                          num_train=256, num_test=16, train_shards=4, test_shards=1)
  return paths.train_dir


def env_for(jax_cache: str, num_devices: int = 1) -> Dict[str, str]:
  return harness.subprocess_env(num_devices, jax_cache)


def main_args(size: str, workdir, train_dir: str, steps: int, checkpoint_every: int,
              keep: int = 2) -> List[str]:
  return harness.demo_args(str(workdir), train_dir, steps, checkpoint_every, keep,
                           extra=MODEL_ARGS[size])


def losses_of(workdir) -> Dict[int, float]:
  """{step: loss} from every event file of a workdir (a step re-run after a resume must agree)."""
  found = {}
  for _, step, value in harness.logged_scalars(str(workdir), "loss"):
    assert found.setdefault(step, value) == value, (step, found[step], value)
  return found


@pytest.fixture(scope="module")
def references(tmp_path_factory, train_dir, jax_cache):
  """size -> the workdir of an uninterrupted run: STEPS steps, a checkpoint every
  CHECKPOINT_EVERY, all kept (made on first use)."""
  made = {}

  def get(size: str) -> pathlib.Path:
    if size not in made:
      workdir = tmp_path_factory.mktemp(f"reference_{size}") / "wd"
      every = list(range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY))
      process = harness.run_main(
          main_args(size, workdir, train_dir, STEPS, CHECKPOINT_EVERY, keep=len(every)),
          env_for(jax_cache), str(workdir) + ".stderr", timeout=TIMEOUT)
      assert process.proc.returncode == 0, process.stderr[-3000:]
      assert harness.complete_steps(str(workdir)) == every
      made[size] = workdir
    return made[size]

  return get


# --------------------------------------------------------------------------- SIGTERM

def sigterm_after(process: harness.MainProcess, step: int) -> None:
  """Sends SIGTERM once `step` is logged (the loop's signal handler is installed by then)."""
  assert harness.wait_for(lambda: (process.last_logged_step or 0) >= step, process, TIMEOUT), (
      process.stderr[-3000:])
  process.signal(signal.SIGTERM)


def stopped_step(lines: Sequence[str]) -> int:
  """The step of main.py's one line on a signal (and the line is exactly that)."""
  assert len(lines) == 1, lines
  stopped = re.fullmatch(r"stopped by signal 15 at step (\d+) after writing its checkpoint; exit "
                         r"status 143", lines[0])
  assert stopped, lines[0]
  return int(stopped.group(1))


@pytest.mark.parametrize("size", SIZES)
def test_sigterm_writes_a_final_checkpoint_exits_143_and_the_restart_matches(
    size, tmp_path, train_dir, jax_cache, references):
  """SIGTERM once step 2 is logged (no periodic checkpoint is due before the end): the run stops
  after the step in progress, writes that step's checkpoint, says so in one line and exits 143.
  Restarted with the same command it resumes from that checkpoint and ends with the uninterrupted
  run's loss at every step and its final train state, bitwise."""
  reference = references(size)
  workdir = tmp_path / "wd"
  args = main_args(size, workdir, train_dir, STEPS, NEVER)
  process = harness.MainProcess(args, env_for(jax_cache), str(tmp_path / "term.stderr"))
  sigterm_after(process, SIGTERM_AFTER_STEP)
  code = process.wait(timeout=TIMEOUT)
  assert code == 128 + signal.SIGTERM, process.stderr[-3000:]
  stop_step = stopped_step(process.stderr_lines())
  assert SIGTERM_AFTER_STEP <= stop_step < STEPS
  assert process.last_logged_step == stop_step
  assert harness.complete_steps(str(workdir)) == [stop_step]  # the preemption checkpoint only
  assert harness.tmp_checkpoint_dirs(str(workdir)) == []

  restart = harness.run_main(args, env_for(jax_cache), str(tmp_path / "restart.stderr"),
                             timeout=TIMEOUT)
  assert restart.proc.returncode == 0, restart.stderr[-3000:]
  assert harness.resumed_from(restart) == stop_step
  assert restart.logged_steps == list(range(stop_step + 1, STEPS + 1))

  expected, got = losses_of(reference), losses_of(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  assert got == expected  # float32 from the events, exactly
  arrays, unequal = harness.compare_checkpoints(str(reference / f"checkpoint_{STEPS}"),
                                                str(workdir / f"checkpoint_{STEPS}"))
  print(f"{size}: SIGTERM after step {SIGTERM_AFTER_STEP} was logged: stopped at step "
        f"{stop_step}, exit {code}; restart resumed from checkpoint_{stop_step}; {len(got)} "
        f"losses equal to the uninterrupted run's; final state: {arrays} arrays compared, "
        f"{len(unequal)} unequal")
  assert arrays > 0 and unequal == []


# --------------------------------------------------------------------------- disk full

@pytest.fixture
def small_disk(tmp_path):
  """mount(size_bytes, read_only=False) -> a fresh tmpfs directory, unmounted afterwards; fails
  the test where mounting is not permitted (not root, no CAP_SYS_ADMIN), or skips it with
  FLIP_ALLOW_MISSING_DATA=1 (conftest.missing_prerequisite)."""
  mounted = []

  def mount(size_bytes: int, read_only: bool = False) -> pathlib.Path:
    path = tmp_path / f"disk{len(mounted)}"
    path.mkdir()
    options = f"size={size_bytes}" + (",ro" if read_only else "")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
      conftest.missing_prerequisite(
          f"cannot mount a tmpfs here (root with CAP_SYS_ADMIN needed): "
          f"{' '.join(result.stderr.split())}")
    mounted.append(path)
    return path

  yield mount
  for path in mounted:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def allocated_bytes(path: pathlib.Path) -> int:
  """Bytes allocated to the files under `path` (whole blocks, as a tmpfs counts them)."""
  return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def test_disk_full_during_a_save_is_one_line_exit_1_and_the_previous_checkpoint_survives(
    tmp_path, small_disk, train_dir, jax_cache, references):
  """The workdir is a tmpfs with room for 1.5 checkpoints: checkpoint_2 is written, the save of
  step 4 hits ENOSPC. main.py exits 1 with one line naming the step, the directory, the OS error
  and the intact checkpoint; no temporary directory is left; checkpoint_2 is bitwise the
  uninterrupted run's and the losses up to step 4 are its losses."""
  reference = references("tiny")
  checkpoint_bytes = allocated_bytes(reference / f"checkpoint_{STEPS}")
  disk = small_disk(int(DISK_CHECKPOINTS * checkpoint_bytes))
  workdir = disk / "wd"
  args = main_args("tiny", workdir, train_dir, STEPS, CHECKPOINT_EVERY)
  full = harness.run_main(args, env_for(jax_cache), str(tmp_path / "full.stderr"), timeout=TIMEOUT)
  lines = full.stderr_lines()
  failed_step = 2 * CHECKPOINT_EVERY
  print(f"checkpoint {checkpoint_bytes / 2**20:.1f} MiB on a "
        f"{DISK_CHECKPOINTS * checkpoint_bytes / 2**20:.1f} MiB disk: exit {full.proc.returncode}; "
        f"stderr {lines}")
  assert full.proc.returncode == EXIT_RUNTIME_ERROR, full.stderr[-3000:]
  assert lines == [f"error: could not write the checkpoint of step {failed_step} to {workdir}: "
                   f"[Errno 28] No space left on device; the last complete checkpoint "
                   f"{workdir}/checkpoint_{CHECKPOINT_EVERY} is intact"]
  assert full.logged_steps == list(range(1, failed_step + 1))
  assert harness.complete_steps(str(workdir)) == [CHECKPOINT_EVERY]
  assert harness.tmp_checkpoint_dirs(str(workdir)) == []
  arrays, unequal = harness.compare_checkpoints(str(reference / f"checkpoint_{CHECKPOINT_EVERY}"),
                                                str(workdir / f"checkpoint_{CHECKPOINT_EVERY}"))
  assert arrays > 0 and unequal == []
  assert losses_of(workdir) == {s: v for s, v in losses_of(reference).items() if s <= failed_step}


@pytest.mark.slow
def test_after_a_full_disk_is_grown_the_same_command_resumes_and_matches(
    tmp_path, small_disk, train_dir, jax_cache, references):
  """The full-disk run again, then the disk grown (tmpfs remount) and the command re-run: it
  resumes from checkpoint_2 and ends with the uninterrupted run's losses and final state."""
  reference = references("tiny")
  checkpoint_bytes = allocated_bytes(reference / f"checkpoint_{STEPS}")
  disk = small_disk(int(DISK_CHECKPOINTS * checkpoint_bytes))
  workdir = disk / "wd"
  args = main_args("tiny", workdir, train_dir, STEPS, CHECKPOINT_EVERY)
  full = harness.run_main(args, env_for(jax_cache), str(tmp_path / "full.stderr"), timeout=TIMEOUT)
  assert full.proc.returncode == EXIT_RUNTIME_ERROR, full.stderr[-3000:]
  subprocess.run(["mount", "-o", f"remount,size={4 * checkpoint_bytes}", str(disk)], check=True)
  resumed = harness.run_main(args, env_for(jax_cache), str(tmp_path / "resumed.stderr"),
                             timeout=TIMEOUT)
  assert resumed.proc.returncode == 0, resumed.stderr[-3000:]
  assert harness.resumed_from(resumed) == CHECKPOINT_EVERY
  assert losses_of(workdir) == losses_of(reference)
  arrays, unequal = harness.compare_checkpoints(str(reference / f"checkpoint_{STEPS}"),
                                                str(workdir / f"checkpoint_{STEPS}"))
  assert arrays > 0 and unequal == []


@pytest.mark.slow
def test_a_read_only_workdir_is_refused_before_any_compute_with_exit_2(
    tmp_path, small_disk, train_dir, jax_cache):
  disk = small_disk(2**20, read_only=True)
  workdir = disk / "wd"
  result = harness.run_main(main_args("tiny", workdir, train_dir, STEPS, CHECKPOINT_EVERY),
                            env_for(jax_cache), str(tmp_path / "ro.stderr"), timeout=TIMEOUT)
  assert result.proc.returncode == EXIT_CONFIG_ERROR, result.stderr[-3000:]
  assert result.stderr_lines() == [
      f"config error: --workdir: workdir {workdir} is not writable: [Errno 30] Read-only file "
      "system"]
  assert result.logged_steps == []


# --------------------------------------------------------------------------- divergence

DIVERGING_LR = "1e30"  # finite float32 parameters after one update, infinite logits after it
NONFINITE_LIMIT = 2


@pytest.mark.slow
def test_a_diverging_run_stops_with_exit_3_and_only_finite_checkpoints(
    tmp_path, train_dir, jax_cache):
  """A learning rate of 1e30: the first updates leave huge but finite parameters, after which
  every step is non-finite and skipped; NONFINITE_LIMIT of them in a row stop the run with exit
  status 3 and one line naming the limit and the last good checkpoint; every checkpoint on disk
  holds finite values only."""
  workdir = tmp_path / "wd"
  args = main_args("tiny", workdir, train_dir, STEPS, 1) + [
      f"--config.learning_rate={DIVERGING_LR}",
      f"--config.max_consecutive_nonfinite={NONFINITE_LIMIT}"]
  run = harness.run_main(args, env_for(jax_cache), str(tmp_path / "nan.stderr"), timeout=TIMEOUT)
  lines = run.stderr_lines()
  totals = {s: v for _, s, v in harness.logged_scalars(str(workdir), "nonfinite_steps_total")}
  print(f"lr {DIVERGING_LR}: exit {run.proc.returncode}; stderr {lines}; nonfinite_steps_total "
        f"{totals}; checkpoints {harness.complete_steps(str(workdir))}")
  assert run.proc.returncode == 3, run.stderr[-3000:]
  assert len(lines) == 1, lines
  stop = re.fullmatch(rf"error: {NONFINITE_LIMIT} consecutive steps had a non-finite loss, "
                      rf"gradient or update \(limit config.max_consecutive_nonfinite="
                      rf"{NONFINITE_LIMIT}\); last good checkpoint: (\d+|None)", lines[0])
  assert stop, lines[0]
  last_step = max(totals)
  assert totals[last_step] == NONFINITE_LIMIT and last_step < STEPS
  # The stop comes before the stopping step's save; a skipped step's state is the last finite
  # one, saved under its own step.
  assert harness.complete_steps(str(workdir))[-1] == last_step - 1
  assert stop.group(1) == str(last_step - 1)
  for step in harness.complete_steps(str(workdir)):
    arrays = harness.checkpoint_arrays(str(workdir / f"checkpoint_{step}"))
    assert all(np.all(np.isfinite(a)) for a in arrays.values() if a.dtype.kind == "f")


# --------------------------------------------------------------------------- two processes

def cut_inside_last_record(path: pathlib.Path) -> None:
  """Truncates a TFRecord file halfway into its last record (framing parsed here)."""
  data = path.read_bytes()
  offset, records = 0, []
  while offset < len(data):
    length = int.from_bytes(data[offset:offset + 8], "little")
    records.append((offset, length))
    offset += TFRECORD_HEADER + length + TFRECORD_FOOTER
  assert offset == len(data) and records
  start, length = records[-1]
  path.write_bytes(data[:start + TFRECORD_HEADER + length // 2])


@pytest.fixture(scope="module")
def mp_train_dir(tmp_path_factory, fashion_mnist_dir):
  """4 demo shards of 16 images; the last one (read by process 1) cut inside its last record."""
  built = demo.build_demo(str(fashion_mnist_dir), str(tmp_path_factory.mktemp("mp") / "data"),
                          num_train=MP_TRAIN_IMAGES, num_test=16, train_shards=MP_SHARDS,
                          test_shards=1)
  train_dir = tmp_path_factory.mktemp("mp_train") / "train"
  shutil.copytree(built.train_dir, train_dir)
  shards = sorted(train_dir.glob("*.tfrecord"))
  assert len(shards) == MP_SHARDS
  cut_inside_last_record(shards[MP_CUT_SHARD])
  return str(train_dir)


def demo_config(size: str, workdir, train_dir: str, steps: int, checkpoint_every: int,
                keep: int = 2, extra: Sequence[str] = ()):
  """The config main.py builds from `main_args` (the same overrides), in process."""
  args = main_args(size, workdir, train_dir, steps, checkpoint_every, keep) + list(extra)
  overrides = [a[len("--config."):] for a in args if a.startswith("--config.")]
  return config_lib.load_config(f"{REPO_ROOT / harness.DEMO_CONFIG.split(':')[0]}:smoke",
                                overrides)


def two_process_global_batches(skip_batches: int = 0):
  """`make_dataset` for one process: the global batches of a two-process run, built from the two
  per-process pipelines (shard p of 2, seeded as main.py seeds them) zipped and concatenated in
  process order, skip counts added; the first `skip_batches` dropped."""

  def make(config, shard_index, num_shards, seed):
    del seed  # a restarted pipeline would be reseeded; this one replays the two-process batches
    assert (shard_index, num_shards) == (0, 1)
    parts = tuple(laion.make_train_dataset(config, p, MP_PROCESSES, config.seed_tf)
                  for p in range(MP_PROCESSES))

    def concat(*batches):
      return {"image": tf.concat([b["image"] for b in batches], 0),
              "txt": tf.concat([b["txt"] for b in batches], 0),
              "skipped": {k: tf.add_n([b["skipped"][k] for b in batches])
                          for k in batches[0]["skipped"]}}

    return tf.data.Dataset.zip(parts).map(concat).skip(skip_batches)

  return make


@pytest.fixture(scope="module")
def one_process_references(tmp_path_factory, mp_train_dir, jax_cache):
  """size -> workdir of one process with the 8 devices of this pytest process, fed the global
  batches of the two-process run, STEPS steps, every checkpoint kept (made on first use)."""
  made = {}

  def get(size: str) -> pathlib.Path:
    if size not in made:
      workdir = tmp_path_factory.mktemp(f"one_process_{size}") / "wd"
      every = list(range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY))
      config = demo_config(size, workdir, mp_train_dir, STEPS, CHECKPOINT_EVERY, keep=len(every))
      out = train.train_and_evaluate(config, str(workdir),
                                     make_dataset=two_process_global_batches())
      assert out["step"] == STEPS and harness.complete_steps(str(workdir)) == every
      made[size] = workdir
    return made[size]

  return get


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def start_two_processes(size: str, workdir: pathlib.Path, train_dir: str, steps: int,
                        checkpoint_every: int, jax_cache: str, logs: pathlib.Path,
                        stagger_seconds: float = 0.0) -> List[harness.MainProcess]:
  """main.py twice on loopback, MP_LOCAL_DEVICES simulated CPU devices each, gloo collectives;
  the second process started `stagger_seconds` after the first."""
  address = f"127.0.0.1:{free_port()}"
  args = main_args(size, workdir, train_dir, steps, checkpoint_every)
  logs.mkdir(parents=True, exist_ok=True)
  tag = uuid.uuid4().hex[:6]
  processes = []
  for i in range(MP_PROCESSES):
    if i:
      time.sleep(stagger_seconds)
    processes.append(harness.MainProcess(
        args + [f"--coordinator_address={address}", f"--num_processes={MP_PROCESSES}",
                f"--process_id={i}"],
        env_for(jax_cache, MP_LOCAL_DEVICES), str(logs / f"process_{i}.{tag}.stderr")))
  return processes


def wait_all(processes: Sequence[harness.MainProcess], timeout: float = TIMEOUT) -> List[int]:
  """Exit statuses; if one process fails the others are killed (they would wait in collectives)."""
  deadline = time.time() + timeout
  while any(p.running() for p in processes) and time.time() < deadline:
    if any(not p.running() and p.proc.returncode not in (0, 128 + signal.SIGTERM)
           for p in processes):
      break
    time.sleep(harness.POLL_SECONDS * 10)
  for p in processes:
    if p.running():
      p.kill()
  return [p.wait(timeout=60) for p in processes]


def skip_counts(workdir) -> Dict[int, Dict[str, int]]:
  """{step: {reason: count}} as logged (nonzero counts only)."""
  by_step: Dict[int, Dict[str, int]] = {}
  for reason in laion.SKIP_REASON_NAMES:
    for _, step, value in harness.logged_scalars(str(workdir), f"data/skipped/{reason}"):
      by_step.setdefault(step, {})
      if value:
        by_step[step][reason] = int(value)
  return by_step


def is_key_bias(name: str) -> bool:
  """A fused qkv bias (its key slice) or a separate key bias (FLIP's layout), of the parameters."""
  return name.startswith("target/") and (name.endswith("/qkv_bias")
                                         or name.endswith(train_utils.SEPARATE_KEY_BIAS_SUFFIX))


def is_separate_key_bias_state(name: str) -> bool:
  """The optimizer state of a separate key bias (FLIP's layout): its gradient is zero up to
  rounding (softmax ignores a shift shared by every key), so its moments are rounding noise."""
  suffix = train_utils.SEPARATE_KEY_BIAS_SUFFIX
  return name.startswith("state/") and (name.endswith(suffix) or suffix + "/" in name)


def state_differences(a_dir, b_dir) -> Dict[str, float]:
  """Two checkpoints compared: the largest |a - b| of every array relative to the array's largest
  magnitude (key-bias slices of the parameters and the optimizer state of separate key biases
  excluded), and the largest absolute difference of the parameters' key-bias slices."""
  a, b = harness.checkpoint_arrays(str(a_dir)), harness.checkpoint_arrays(str(b_dir))
  assert set(a) == set(b), set(a) ^ set(b)
  relative, key_bias = 0.0, 0.0
  for name in a:
    x, y = a[name].astype(np.float64), b[name].astype(np.float64)
    if is_key_bias(name) and name.endswith(train_utils.SEPARATE_KEY_BIAS_SUFFIX):
      key_bias = max(key_bias, float(np.max(np.abs(x - y))))
      continue
    if is_separate_key_bias_state(name):
      continue  # Adam's moments of a gradient that is rounding noise: noise of their own
    if is_key_bias(name):
      key_bias = max(key_bias, float(np.max(np.abs(x - y)[train_utils.KEY_BIAS_INDEX])))
      x, y = (np.delete(v, train_utils.KEY_BIAS_INDEX, axis=0) for v in (x, y))
    scale = float(np.max(np.abs(x), initial=0.0))
    diff = float(np.max(np.abs(x - y), initial=0.0))
    relative = max(relative, diff / scale if scale else diff)
  return {"arrays": len(a), "relative": relative, "key_bias": key_bias}


def steps_per_event_file(workdir) -> List[List[int]]:
  """The logged steps of each run in a workdir (one event file per run, in start order)."""
  runs: Dict[str, List[int]] = {}
  for name, step, _ in harness.logged_scalars(str(workdir), "loss"):
    runs.setdefault(name, []).append(step)
  return [runs[name] for name in sorted(runs)]


def lr_sum(workdir, last_step: int) -> float:
  return sum(v for _, step, v in harness.logged_scalars(str(workdir), "lr") if step <= last_step)


def assert_close_to_reference(got: Dict[int, float], reference: Dict[int, float]) -> float:
  """Losses step by step within LOSS_RTOL; returns the largest absolute difference."""
  for step, loss in got.items():
    assert loss == pytest.approx(reference[step], rel=LOSS_RTOL), step
  return max(abs(loss - reference[step]) for step, loss in got.items())


def assert_state_close(reference_dir, workdir, step: int) -> Dict[str, float]:
  found = state_differences(reference_dir / f"checkpoint_{step}", workdir / f"checkpoint_{step}")
  assert found["relative"] <= STATE_RTOL, found
  assert found["key_bias"] <= KEY_BIAS_LR_STEPS * lr_sum(reference_dir, step), found
  return found


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, mp_train_dir, jax_cache):
  """size -> (workdir, processes) of main.py as 2 processes x 4 devices, MP_STEPS steps, a
  checkpoint every CHECKPOINT_EVERY (made on first use)."""
  made = {}

  def get(size: str):
    if size not in made:
      root = tmp_path_factory.mktemp(f"two_processes_{size}")
      processes = start_two_processes(size, root / "wd", mp_train_dir, MP_STEPS, CHECKPOINT_EVERY,
                                      jax_cache, root / "logs")
      codes = wait_all(processes)
      assert codes == [0, 0], [p.stderr[-2000:] for p in processes]
      made[size] = (root / "wd", processes)
    return made[size]

  return get


@pytest.mark.parametrize("size", SIZES)
def test_two_processes_give_the_losses_and_state_of_one_process(
    size, two_process_runs, one_process_references):
  """main.py as 2 processes x 4 devices (gloo on loopback), each reading its own data shards,
  logs the losses and skip counts of one process with 8 devices fed the same global batches, and
  writes the same checkpoint, to float32 rounding (LOSS_RTOL, STATE_RTOL); process 1's cut shard
  is in the counts process 0 logs. The checkpoint holds one input-iterator state per process."""
  workdir, processes = two_process_runs(size)
  reference_dir = one_process_references(size)
  for process in processes:
    assert process.logged_steps == list(range(1, MP_STEPS + 1))
  assert harness.complete_steps(str(workdir)) == [CHECKPOINT_EVERY, MP_STEPS]
  iterator_states = sorted(n for n in os.listdir(workdir / f"checkpoint_{MP_STEPS}")
                           if n.startswith("train_ds-") and n.endswith(".index"))
  assert iterator_states == ["train_ds-000-of-002.index", "train_ds-001-of-002.index"]

  reference = losses_of(reference_dir)
  two = losses_of(workdir)
  assert sorted(two) == list(range(1, MP_STEPS + 1))
  loss_diff = assert_close_to_reference(two, reference)
  state = assert_state_close(reference_dir, workdir, MP_STEPS)
  counts, reference_counts = skip_counts(workdir), skip_counts(reference_dir)
  print(f"{size}: 2 processes x {MP_LOCAL_DEVICES} devices vs 1 process x 8 devices: max loss "
        f"difference {loss_diff:.3g} over steps {sorted(two)} (losses {two}, reference "
        f"{ {s: reference[s] for s in two} }); checkpoint_{MP_STEPS}: {state} (key-bias bound "
        f"{KEY_BIAS_LR_STEPS * lr_sum(reference_dir, MP_STEPS):.3g}); skip counts logged {counts}")
  assert counts == {s: reference_counts[s] for s in counts}
  assert counts[MP_STEPS].get("truncated_file", 0) >= 1


@pytest.mark.parametrize("size", SIZES)
def test_a_two_process_checkpoint_resumes_in_one_process(
    size, tmp_path, mp_train_dir, two_process_runs, one_process_references):
  """The two-process checkpoint (iterator states for 2 data shards) resumed by one process: the
  train state is restored, the input pipeline restarts; given the global batches the two
  processes would have read next, the run continues with the reference's losses and ends in its
  final state. Restarted again with the same config (resume_dir still set) it continues from its
  own newer checkpoint, not from resume_dir's."""
  workdir, _ = two_process_runs(size)
  reference_dir = one_process_references(size)
  reference = losses_of(reference_dir)
  resumed_dir = tmp_path / "one_process_resumed"
  config = demo_config(size, resumed_dir, mp_train_dir, STEPS, CHECKPOINT_EVERY,
                       extra=[f"--config.resume_dir={workdir}"])
  out = train.train_and_evaluate(config, str(resumed_dir),
                                 make_dataset=two_process_global_batches(skip_batches=MP_STEPS))
  assert out["step"] == STEPS
  resumed = losses_of(resumed_dir)
  assert sorted(resumed) == list(range(MP_STEPS + 1, STEPS + 1))
  resumed_diff = assert_close_to_reference(resumed, reference)
  final = assert_state_close(reference_dir, resumed_dir, STEPS)
  print(f"{size}: one process resumed from the two-process checkpoint_{MP_STEPS}: max loss "
        f"difference {resumed_diff:.3g} over steps {sorted(resumed)}; final state: {final}")

  config = demo_config(size, resumed_dir, mp_train_dir, STEPS + 1, CHECKPOINT_EVERY,
                       extra=[f"--config.resume_dir={workdir}"])
  out = train.train_and_evaluate(config, str(resumed_dir),
                                 make_dataset=two_process_global_batches(skip_batches=MP_STEPS))
  assert out["step"] == STEPS + 1
  steps_per_run = steps_per_event_file(resumed_dir)
  assert steps_per_run == [list(range(MP_STEPS + 1, STEPS + 1)), [STEPS + 1]], steps_per_run


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_they_resume(
    tmp_path, mp_train_dir, jax_cache, one_process_references):
  """SIGTERM reaches process 1 only. Both processes agree on the step to stop at, write one
  checkpoint together (each its own input-iterator state), print one line each and exit 143;
  restarted with process 1 a straggler (started STRAGGLER_SECONDS later, beyond gloo's 30 s
  connection wait), each resumes its own iterator state and the run ends with the one-process
  reference's losses at every step."""
  size = "tiny"
  reference_dir = one_process_references(size)
  workdir = tmp_path / "wd"
  processes = start_two_processes(size, workdir, mp_train_dir, STEPS, NEVER, jax_cache,
                                  tmp_path / "logs")
  sigterm_after(processes[1], SIGTERM_AFTER_STEP)
  codes = wait_all(processes)
  assert codes == [128 + signal.SIGTERM] * MP_PROCESSES, [p.stderr[-2000:] for p in processes]
  stops = [stopped_step(p.stderr_lines()) for p in processes]
  assert stops[0] == stops[1] and SIGTERM_AFTER_STEP <= stops[0] < STEPS
  stop_step = stops[0]
  assert [p.last_logged_step for p in processes] == stops
  assert harness.complete_steps(str(workdir)) == [stop_step]
  iterator_states = sorted(n for n in os.listdir(workdir / f"checkpoint_{stop_step}")
                           if n.startswith("train_ds-") and n.endswith(".index"))
  assert iterator_states == ["train_ds-000-of-002.index", "train_ds-001-of-002.index"]

  restarted = start_two_processes(size, workdir, mp_train_dir, STEPS, NEVER, jax_cache,
                                  tmp_path / "logs", stagger_seconds=STRAGGLER_SECONDS)
  assert wait_all(restarted) == [0, 0], [p.stderr[-2000:] for p in restarted]
  assert [harness.resumed_from(p) for p in restarted] == [stop_step] * MP_PROCESSES
  losses = losses_of(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  loss_diff = assert_close_to_reference(losses, losses_of(reference_dir))
  print(f"SIGTERM to process 1 after step {SIGTERM_AFTER_STEP}: both stopped at step {stop_step} "
        f"(exit {codes}); resumed; max loss difference to one process {loss_diff:.3g} over "
        f"{len(losses)} steps")
