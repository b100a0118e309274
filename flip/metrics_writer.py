"""The metric writer of training and evaluation: tensorboard events only, on process 0.

clu's `create_default_writer` pairs the tensorboard writer with a `LoggingWriter`, which logs every
write again through absl at INFO; on the console that repeats the loop's own progress line and,
written from the asynchronous writer's thread, lands in the middle of it. The loop prints one line
per log step itself, so `make_metric_writer` keeps only the events: on process 0 a clu
`SummaryWriter` on `workdir` (wrapped in clu's `AsyncMultiWriter` when `asynchronous`), on the
other processes a writer that writes nothing.
"""

from clu import metric_writers
import jax


def make_metric_writer(workdir: str, asynchronous: bool = True) -> metric_writers.MetricWriter:
  """Tensorboard events in `workdir` on process 0, nothing elsewhere; no console logging."""
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  writers = [metric_writers.SummaryWriter(workdir)]
  if asynchronous:
    return metric_writers.AsyncMultiWriter(writers)
  return metric_writers.MultiWriter(writers)
