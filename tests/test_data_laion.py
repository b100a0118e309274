"""Tests for flip.data.laion on shards written by tests/laion_fixtures.py in img2dataset's layouts:
exactly the valid examples with matching skip counts (both formats, corrupt/truncated/missing
data), per-process sharding, exact resume from a restored iterator, mixture rates, filters, and
the errors that replace hangs."""

import collections
import logging
import os

import ml_collections
import numpy as np
import pytest
import seqio
import tensorflow as tf

import laion_fixtures
from flip.data import laion
from flip.data import laion_contract
from flip.data import laion_filters
from flip.data import laion_source
from flip.data import record_framing
from flip.data import text

FORMATS = ("tfrecord", "webdataset")
WRITERS = {"tfrecord": laion_fixtures.write_tfrecord_shards,
           "webdataset": laion_fixtures.write_webdataset_shards}
IMAGE_SIZE = 8
MAX_LEN = 16
# Every defect the builders know, once each, in a set of 30 samples over 3 shards.
DEFECTS = {1: "corrupt_jpeg", 2: "empty_caption", 3: "invalid_utf8", 4: "missing_image",
           5: "missing_caption", 6: "zero_byte_image", 7: "huge_caption", 8: "png",
           9: "whitespace_caption", 10: "truncated_jpeg", 11: "grey", 12: "rgba"}
# Not a multiple of the tar block or of any record size: frames straddle chunk boundaries.
SMALL_CHUNK = 777


def make_config(laion_path, batch_size=4, **extra):
  config = ml_collections.ConfigDict(dict(
      laion_path=laion_path, image_size=IMAGE_SIZE, batch_size=batch_size,
      aug=dict(area_range=(0.5, 1.0), aspect_ratio_range=(3 / 4, 4 / 3), flip=True,
               txt=dict(tokenizer="tf_bert", max_len=MAX_LEN, cls_token=False, spm_path="")),
      laion_read_chunk_bytes=SMALL_CHUNK, shuffle_buffer_size=16))
  for key, value in extra.items():
    config[key] = value
  return config


def build(directory, fmt, num=30, num_shards=3, defects=None, truncate_shard=1, salt=0,
          prefix="a photo"):
  samples = laion_fixtures.make_samples(num, DEFECTS if defects is None else defects, salt=salt,
                                 caption_prefix=prefix)
  paths = WRITERS[fmt](str(directory), samples, num_shards)
  if truncate_shard is not None:
    laion_fixtures.truncate_last_sample(paths[truncate_shard], samples)
  return samples


@pytest.fixture(scope="module", params=FORMATS)
def shards(request, tmp_path_factory):
  directory = tmp_path_factory.mktemp(request.param)
  return request.param, str(directory), build(directory, request.param)


@pytest.fixture(scope="module")
def vocab():
  return text.get_vocabulary(ml_collections.ConfigDict(dict(tokenizer="tf_bert")))


def caption_index(samples, vocab):
  """Token row -> sample, through the tokenizer (tested in test_data_text.py)."""
  captions = [s.caption_bytes.decode("utf-8") if s.expected_reason == "ok" else s.caption
              for s in samples]  # what the pipeline tokenizes (e.g. the 100 kB caption)
  rows = text.tokenize(vocab, captions, MAX_LEN).numpy()
  index = {tuple(row): s for row, s in zip(rows, samples)}
  assert len(index) == len(samples)  # captions are unique
  return index


def skip_dict(counts):
  return {name: int(counts[reason]) for name, reason in zip(laion.SKIP_REASON_NAMES,
                                                            laion.SKIP_REASONS)
          if counts[reason]}


def one_epoch(config, shard_index=0, num_shards=1, seed=0):
  examples = list(laion.make_example_dataset(config, shard_index, num_shards, seed,
                                             num_epochs=1).as_numpy_iterator())
  assert examples and examples[-1]["is_epoch_end"]
  return [e for e in examples if not e["is_epoch_end"]], examples[-1]["skipped"]


def test_yields_exactly_the_valid_examples_and_counts_skips(shards, vocab):
  fmt, directory, samples = shards
  examples, final_counts = one_epoch(make_config(directory))
  by_tokens = caption_index(samples, vocab)
  seen = [by_tokens[tuple(e["txt"])] for e in examples]
  expected_keys = sorted(s.key for s in laion_fixtures.expected_valid(samples))
  assert sorted(s.key for s in seen) == expected_keys
  assert skip_dict(final_counts) == laion_fixtures.expected_skips(samples)
  for example, sample in zip(examples, seen):
    # The image travelled with its caption: constant-colour images keep their colour.
    assert example["image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert example["image"].dtype == np.uint8
    np.testing.assert_allclose(example["image"].reshape(-1, 3).mean(0), sample.color, atol=8)
  assert fmt in FORMATS


@pytest.mark.slow  # every other test already reads with 777-byte chunks (frames straddle them)
def test_chunk_size_does_not_change_the_stream(shards):
  _, directory, _ = shards

  def keys_and_reasons(chunk):
    options = laion_source.PipelineOptions(num_epochs=1, shuffle=False, read_chunk_bytes=chunk)
    source = laion_source.LaionDataSource(directory, options)
    return [(e["key"], int(e["reason"])) for e in source.get_dataset().as_numpy_iterator()]

  reference = keys_and_reasons(laion_source.DEFAULT_READ_CHUNK_BYTES)
  assert keys_and_reasons(SMALL_CHUNK) == reference
  assert keys_and_reasons(record_framing.TAR_BLOCK) == reference


# (format, files, processes): file-level sharding, and example-level with fewer files than
# processes. The split logic does not depend on the format; the tar reader is covered once.
SHARDING_CASES = [("tfrecord", 4, 1), ("tfrecord", 4, 2), ("tfrecord", 4, 3), ("tfrecord", 4, 8),
                  ("tfrecord", 1, 3), ("webdataset", 3, 4)]


@pytest.mark.parametrize("fmt,num_files,num_shards", SHARDING_CASES)
def test_per_process_shards_are_disjoint_and_cover_everything(tmp_path, fmt, num_files,
                                                              num_shards):
  samples = build(tmp_path, fmt, num=24, num_shards=num_files,
                  defects={0: "empty_caption", 5: "corrupt_jpeg"}, truncate_shard=0)
  source = laion_source.LaionDataSource(str(tmp_path), laion_source.PipelineOptions(num_epochs=1))
  reasons, keys = collections.Counter(), []
  for shard_index in range(num_shards):
    for e in source.get_dataset(seed=3, shard_info=seqio.ShardInfo(shard_index, num_shards)
                                ).as_numpy_iterator():
      reason = laion_contract.Reason(e["reason"])
      reasons[reason] += 1
      if reason == laion_contract.Reason.OK:  # corrupt JPEGs are only found when decoding, later
        keys.append(e["key"].decode())
  assert len(keys) == len(set(keys))  # disjoint
  decodable = [s.key for s in samples if s.expected_reason == "ok" or s.defect == "corrupt_jpeg"]
  assert sorted(keys) == sorted(decodable)  # together: everything
  assert reasons[laion_contract.Reason.EPOCH_END] == num_shards
  assert reasons[laion_contract.Reason.TRUNCATED_FILE] == 1  # counted once over all processes
  assert reasons[laion_contract.Reason.EMPTY_CAPTION] == 1


def test_skip_counts_sum_over_processes(tmp_path):
  directory = tmp_path / "tfrecord"
  samples = build(directory, "tfrecord", num=30, num_shards=1, truncate_shard=0)
  total = collections.Counter()
  for shard_index in range(2):  # 1 file, 2 processes: example-level sharding
    examples, counts = one_epoch(make_config(str(directory)), shard_index, 2)
    total.update(skip_dict(counts))
    assert examples
  assert dict(total) == laion_fixtures.expected_skips(samples)


def batches(iterator, n):
  return [tf.nest.map_structure(lambda t: t.numpy(), next(iterator)) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["txt"], y["txt"])
    assert x["skipped"] == y["skipped"]


# Saved before the first epoch boundary (tfrecord) and after the second (webdataset).
@pytest.mark.parametrize("fmt,stop_after", [("tfrecord", 2), ("webdataset", 5)])
def test_resume_from_saved_iterator_is_exact(tmp_path, fmt, stop_after):
  directory = tmp_path / "data"
  samples = build(directory, fmt, num=18)  # 10 valid: an epoch ends inside the 3rd batch of 4
  config = make_config(str(directory))
  valid_per_epoch = len(laion_fixtures.expected_valid(samples))
  total = 9
  iterator = iter(laion.make_train_dataset(config, 0, 1, seed=5))
  uninterrupted = batches(iterator, stop_after)
  path = tf.train.Checkpoint(iterator=iterator).write(str(tmp_path / "ckpt"))
  uninterrupted += batches(iterator, total - stop_after)  # saving does not disturb the run
  # A fresh process rebuilds the dataset from the config and restores into a new iterator.
  restored = iter(laion.make_train_dataset(config, 0, 1, seed=5))
  tf.train.Checkpoint(iterator=restored).read(path).assert_consumed()
  assert_same_batches(batches(restored, total - stop_after), uninterrupted[stop_after:])
  # The run crossed epoch boundaries and the skip counters kept growing across them.
  assert total * 4 > 3 * valid_per_epoch
  first, last = uninterrupted[0]["skipped"], uninterrupted[-1]["skipped"]
  assert last["empty_caption"] >= 3 * laion_fixtures.expected_skips(samples)["empty_caption"]
  assert all(last[k] >= first[k] for k in first)
  # Epochs are reshuffled: the second epoch is not the first one again.
  rows = np.concatenate([b["txt"] for b in uninterrupted])
  assert not np.array_equal(rows[:valid_per_epoch], rows[valid_per_epoch:2 * valid_per_epoch])
  assert sorted(map(tuple, rows[:valid_per_epoch])) == sorted(
      map(tuple, rows[valid_per_epoch:2 * valid_per_epoch]))


@pytest.mark.slow  # ~12 s: three mixture pipelines; single-source resume is tested by default
def test_resume_of_a_mixture_is_exact(tmp_path):
  build(tmp_path / "a", "tfrecord", num=12, defects={}, truncate_shard=None, salt=1)
  build(tmp_path / "b", "webdataset", num=12, defects={2: "empty_caption"}, truncate_shard=None,
        salt=2, prefix="a picture")
  config = make_config(f"{tmp_path / 'a'},{tmp_path / 'b'}", laion_rates="1,1")
  iterator = iter(laion.make_train_dataset(config, 1, 2, seed=0))
  uninterrupted = batches(iterator, 5)
  path = tf.train.Checkpoint(iterator=iterator).write(str(tmp_path / "ckpt"))
  uninterrupted += batches(iterator, 7)
  restored = iter(laion.make_train_dataset(config, 1, 2, seed=0))
  tf.train.Checkpoint(iterator=restored).read(path).assert_consumed()
  assert_same_batches(batches(restored, 7), uninterrupted[5:])


def test_mixture_honours_rates(tmp_path):
  # Sources much larger than a few examples, so that the draws do not mostly restart epochs.
  build(tmp_path / "a", "tfrecord", num=80, num_shards=2, defects={}, truncate_shard=None, salt=1)
  build(tmp_path / "b", "webdataset", num=80, num_shards=2, defects={}, truncate_shard=None,
        salt=2)
  config = make_config(f"{tmp_path / 'a'},{tmp_path / 'b'}", laion_rates="0.25,0.75")
  ds = laion.make_example_dataset(config, 0, 1, seed=1).filter(lambda e: ~e["is_epoch_end"])
  draws = 800
  source_ids = np.array([e["source_id"] for e in ds.take(draws).as_numpy_iterator()])
  share = (source_ids == 0).mean()
  tolerance = 4 * np.sqrt(0.25 * 0.75 / draws)  # 4 binomial standard deviations
  assert abs(share - 0.25) < tolerance, share
  # Without laion_rates the rates follow the number of files per source.
  build(tmp_path / "c", "tfrecord", num=12, num_shards=3, defects={}, truncate_shard=None)
  _, rates = laion.register_tasks(make_config(f"{tmp_path / 'a'},{tmp_path / 'c'}"))
  assert rates == [2.0, 3.0]
  _, rates = laion.register_tasks(make_config(f"{tmp_path / 'a'}/00000.tfrecord,{tmp_path / 'c'}"))
  assert rates == [1.0, 3.0]


def test_train_batches_follow_the_contract(shards):
  _, directory, samples = shards
  config = make_config(directory, batch_size=8)
  ds = laion.make_train_dataset(config, 1, 2, seed=0)  # per-host batch 8 // 2
  batch = next(iter(ds))
  assert batch["image"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert batch["image"].dtype == tf.uint8
  assert batch["txt"].shape == (4, MAX_LEN) and batch["txt"].dtype == tf.int32
  assert set(batch["skipped"]) == set(laion.SKIP_REASON_NAMES)
  assert all(v.dtype == tf.int64 and v.shape == () for v in batch["skipped"].values())
  assert samples
  with pytest.raises(laion.LaionDataError, match="not divisible"):
    laion.make_train_dataset(make_config(directory, batch_size=6), 0, 4, seed=0)


def test_filter_on_extra_columns(shards, vocab):
  _, directory, samples = shards
  config = make_config(directory, laion_filter="similarity>=0.3,NSFW!=NSFW")
  examples, counts = one_epoch(config)
  by_tokens = caption_index(samples, vocab)
  kept = sorted(by_tokens[tuple(e["txt"])].key for e in examples)

  def passes(s):
    return np.float32(s.similarity) >= 0.3 and s.nsfw != "NSFW"

  valid = laion_fixtures.expected_valid(samples)
  assert kept == sorted(s.key for s in valid if passes(s))
  # The filter runs before decoding, so it also sees the (still undetected) corrupt JPEGs.
  filterable = valid + [s for s in samples if s.defect in ("corrupt_jpeg", "truncated_jpeg")
                        and not s.lost_to_truncation]
  assert skip_dict(counts).get("filtered", 0) == sum(not passes(s) for s in filterable)
  with pytest.raises(laion.LaionDataError, match="strings support only"):
    laion_filters.parse_filter("NSFW>=UNLIKELY")
  with pytest.raises(laion.LaionDataError, match="cannot parse"):
    laion_filters.parse_filter("similarity")


def test_long_member_names_in_pax_headers(tmp_path):
  samples = laion_fixtures.make_samples(6)
  laion_fixtures.write_webdataset_shards(str(tmp_path), samples, 2, long_name_keys=True)
  options = laion_source.PipelineOptions(num_epochs=1, read_chunk_bytes=SMALL_CHUNK)
  source = laion_source.LaionDataSource(str(tmp_path), options)
  keys = sorted(e["key"].decode() for e in source.get_dataset().as_numpy_iterator()
                if e["reason"] == laion_contract.Reason.OK)
  assert keys == sorted("d" * 120 + "/" + s.key for s in samples)


def test_bad_records_unreadable_and_corrupt_files_are_counted(tmp_path, caplog):
  directory = tmp_path / "data"
  samples = build(directory, "tfrecord", num=12, defects={}, truncate_shard=None)
  with tf.io.TFRecordWriter(str(directory / "00003.tfrecord")) as writer:
    writer.write(b"\xff\xfe this is not a tf.train.Example")
    extra = laion_fixtures.make_samples(1, salt=9, caption_prefix="extra")[0]
    writer.write(laion_fixtures.tf_example(extra))
  os.mkdir(directory / "00004.tfrecord")  # matches the pattern but cannot be opened as a file
  with caplog.at_level(logging.WARNING):
    examples, counts = one_epoch(make_config(str(directory)))
  assert skip_dict(counts) == {"bad_record": 1, "unreadable_file": 1}
  assert len(examples) == len(samples) + 1
  assert "00004.tfrecord" in caplog.text
  # A tar whose member header is overwritten by garbage: the samples before it survive.
  tar_dir = tmp_path / "tar"
  tar_samples = build(tar_dir, "webdataset", num=8, num_shards=1, defects={}, truncate_shard=None)
  path = tar_dir / "00000.tar"
  data = bytearray(path.read_bytes())
  data[len(data) // 2:len(data) // 2 + 2048] = b"\x07" * 2048
  path.write_bytes(bytes(data))
  examples, counts = one_epoch(make_config(str(tar_dir)))
  assert skip_dict(counts).get("truncated_file") == 1
  assert 0 < len(examples) < len(tar_samples)


def test_no_valid_example_raises_instead_of_hanging(tmp_path):
  bad = tmp_path / "bad"
  build(bad, "tfrecord", num=4, num_shards=1, defects={i: "empty_caption" for i in range(4)},
        truncate_shard=None)
  with pytest.raises(tf.errors.InvalidArgumentError, match="produced no valid example"):
    next(iter(laion.make_train_dataset(make_config(str(bad)), 0, 1, seed=0)))
  # Two valid examples for eight processes: the processes without any say so.
  few = tmp_path / "few"
  build(few, "webdataset", num=2, num_shards=1, defects={}, truncate_shard=None)
  config = make_config(str(few), batch_size=8)
  with pytest.raises(tf.errors.InvalidArgumentError, match="shard 5 of 8: epoch"):
    next(iter(laion.make_train_dataset(config, 5, 8, seed=0)))


def test_paths_patterns_and_errors(tmp_path):
  build(tmp_path / "t", "tfrecord", num=6, num_shards=2, defects={}, truncate_shard=None)
  build(tmp_path / "w", "webdataset", num=6, num_shards=2, defects={}, truncate_shard=None)
  files, fmt = laion_source.list_files(str(tmp_path / "t" / "*.tfrecord"))
  assert fmt == "tfrecord" and [os.path.basename(f) for f in files] == ["00000.tfrecord",
                                                                        "00001.tfrecord"]
  files, fmt = laion_source.list_files(str(tmp_path / "w"))  # stats json files are ignored
  assert fmt == "webdataset" and len(files) == 2
  with pytest.raises(laion.LaionDataError, match="laion_path is empty"):
    laion.split_sources(" , ")
  with pytest.raises(laion.LaionDataError, match="no \\*.tfrecord or \\*.tar files"):
    laion_source.list_files(str(tmp_path / "nothing*"))
  (tmp_path / "w" / "00009.tfrecord").write_bytes(b"")
  with pytest.raises(laion.LaionDataError, match="mixes tfrecord and tar"):
    laion_source.list_files(str(tmp_path / "w"))
  with pytest.raises(laion.LaionDataError, match="need 2 non-negative rates"):
    laion.register_tasks(make_config(f"{tmp_path / 't'},{tmp_path / 't'}/*", laion_rates="1"))
