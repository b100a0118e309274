"""What the reliability scripts and tests share: running main.py as a user does, killing it, and
reading back what it left on disk.

Owns: `MainProcess` (main.py as a subprocess whose console lines are followed as they are
printed, with the repository's command line for the demo config at smoke size), the kill
strategies of `scripts/kill_resume.py` (`KillPlan`: during start-up, after a given training step,
while a checkpoint is being written, right after a checkpoint became complete), readers for what
a run leaves behind that tolerate a process killed mid-write (tensorboard event files cut inside
a record, `checkpoint_<step>.tmp-*` directories), and exact comparisons of whole checkpoints
(every array of the train state: parameters, optimizer moments and counters, step).

Design notes. Event files are parsed from their TFRecord framing here rather than with
`tf.compat.v1.train.summary_iterator`, which raises on the record a SIGKILL cut in half; a cut
record is simply the end of that file. Losses are compared as the float32 values written to the
events (the console prints 4 significant digits). Every process gets its own stdout pipe, read by
a thread, so waiting for "step 7" never blocks the process on a full pipe.
"""

import dataclasses
import os
import pathlib
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

# main.py's console line for a logged step: "step 7/40 | loss 3.2 | ...".
STEP_LINE = re.compile(r"^step (\d+)/(\d+) \|")
# flip.train's log line when it resumes: "resuming from <dir>/checkpoint_12 at step 12 (...)".
RESUME_LINE = re.compile(r"resuming from (\S+)/checkpoint_(\d+) at step (\d+)")
CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")
TMP_CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)\.tmp-\d+$")
# TFRecord framing of event files: uint64 length, uint32 CRC, data, uint32 CRC.
RECORD_HEADER_BYTES = 12
RECORD_FOOTER_BYTES = 4
POLL_SECONDS = 0.02
STARTUP_KILL_MIN_SECONDS = 0.3  # a start-up kill lands at least this long after the spawn
# Demo-config smoke run used by the scripts and tests: a few dozen CPU steps of the real model.
DEMO_CONFIG = "configs/cfg_demo.py:smoke"
# Start-up noise TF/XLA print on stderr that is not part of main.py's own output.
STDERR_NOISE = ("WARNING: All log messages", "cudart_stub", "cpu_feature_guard", "To enable the",
                "cuInit", "cuda_platform", "absl::InitializeLog")


def clean_stderr_lines(stderr: str) -> List[str]:
  """stderr without TF/XLA start-up noise and C++/absl log lines (I/W/E/F + date), whatever
  TF_CPP_MIN_LOG_LEVEL says: what main.py itself printed."""
  return [line for line in stderr.splitlines()
          if line.strip() and not any(n in line for n in STDERR_NOISE)
          and not re.match(r"^[IWEF]\d{4} ", line)]


def demo_args(workdir: str, train_dir: str, num_steps: int, checkpoint_every: int,
              keep: int = 2, extra: Sequence[str] = ()) -> List[str]:
  """main.py arguments: the demo config at smoke size, every step logged."""
  return [f"--workdir={workdir}", f"--config={DEMO_CONFIG}", f"--config.laion_path={train_dir}",
          "--config.eval_dataset=", f"--config.num_train_steps={num_steps}",
          f"--config.checkpoint_every_steps={checkpoint_every}", "--config.log_every_steps=1",
          f"--config.keep_checkpoints={keep}", *extra]


def subprocess_env(num_devices: int = 1, compilation_cache: Optional[str] = None,
                   extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
  """A user's environment: `num_devices` simulated CPU devices, TF quiet, optionally jax's
  persistent compilation cache (restarts then load the compiled step instead of compiling)."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  if num_devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  env["JAX_PLATFORMS"] = "cpu"
  if compilation_cache:
    env["JAX_COMPILATION_CACHE_DIR"] = compilation_cache
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env.update(extra or {})
  return env


class MainProcess:
  """`python main.py ARGS` in the background; stdout followed line by line, stderr to a file."""

  def __init__(self, args: Sequence[str], env: Mapping[str, str], stderr_path: str):
    self.args = list(args)
    self.stderr_path = stderr_path
    self._stderr_file = open(stderr_path, "w")
    self.started = time.time()
    self.proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "main.py"), *self.args],
                                 cwd=REPO_ROOT, env=dict(env), stdout=subprocess.PIPE,
                                 stderr=self._stderr_file, text=True, bufsize=1)
    self.stdout_lines: List[str] = []
    self.logged_steps: List[int] = []
    self.first_step_seconds: Optional[float] = None  # start-up time: spawn to first logged step
    self._lock = threading.Lock()
    self._reader = threading.Thread(target=self._read_stdout, daemon=True)
    self._reader.start()

  def _read_stdout(self):
    for line in self.proc.stdout:
      with self._lock:
        self.stdout_lines.append(line.rstrip("\n"))
        match = STEP_LINE.match(line)
        if match:
          self.logged_steps.append(int(match.group(1)))
          if self.first_step_seconds is None:
            self.first_step_seconds = time.time() - self.started

  @property
  def last_logged_step(self) -> Optional[int]:
    with self._lock:
      return self.logged_steps[-1] if self.logged_steps else None

  def running(self) -> bool:
    return self.proc.poll() is None

  def signal(self, signum: int) -> None:
    if self.running():
      self.proc.send_signal(signum)

  def kill(self) -> None:
    self.signal(signal.SIGKILL)

  def wait(self, timeout: Optional[float] = None) -> int:
    code = self.proc.wait(timeout=timeout)
    self._reader.join(timeout=10)
    self._stderr_file.close()
    return code

  @property
  def stdout(self) -> str:
    with self._lock:
      return "\n".join(self.stdout_lines)

  @property
  def stderr(self) -> str:
    with open(self.stderr_path) as f:
      return f.read()

  def stderr_lines(self) -> List[str]:
    return clean_stderr_lines(self.stderr)


def run_main(args: Sequence[str], env: Mapping[str, str], stderr_path: str,
             timeout: float = 1800) -> MainProcess:
  """Runs main.py to completion."""
  process = MainProcess(args, env, stderr_path)
  process.wait(timeout=timeout)
  return process


# --- what a run leaves on disk ------------------------------------------------------------------

def complete_steps(workdir: str) -> List[int]:
  """Steps of finalised checkpoints (flip.checkpoints' rule: the msgpack `checkpoint` is there)."""
  if not os.path.isdir(workdir):
    return []
  return sorted(int(m.group(1)) for m in map(CHECKPOINT_DIR.match, os.listdir(workdir))
                if m and os.path.exists(os.path.join(workdir, m.group(0), "checkpoint")))


def tmp_checkpoint_dirs(workdir: str) -> List[str]:
  if not os.path.isdir(workdir):
    return []
  return sorted(name for name in os.listdir(workdir) if TMP_CHECKPOINT_DIR.match(name))


def read_event_records(path: str) -> Tuple[List[bytes], bool]:
  """The records of one event file and whether it ends inside a record (a killed writer)."""
  with open(path, "rb") as f:
    data = f.read()
  records, offset = [], 0
  while offset < len(data):
    if len(data) - offset < RECORD_HEADER_BYTES:
      return records, True
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    end = offset + RECORD_HEADER_BYTES + length + RECORD_FOOTER_BYTES
    if end > len(data):
      return records, True
    records.append(data[offset + RECORD_HEADER_BYTES:offset + RECORD_HEADER_BYTES + length])
    offset = end
  return records, False


def event_files(workdir: str) -> List[str]:
  names = sorted(n for n in os.listdir(workdir) if n.startswith("events.out.tfevents."))
  return [os.path.join(workdir, n) for n in names]


def logged_scalars(workdir: str, tag: str) -> List[Tuple[str, int, float]]:
  """Every (event file, step, value) of one scalar in a workdir, in file and write order."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top
  found = []
  for path in event_files(workdir):
    records, _ = read_event_records(path)
    for record in records:
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        if value.tag == tag:
          found.append((os.path.basename(path), int(event.step),
                        float(tf.make_ndarray(value.tensor))))
  return found


def checkpoint_arrays(ckpt_dir: str) -> Dict[str, "np.ndarray"]:
  """Every array of a t5x checkpoint (target = params, state = step + optimizer state), by path."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from t5x import checkpoints as t5x_checkpoints  # pylint: disable=g-import-not-at-top
  contents = t5x_checkpoints.load_t5x_checkpoint(ckpt_dir)
  flat = traverse_util.flatten_dict(contents, sep="/")
  return {k: np.asarray(v) for k, v in flat.items() if v is not None}


def compare_checkpoints(a_dir: str, b_dir: str) -> Tuple[int, List[str]]:
  """(number of arrays compared, names of those that are not bitwise equal) of two checkpoints."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  a, b = checkpoint_arrays(a_dir), checkpoint_arrays(b_dir)
  names = sorted(set(a) | set(b))
  unequal = [n for n in names if n not in a or n not in b or a[n].dtype != b[n].dtype
             or a[n].shape != b[n].shape or a[n].tobytes() != b[n].tobytes()]
  assert all(np.asarray(v).size for v in a.values())
  return len(names), unequal


# --- kills --------------------------------------------------------------------------------------

KILL_STARTUP = "startup"  # after a random delay, before or during restore and compilation
KILL_AFTER_STEP = "after_step"  # once a given step is logged (plus a random delay)
KILL_DURING_SAVE = "during_save"  # while a checkpoint_<step>.tmp-* directory exists
KILL_AFTER_SAVE = "after_save"  # as soon as a new complete checkpoint appears (pruning, next step)
KILL_KINDS = (KILL_DURING_SAVE, KILL_AFTER_STEP, KILL_STARTUP, KILL_AFTER_SAVE)
# Phases of a save a during_save kill aims at, in t5x's order: the arrays (one tensorstore
# directory each; killed after a random delay into them), the input-iterator state (killed once a
# `train_ds-*` file appears), the msgpack `checkpoint` file (killed once it appears: the rename
# follows within microseconds, so this kill often lands just after the checkpoint completed).
SAVE_ARRAYS, SAVE_ITERATOR, SAVE_MSGPACK = "arrays", "iterator", "msgpack"
SAVE_PHASES = (SAVE_ARRAYS, SAVE_ITERATOR, SAVE_MSGPACK)
_SAVE_PHASE_REACHED = {
    SAVE_ARRAYS: lambda names: any(n.startswith(("target.", "state.")) for n in names),
    SAVE_ITERATOR: lambda names: any(n.startswith("train_ds-") for n in names),
    SAVE_MSGPACK: lambda names: "checkpoint" in names,
}
SAVE_ARRAYS_MAX_DELAY_SECONDS = 0.5


@dataclasses.dataclass
class KillRecord:
  """One SIGKILL and where it landed."""
  kind: str
  resumed_from: Optional[int]  # the checkpoint step the killed attempt restored (None: fresh)
  last_logged_step: Optional[int]  # the last step the attempt printed before it died
  landed: str  # e.g. "start-up (...)", "training, after step 9", "writing checkpoint_12 (...)"
  complete_after: Optional[int]  # latest complete checkpoint after the kill
  tmp_left: List[str]  # checkpoint_*.tmp-* directories left behind
  seconds: float  # time from start of the attempt to the kill
  aim: str = ""  # the save phase a during_save kill aimed at


def _tmp_contents(workdir: str, tmp_name: str) -> str:
  """What a save had written when it died, in t5x's order: arrays (tensorstore, one directory
  per array), the input-iterator state, the msgpack `checkpoint` file (then the rename)."""
  try:
    names = os.listdir(os.path.join(workdir, tmp_name))
  except OSError:
    return "gone"
  arrays = sum(1 for n in names if n.startswith(("target.", "state.")))
  iterator_files = [n for n in names if n.startswith("train_ds-")]
  if any(n.endswith(".index") for n in iterator_files):
    iterator = "iterator state written"
  elif iterator_files:  # tf.train.Checkpoint's temporary files: the write was cut
    iterator = "iterator state partly written"
  else:
    iterator = "no iterator state"
  msgpack = "with msgpack" if "checkpoint" in names else "no msgpack"
  return f"{arrays} arrays, {iterator}, {msgpack}"


def wait_for(predicate, process: MainProcess, timeout: float) -> bool:
  """Polls `predicate()` until it holds (True) or the process ends or the timeout passes (False)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    if not process.running():
      return bool(predicate())
    time.sleep(POLL_SECONDS)
  return False


def _save_phase_reached(workdir: str, phase: str, complete_before: set) -> bool:
  """A save in progress has reached `phase`; or, for the msgpack phase, a save completed (its
  last instants were too short to catch)."""
  tmp = tmp_checkpoint_dirs(workdir)
  if tmp:
    try:
      names = os.listdir(os.path.join(workdir, tmp[-1]))
    except OSError:  # renamed meanwhile
      names = []
    if _SAVE_PHASE_REACHED[phase](names):
      return True
  return phase == SAVE_MSGPACK and bool(set(complete_steps(workdir)) - complete_before)


def kill_once(process: MainProcess, workdir: str, kind: str, rng, resumed_from: Optional[int],
              last_step: int, checkpoint_every: int, startup_seconds: float,
              save_phase: str = SAVE_ARRAYS, timeout: float = 900) -> Optional[KillRecord]:
  """Waits for the kill point of `kind` (for during_save: of `save_phase`), sends SIGKILL; None
  if the run finished first."""
  before = set(complete_steps(workdir))
  start_step = resumed_from or 0
  landed = ""
  if kind == KILL_STARTUP:
    # Before the first step is logged: a random point of imports, restore, compilation.
    delay = rng.uniform(STARTUP_KILL_MIN_SECONDS, max(STARTUP_KILL_MIN_SECONDS, startup_seconds))
    reached = wait_for(lambda: (time.time() - process.started >= delay
                                or process.last_logged_step is not None), process, timeout)
  elif kind == KILL_AFTER_STEP:
    target = min(last_step - 1, start_step + int(rng.integers(1, 2 * checkpoint_every + 1)))
    reached = wait_for(lambda: (process.last_logged_step or 0) >= target, process, timeout)
    if reached:
      time.sleep(rng.uniform(0.0, 0.2))
  elif kind == KILL_DURING_SAVE:
    reached = wait_for(lambda: _save_phase_reached(workdir, save_phase, before), process, timeout)
    if reached and save_phase == SAVE_ARRAYS:
      time.sleep(rng.uniform(0.0, SAVE_ARRAYS_MAX_DELAY_SECONDS))
  elif kind == KILL_AFTER_SAVE:
    reached = wait_for(lambda: bool(set(complete_steps(workdir)) - before), process, timeout)
  else:
    raise ValueError(f"unknown kill kind {kind!r}; known: {KILL_KINDS}")
  if not process.running() or not reached:
    process.kill()
    process.wait(timeout=60)
    return None if process.proc.returncode == 0 else KillRecord(
        kind, resumed_from, process.last_logged_step, "run ended before the kill point",
        max(complete_steps(workdir), default=None), tmp_checkpoint_dirs(workdir),
        time.time() - process.started)
  seconds = time.time() - process.started
  process.kill()
  process.wait(timeout=60)
  logged = process.last_logged_step
  tmp_now = tmp_checkpoint_dirs(workdir)  # what the dead process left: where the kill landed
  if tmp_now:
    landed = f"writing {tmp_now[-1].split('.')[0]} ({_tmp_contents(workdir, tmp_now[-1])})"
  else:
    new = sorted(set(complete_steps(workdir)) - before)
    if kind in (KILL_AFTER_SAVE, KILL_DURING_SAVE) and new:
      landed = f"just after checkpoint_{new[-1]} completed"
    elif logged is None or (resumed_from is not None and logged <= resumed_from):
      landed = "start-up (imports, restore, compilation)"
    else:
      landed = f"training, after step {logged}"
  return KillRecord(kind, resumed_from, logged, landed,
                    max(complete_steps(workdir), default=None), tmp_checkpoint_dirs(workdir),
                    seconds, aim=save_phase if kind == KILL_DURING_SAVE else "")


def resumed_from(process: MainProcess) -> Optional[int]:
  """The checkpoint step a run restored, from flip.train's log line (None: started fresh)."""
  match = RESUME_LINE.search(process.stderr)
  return int(match.group(2)) if match else None
