"""Images per second of the training input pipeline (`flip.data.laion.make_train_dataset`).

Runs the real pipeline (read, shuffle, parse, decode + random-resized crop + flip + resize,
tokenize, skip counting, batching) on the embedded demo set (Fashion-MNIST in img2dataset's
TFRecord layout, built if missing) for the demo config's image size and for 224 px, where the
resize dominates, and optionally on the same data re-packed as webdataset tars. It prints one line
per setting and the ratios to the first one; absolute numbers depend on the machine (printed too).
Then it times the partitioned train step of the demo config itself (same batch, synthetic
uint8 batches already on the host, state donated, all local devices) and prints the pipeline's
images/s over the step's: the margin by which one host's input keeps its step fed (goal >= 3x).

Usage: python bench/input_pipeline.py [--image_sizes 28 224] [--formats tfrecord webdataset]
                                      [--batch_size 256] [--batches 20] [--warmup 3] [--steps 10]
"""

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf

from configs import cfg_demo
from flip.data import demo
from flip.data import laion

TAR_MTIME = 1.5  # fractional, so members get PAX headers as webdataset's TarWriter writes them


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="data/demo", help="demo set (built if missing)")
  parser.add_argument("--fashion_mnist_dir", default=demo.DEFAULT_FASHION_MNIST_DIR)
  parser.add_argument("--image_sizes", type=int, nargs="+", default=[28, 224])
  parser.add_argument("--formats", nargs="+", default=["tfrecord", "webdataset"],
                      choices=["tfrecord", "webdataset"])
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--batches", type=int, default=20, help="timed batches per setting")
  parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
  parser.add_argument("--steps", type=int, default=10, help="timed train steps (0 = skip)")
  return parser.parse_args()


def webdataset_copy(train_dir: str, out_dir: str) -> str:
  """The demo's TFRecord shards re-packed as webdataset tars (KEY.jpg, KEY.txt, KEY.json)."""
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    return out_dir
  os.makedirs(out_dir, exist_ok=True)
  for name in sorted(f for f in os.listdir(train_dir) if f.endswith(".tfrecord")):
    partial = os.path.join(out_dir, name.replace(".tfrecord", ".tar.partial"))
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
      for raw in tf.data.TFRecordDataset(os.path.join(train_dir, name)):
        feature = tf.train.Example.FromString(raw.numpy()).features.feature
        key = feature["key"].bytes_list.value[0].decode()
        meta = {"key": key, "width": feature["width"].int64_list.value[0],
                "height": feature["height"].int64_list.value[0]}
        for ext, data in (("jpg", feature["jpg"].bytes_list.value[0]),
                          ("txt", feature["txt"].bytes_list.value[0]),
                          ("json", json.dumps(meta).encode())):
          info = tarfile.TarInfo(f"{key}.{ext}")
          info.size, info.mtime = len(data), TAR_MTIME
          tar.addfile(info, io.BytesIO(data))
    os.rename(partial, partial[:-len(".partial")])
  return out_dir


def pipeline_images_per_second(config, batches: int, warmup: int) -> float:
  """Images/s of one host's batches (num_shards=1), after `warmup` untimed batches."""
  iterator = iter(laion.make_train_dataset(config, shard_index=0, num_shards=1, seed=0))
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(iterator)
    batch["image"].numpy()  # materialised on the host, as the train loop does
  return batches * config.batch_size / (time.perf_counter() - start)


def train_step_images_per_second(config, steps: int) -> float:
  """Images/s the partitioned train step of `config` consumes (after one compiling step)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flip import builders  # pylint: disable=g-import-not-at-top
  from flip import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  task = builders.build_task(config)
  partitioner = builders.build_partitioner(config.partitioning)
  trainer = trainer_lib.Trainer(config, task, partitioner, trainer_lib.Progress())
  state = trainer.init_state()
  layout = trainer.data_layout
  rng = np.random.RandomState(0)
  batch = {k: rng.randint(1, 255, v.shape).astype(v.dtype)
           for k, v in task.batch_spec(config.batch_size // layout.num_shards).items()}
  state, metrics = trainer.train_step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = trainer.train_step(state, batch)
  jax.block_until_ready(metrics)
  return steps * config.batch_size / (time.perf_counter() - start)


def main():
  args = parse_args()
  paths = demo.build_demo(args.fashion_mnist_dir, args.data_dir)
  sources = {"tfrecord": paths.train_dir}
  if "webdataset" in args.formats:
    sources["webdataset"] = webdataset_copy(paths.train_dir,
                                            os.path.join(args.data_dir, "train_webdataset"))
  print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"
        f", tensorflow {tf.__version__}; batch {args.batch_size}, {args.batches} timed batches")
  print(f"{'format':<11} {'image':>5} {'images/s':>9} {'ratio':>6}")
  reference = None
  for fmt in args.formats:
    for image_size in args.image_sizes:
      config = cfg_demo.get_config()
      config.laion_path = sources[fmt]
      config.image_size = image_size
      config.batch_size = args.batch_size
      rate = pipeline_images_per_second(config, args.batches, args.warmup)
      reference = reference or rate
      print(f"{fmt:<11} {image_size:>5} {rate:>9.0f} {rate / reference:>6.2f}")
  if args.steps > 0:
    config = cfg_demo.get_config()
    config.batch_size = args.batch_size
    step_rate = train_step_images_per_second(config, args.steps)
    print(f"train step of cfg_demo ({config.image_size} px, mask ratio "
          f"{config.model.model_img.mask_ratio}): {step_rate:.0f} images/s; "
          f"pipeline / step ({args.formats[0]}, {args.image_sizes[0]} px): "
          f"{reference / step_rate:.1f}x")


if __name__ == "__main__":
  from flip import process_setup  # pylint: disable=g-import-not-at-top
  process_setup.configure_process()
  main()
