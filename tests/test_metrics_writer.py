"""flip.metrics_writer: tensorboard events with the scalars and images, nothing logged on the
console, nothing written on processes other than 0.

References: the events file read back with TensorFlow's own event parser; absl's log records
captured by a handler on its logger, with clu's `create_default_writer` as the control that the
capture sees what a LoggingWriter logs.
"""

import glob
import logging

from absl import logging as absl_logging
from clu import metric_writers
import jax
import numpy as np
import pytest
import tensorflow as tf

from flip import metrics_writer


class _Records(logging.Handler):

  def __init__(self):
    super().__init__(level=logging.DEBUG)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture
def absl_records():
  handler = _Records()
  logger = absl_logging.get_absl_logger()
  old_level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.DEBUG)
  yield handler.messages
  logger.removeHandler(handler)
  logger.setLevel(old_level)


def _write(writer):
  writer.write_scalars(7, {"loss": 0.25, "acc_i2t": 0.75})
  writer.write_images(7, {"grid": np.full((1, 4, 4, 3), 200, np.uint8)})
  writer.flush()
  writer.close()


def _events(logdir):
  found = {}
  for path in glob.glob(f"{logdir}/events.out.tfevents.*"):
    for raw in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(raw.numpy())
      for value in event.summary.value:
        found[(event.step, value.tag)] = value
  return found


@pytest.mark.parametrize("asynchronous", [True, False])
def test_events_written_and_nothing_logged(tmp_path, absl_records, asynchronous):
  _write(metrics_writer.make_metric_writer(str(tmp_path), asynchronous=asynchronous))
  events = _events(str(tmp_path))
  assert tf.make_ndarray(events[(7, "loss")].tensor) == pytest.approx(0.25)
  assert tf.make_ndarray(events[(7, "acc_i2t")].tensor) == pytest.approx(0.75)
  image = events[(7, "grid")].tensor  # width, height, then the encoded PNG
  assert tf.image.decode_png(image.string_val[2]).numpy().mean() == 200
  assert not [m for m in absl_records if "loss" in m or "acc_i2t" in m], absl_records


def test_the_capture_sees_clus_logging_writer(tmp_path, absl_records):
  _write(metric_writers.create_default_writer(str(tmp_path), asynchronous=False))
  assert [m for m in absl_records if "loss" in m], absl_records


def test_other_processes_write_nothing(tmp_path, absl_records, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda *args, **kwargs: 1)
  _write(metrics_writer.make_metric_writer(str(tmp_path)))
  assert list(tmp_path.iterdir()) == []
  assert not [m for m in absl_records if "loss" in m], absl_records
