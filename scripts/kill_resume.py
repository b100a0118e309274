"""Kill -9 anywhere: SIGKILL a demo training run again and again, resume it each time, and compare
it with an uninterrupted run of the same command line.

    .venv/bin/python scripts/kill_resume.py                 # 10 kills, 40 steps, ~8 min on 2 cores
    .venv/bin/python scripts/kill_resume.py --kills=20 --steps=60 --out_dir=/tmp/kills

What it runs: main.py with the demo config at smoke size (`configs/cfg_demo.py:smoke`: the real
two-tower model, 32-px images, batch 16) on a 512-image slice of the Fashion-MNIST demo set it
builds (or `--data_dir`), logging every step and checkpointing every `--checkpoint_every` steps.
First an uninterrupted reference run, then the same command in another workdir, killed with
SIGKILL `--kills` times at points drawn from a seeded generator and cycling through four kinds:
  during_save   while a `checkpoint_<step>.tmp-*` directory is being written, aiming in turn at
                the arrays (a random delay into them), the input-iterator state and the msgpack
                file (its rename follows within microseconds: that kill often lands just after);
  after_step    once a random step after the resume point is logged;
  startup       a random delay after the process starts, before its first step is logged
                (imports, restore, compilation);
  after_save    as soon as a new checkpoint is complete (pruning old checkpoints, next step);
and restarted after each kill (resuming from the workdir), finally left to finish.

What it checks, and prints as a table: where every kill landed and which checkpoint the next
attempt resumed from (it must be the newest complete one: a half-written checkpoint is never
used); the loss of every logged step of every attempt equals the reference's exactly (float32 as
written to the tensorboard events; every step 1..N is covered); the final checkpoint's arrays
(parameters, Adam moments and counts, step) are bitwise equal to the reference's. Exit status 0
when all holds and all `--kills` kills landed before the run could finish, 1 otherwise.

jax's persistent compilation cache (in `--out_dir`) is on by default so restarts load the compiled
step: the reference run compiles it, every later attempt loads the same executable.
"""

import argparse
import collections
import dataclasses
import os
import shutil
import sys
import time
from typing import Dict, List, Optional

import numpy as np

import reliability_harness as harness

DEFAULT_NUM_TRAIN = 512  # demo slice: images
DEFAULT_NUM_TEST = 64
DEFAULT_TRAIN_SHARDS = 4


@dataclasses.dataclass
class Outcome:
  """What the comparison found."""
  kills_requested: int
  kills: List[harness.KillRecord]
  resume_checks: List[Optional[bool]]  # per kill: next attempt resumed from the newest complete
  steps_compared: int
  losses_compared: int
  max_loss_diff: float
  steps_missing: List[int]
  arrays_compared: int
  unequal_arrays: List[str]
  reference_seconds: float
  killed_seconds: float

  @property
  def ok(self) -> bool:
    return (len(self.kills) == self.kills_requested and not self.steps_missing
            and self.max_loss_diff == 0.0 and not self.unequal_arrays
            and all(c is not False for c in self.resume_checks) and self.arrays_compared > 0)


def build_data(out_dir: str) -> str:
  from flip.data import demo  # pylint: disable=g-import-not-at-top
  paths = demo.build_demo(out_dir=os.path.join(out_dir, "data"), num_train=DEFAULT_NUM_TRAIN,
                          num_test=DEFAULT_NUM_TEST, train_shards=DEFAULT_TRAIN_SHARDS)
  return paths.train_dir


def run(out_dir: str, train_dir: str, kills: int, steps: int, checkpoint_every: int, seed: int,
        devices: int = 1, compilation_cache: bool = True, log=print) -> Outcome:
  """Reference run, killed run, comparison. Workdirs `<out_dir>/reference` and `<out_dir>/killed`
  are replaced."""
  rng = np.random.default_rng(seed)
  env = harness.subprocess_env(
      devices, os.path.join(out_dir, "jax_cache") if compilation_cache else None)
  ref_dir, killed_dir = os.path.join(out_dir, "reference"), os.path.join(out_dir, "killed")
  logs = os.path.join(out_dir, "logs")
  for d in (ref_dir, killed_dir, logs):
    shutil.rmtree(d, ignore_errors=True)
  os.makedirs(logs)

  t0 = time.time()
  reference = harness.run_main(harness.demo_args(ref_dir, train_dir, steps, checkpoint_every),
                               env, os.path.join(logs, "reference.stderr"))
  if reference.proc.returncode != 0:
    raise RuntimeError(f"the reference run failed ({reference.proc.returncode}); see "
                       f"{reference.stderr_path}")
  reference_seconds = time.time() - t0
  # Start-up kills are drawn within the time a restart takes to its first step: the reference's
  # until a restart (compiled step loaded from the cache) has been timed.
  startup = reference.first_step_seconds or 10.0
  log(f"reference: {steps} steps in {reference_seconds:.0f} s (first step after {startup:.0f} s)")

  args = harness.demo_args(killed_dir, train_dir, steps, checkpoint_every)
  records: List[harness.KillRecord] = []
  resume_checks: List[Optional[bool]] = []
  t0 = time.time()
  attempt = 0
  while True:
    expected_resume = max(harness.complete_steps(killed_dir), default=None)
    process = harness.MainProcess(args, env, os.path.join(logs, f"attempt_{attempt:02d}.stderr"))
    if len(records) < kills:
      kind = harness.KILL_KINDS[len(records) % len(harness.KILL_KINDS)]
      save_kills = sum(r.kind == harness.KILL_DURING_SAVE for r in records)
      phase = harness.SAVE_PHASES[save_kills % len(harness.SAVE_PHASES)]
      record = harness.kill_once(process, killed_dir, kind, rng, expected_resume, steps,
                                 checkpoint_every, startup, save_phase=phase)
    else:
      process.wait(timeout=1800)
      record = None
    if process.first_step_seconds is not None:
      startup = process.first_step_seconds
    actual_resume = harness.resumed_from(process)
    if resume_checks:  # the previous kill's aftermath: did this attempt resume correctly?
      resume_checks[-1] = (None if actual_resume is None and expected_resume is not None
                           else actual_resume == expected_resume)
    if record is None:
      if process.proc.returncode != 0:
        raise RuntimeError(f"attempt {attempt} failed ({process.proc.returncode}); see "
                           f"{process.stderr_path}")
      break
    records.append(record)
    resume_checks.append(None)
    log(f"kill {len(records):2d} ({record.kind}): {record.landed}; newest complete checkpoint "
        f"{record.complete_after}")
    attempt += 1
  killed_seconds = time.time() - t0

  ref_losses = {step: value for _, step, value in harness.logged_scalars(ref_dir, "loss")}
  killed_losses = harness.logged_scalars(killed_dir, "loss")
  diffs = [abs(value - ref_losses[step]) for _, step, value in killed_losses]
  covered = {step for _, step, _ in killed_losses}
  missing = sorted(set(range(1, steps + 1)) - covered)
  arrays, unequal = harness.compare_checkpoints(os.path.join(ref_dir, f"checkpoint_{steps}"),
                                                os.path.join(killed_dir, f"checkpoint_{steps}"))
  return Outcome(kills, records, resume_checks, len(covered), len(killed_losses),
                 max(diffs, default=float("nan")), missing, arrays, unequal, reference_seconds,
                 killed_seconds)


def summary_table(outcome: Outcome) -> str:
  rows = [("#", "kind", "resumed from", "last step", "landed", "newest complete after",
           "tmp dirs left", "next resume ok")]
  for i, (record, check) in enumerate(zip(outcome.kills, outcome.resume_checks), start=1):
    kind = f"{record.kind} ({record.aim})" if record.aim else record.kind
    rows.append((str(i), kind, str(record.resumed_from), str(record.last_logged_step),
                 record.landed, str(record.complete_after), str(len(record.tmp_left)),
                 {True: "yes", False: "NO", None: "n/a"}[check]))
  widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  by_kind = collections.Counter(r.kind for r in outcome.kills)
  during_save = sum(1 for r in outcome.kills if r.tmp_left)
  lines += [
      "",
      "kills by kind:         " + ", ".join(f"{k} {by_kind[k]}" for k in harness.KILL_KINDS),
      f"kills inside a save:   {during_save} (a checkpoint_<step>.tmp-* directory left behind; "
      "never restored, removed at the next start)",
      "resumed from:          " + ", ".join(
          "fresh" if r.resumed_from is None else f"checkpoint_{r.resumed_from}"
          for r in outcome.kills) + " (the attempt each kill hit)",
      f"kills survived:        {len(outcome.kills)} of {outcome.kills_requested} requested"
      + ("" if len(outcome.kills) == outcome.kills_requested else
         " (the run finished first: more --steps)"),
      f"steps compared:        {outcome.steps_compared} (missing: {outcome.steps_missing or 'none'})",
      f"logged losses compared: {outcome.losses_compared} (re-run steps included)",
      f"max loss difference:   {outcome.max_loss_diff}",
      f"final state bitwise equal: {not outcome.unequal_arrays} "
      f"({outcome.arrays_compared} arrays: params, optimizer state, step)"
      + (f"; unequal: {outcome.unequal_arrays[:5]}" if outcome.unequal_arrays else ""),
      f"time: reference {outcome.reference_seconds:.0f} s, killed runs {outcome.killed_seconds:.0f} s",
      "(next resume ok: the attempt after the kill restored the newest complete checkpoint; "
      "n/a: that attempt was itself killed before it logged its restore)",
      f"RESULT: {'PASS' if outcome.ok else 'FAIL'}",
  ]
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--kills", type=int, default=10, help="SIGKILLs before the run may finish")
  parser.add_argument("--steps", type=int, default=40, help="training steps of the run")
  parser.add_argument("--checkpoint_every", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0, help="seed of the kill points")
  parser.add_argument("--out_dir", default="/tmp/flip_kill_resume")
  parser.add_argument("--data_dir", default="",
                      help="LAION-layout training shards (default: build a demo slice)")
  parser.add_argument("--devices", type=int, default=1, help="simulated CPU devices per run")
  parser.add_argument("--no_compilation_cache", action="store_true")
  args = parser.parse_args(argv)
  os.makedirs(args.out_dir, exist_ok=True)
  train_dir = args.data_dir or build_data(args.out_dir)
  outcome = run(args.out_dir, train_dir, args.kills, args.steps, args.checkpoint_every, args.seed,
                args.devices, not args.no_compilation_cache)
  print(summary_table(outcome))
  return 0 if outcome.ok else 1


if __name__ == "__main__":
  sys.exit(main())
