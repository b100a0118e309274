"""LAION training input: img2dataset shards as seqio Tasks/Mixtures, per-host sharding, skip counts,
exact resume.

This module owns the entry points from `config.laion_path` to per-host batches:

    make_train_dataset(config, shard_index, num_shards, seed) -> tf.data.Dataset of
      {"image": uint8 [b, S, S, 3], "txt": int32 [b, max_len], "skipped": {reason: int64 scalar}}

with b = config.batch_size // num_shards and "skipped" the cumulative counts since the start of
training (they are part of the iterator state, so they survive a restore).

Sources. `config.laion_path` is a comma-separated list; each entry (a directory, a glob pattern or
a file) is one source, registered as one seqio Task. Several sources form a seqio Mixture with
rates `config.laion_rates` (comma-separated, one per source) or, by default, rates proportional to
their numbers of files (img2dataset shards hold equally many samples, so the mixture then behaves
like the union).

The parts, in pipeline order:
- `flip.data.laion_contract`: img2dataset's columns and formats, the skip reasons, LaionDataError;
- `flip.data.laion_source`: one entry as a seqio DataSource (files, sharding, per-epoch shuffles,
  parsing and validation);
- `flip.data.record_framing`: the chunked TFRecord / tar reader under it (tf.data ops only);
- `flip.data.laion_filters`: the `config.laion_filter` language;
- `flip.data.laion_preprocessors`: decode + augment + tokenize, skip accounting.

Bad records never stop training: every skipped example is counted under its reason, and an epoch
without a single valid example on a host raises an error naming the source and shard.

Checkpointing. The result is deterministic and contains only checkpointable datasets; saving
`tf.train.Checkpoint(iterator=iter(ds))` stores the read positions, scan states, shuffle and
prefetch buffers, so a restored iterator yields exactly the batches of the uninterrupted one. The
checkpoint grows with `shuffle_buffer_size` times the mean encoded example size, plus the decoded
batches waiting in prefetch buffers.

Optional config keys: laion_rates (here), laion_filter, shuffle_buffer_size, laion_cycle_length,
laion_read_chunk_bytes (`flip.data.laion_source.PipelineOptions`).
"""

from typing import List, Optional, Sequence, Tuple

import ml_collections
import seqio
import tensorflow as tf

from flip.data import checkpointable
from flip.data import laion_preprocessors
from flip.data import text
from flip.data.laion_contract import graph
from flip.data.laion_contract import LaionDataError
from flip.data.laion_contract import SKIP_REASON_NAMES
from flip.data.laion_contract import SKIP_REASONS
from flip.data.laion_contract import stable_hash
from flip.data.laion_source import LaionDataSource
from flip.data.laion_source import PipelineOptions
from flip.data.laion_source import TRAIN_SPLIT

PASSTHROUGH_FEATURES = ("skipped", "is_epoch_end", "source_id")


def split_sources(laion_path: str) -> List[str]:
  """The comma-separated entries of config.laion_path (each one source)."""
  entries = [e.strip() for e in (laion_path or "").split(",") if e.strip()]
  if not entries:
    raise LaionDataError("config.laion_path is empty: set it to an img2dataset output directory, "
                         "a glob pattern or a comma-separated list of them")
  return entries


def _task_name(entry: str, config: ml_collections.ConfigDict, shard_index: int, num_shards: int,
               seed: int) -> str:
  fingerprint = stable_hash(entry, config.to_json_best_effort(sort_keys=True), shard_index,
                            num_shards, seed)
  return f"flip_laion_{fingerprint:08x}"


def _parse_rates(config: ml_collections.ConfigDict, sources: Sequence[LaionDataSource]
                 ) -> List[float]:
  spec = str(config.get("laion_rates", "") or "")
  if not spec:
    return [float(len(s.files)) for s in sources]
  try:
    rates = [float(r) for r in spec.split(",")]
  except ValueError:
    raise LaionDataError(f"config.laion_rates={spec!r} is not a comma-separated list of numbers"
                         ) from None
  if len(rates) != len(sources) or any(r < 0 for r in rates) or sum(rates) <= 0:
    raise LaionDataError(f"config.laion_rates={spec!r}: need {len(sources)} non-negative rates "
                         "(one per config.laion_path entry), not all zero")
  return rates


def register_tasks(config: ml_collections.ConfigDict, shard_index: int = 0, num_shards: int = 1,
                   seed: int = 0, **option_overrides) -> Tuple[List[str], List[float]]:
  """Registers one seqio Task per config.laion_path entry; returns (task names, mixing rates).

  Tasks are registered for one host layout (their preprocessors count skips for it). Re-registering
  the same config replaces the previous Tasks.
  """
  options = PipelineOptions.from_config(config, **option_overrides)
  vocab = text.get_vocabulary(config.aug.txt)
  output_features = {
      "image": seqio.ContinuousFeature(dtype=tf.uint8, rank=3),
      "txt": seqio.Feature(vocabulary=vocab, add_eos=False, dtype=tf.int32, rank=1),
  }
  entries = split_sources(config.laion_path)
  names, sources = [], []
  for source_id, entry in enumerate(entries):
    name = _task_name(entry, config, shard_index, num_shards, seed)
    source = LaionDataSource(entry, options, name=f"{source_id}:{entry}")
    _, unreadable = source.probed_files(shard_index, num_shards)
    augment_seed = stable_hash(seed, source.name, shard_index, "aug")
    preprocessors = [
        laion_preprocessors.decode_and_tokenize(config, vocab, augment_seed),
        laion_preprocessors.count_and_drop(source_id, entry, shard_index, num_shards, unreadable),
    ]
    if name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add_provider(name, seqio.Task(
        name, source=source, output_features=output_features, preprocessors=preprocessors,
        shuffle_buffer_size=None))
    names.append(name)
    sources.append(source)
  return names, _parse_rates(config, sources)


def make_example_dataset(config: ml_collections.ConfigDict, shard_index: int, num_shards: int,
                         seed: int, num_epochs: Optional[int] = None,
                         shuffle: bool = True) -> tf.data.Dataset:
  """Per-example stream before batching: {"image", "txt", "skipped": int64 [NUM_REASONS] totals
  over all sources, "is_epoch_end" (markers closing each source's epochs; their counts are the
  totals at that point), "source_id"}."""
  names, rates = register_tasks(config, shard_index, num_shards, seed, num_epochs=num_epochs,
                                shuffle=shuffle)
  sequence_length = {"txt": int(config.aug.txt.max_len)}
  shard_info = seqio.ShardInfo(index=shard_index, num_shards=num_shards)
  common = dict(sequence_length=sequence_length, split=TRAIN_SPLIT, shuffle=shuffle, seed=seed,
                shard_info=shard_info, num_epochs=1)
  ds = laion_preprocessors.task_or_mixture_dataset("flip_laion_mix", names, rates,
                                                   PASSTHROUGH_FEATURES, **common)
  return ds.with_options(checkpointable.options())


def make_train_dataset(config: ml_collections.ConfigDict, shard_index: int, num_shards: int,
                       seed: int, num_epochs: Optional[int] = None) -> tf.data.Dataset:
  """Per-host training batches {"image": uint8 [b,S,S,3], "txt": int32 [b,L], "skipped": {...}}.

  b = config.batch_size // num_shards (drop_remainder); `shard_index`, `num_shards` come from the
  partitioner's data layout. Repeats forever unless `num_epochs` is given.
  """
  if config.batch_size % num_shards:
    raise LaionDataError(f"config.batch_size={config.batch_size} is not divisible by the "
                         f"{num_shards} input shards")
  batch_size = config.batch_size // num_shards
  ds = make_example_dataset(config, shard_index, num_shards, seed, num_epochs=num_epochs)
  ds = ds.filter(graph(lambda ex: ~ex["is_epoch_end"]))
  ds = ds.map(graph(lambda ex: {"image": ex["image"], "txt": ex["txt"],
                               "skipped": ex["skipped"]}))
  ds = ds.batch(batch_size, drop_remainder=True)

  def to_contract(batch):
    last = batch["skipped"][-1]
    return {"image": batch["image"], "txt": batch["txt"],
            "skipped": {name: last[reason] for name, reason in zip(SKIP_REASON_NAMES,
                                                                   SKIP_REASONS)}}

  ds = ds.map(graph(to_contract)).prefetch(checkpointable.PREFETCH_BATCHES)
  return ds.with_options(checkpointable.options())
