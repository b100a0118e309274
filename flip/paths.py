"""The filesystem layer: every path FLIP reads or writes for the user, local or on object storage.

Workdirs, checkpoints and their sidecars, `pretrain_dir`, tensorboard events, data and evaluation
files, reconstruction PNGs may be local paths or URLs of any filesystem TensorFlow's `tf.io.gfile`
knows (`gs://bucket/dir` on Google Cloud Storage). t5x writes its checkpoint directories through
the same `tf.io.gfile` and its arrays through tensorstore, so a run reads and writes every path
with the clients that its checkpointer already uses.

Local paths behave as with `os` / `shutil` (the same results, the same `OSError`s). Errors of a
remote filesystem (`tf.errors.OpError`) are raised as `OSError` with the filesystem's own message
in one line, so callers handle one exception type for both.
"""

import contextlib
import errno
import os
import posixpath
import re
import shutil
from typing import IO, Iterator, List

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_URL_ROOT = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*")
# tf.errors codes -> the errno an equivalent local failure would carry.
_ERRNO_OF_TF_ERROR = {
    "NotFoundError": errno.ENOENT,
    "PermissionDeniedError": errno.EACCES,
    "AlreadyExistsError": errno.EEXIST,
    "FailedPreconditionError": errno.EIO,
    "ResourceExhaustedError": errno.ENOSPC,
}


def is_remote(path: str) -> bool:
  """True for a URL (`gs://…`), False for a local path."""
  return bool(_URL.match(os.fspath(path)))


def join(path: str, *parts: str) -> str:
  path = os.fspath(path)
  return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def basename(path: str) -> str:
  path = os.fspath(path).rstrip("/") if is_remote(path) else os.fspath(path)
  return posixpath.basename(path) if is_remote(path) else os.path.basename(path)


def dirname(path: str) -> str:
  """The parent directory; an absolute one for a local path."""
  path = os.fspath(path)
  if is_remote(path):
    return posixpath.dirname(path.rstrip("/"))
  return os.path.dirname(os.path.abspath(path))


def _tf():
  """TensorFlow, imported on the first remote path (importing flip loads no TensorFlow)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


def _os_error(err, path: str) -> OSError:
  message = " ".join(str(err.message).split())
  return OSError(_ERRNO_OF_TF_ERROR.get(type(err).__name__, errno.EIO), message, path)


@contextlib.contextmanager
def _as_os_errors(path: str) -> Iterator[None]:
  try:
    yield
  except _tf().errors.OpError as err:
    raise _os_error(err, path) from None


def exists(path: str) -> bool:
  if not is_remote(path):
    return os.path.exists(path)
  with _as_os_errors(path):
    return _tf().io.gfile.exists(path)


def isdir(path: str) -> bool:
  if not is_remote(path):
    return os.path.isdir(path)
  with _as_os_errors(path):
    return _tf().io.gfile.isdir(path)


def listdir(path: str) -> List[str]:
  """Entry names of a directory (without a trailing `/`), in the filesystem's order."""
  if not is_remote(path):
    return os.listdir(path)
  with _as_os_errors(path):
    return [name.rstrip("/") for name in _tf().io.gfile.listdir(path)]


def glob(pattern: str) -> List[str]:
  with _as_os_errors(pattern):
    return _tf().io.gfile.glob(pattern)


def getsize(path: str) -> int:
  if not is_remote(path):
    return os.path.getsize(path)
  with _as_os_errors(path):
    return _tf().io.gfile.stat(path).length


def makedirs(path: str) -> None:
  """Creates `path` and its parents; an existing directory is fine."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)
    return
  root = _URL_ROOT.match(path).group(0)  # gs://bucket
  with _as_os_errors(path):
    # TensorFlow's recursive create never returns when the bucket does not exist.
    if not _tf().io.gfile.isdir(root):
      raise OSError(errno.ENOENT, f"{root} does not exist or is not accessible", path)
    _tf().io.gfile.makedirs(path)


def remove(path: str) -> None:
  if not is_remote(path):
    os.remove(path)
    return
  with _as_os_errors(path):
    _tf().io.gfile.remove(path)


def rmtree(path: str) -> None:
  """Deletes a directory and everything under it."""
  if not is_remote(path):
    shutil.rmtree(path)
    return
  with _as_os_errors(path):
    _tf().io.gfile.rmtree(path)


def replace(src: str, dst: str) -> None:
  """Renames a file to `dst`, overwriting it (atomic on a local filesystem)."""
  if not is_remote(src) and not is_remote(dst):
    os.replace(src, dst)
    return
  with _as_os_errors(src):
    _tf().io.gfile.rename(src, dst, overwrite=True)


def open_file(path: str, mode: str = "r") -> IO:
  """`open(path, mode)` for a local path, a `_tf().io.gfile.GFile` for a URL."""
  if not is_remote(path):
    return open(path, mode)  # pylint: disable=unspecified-encoding
  with _as_os_errors(path):
    return _tf().io.gfile.GFile(path, mode)


def read_bytes(path: str) -> bytes:
  with _as_os_errors(path), open_file(path, "rb") as f:
    return f.read()


def write_bytes(path: str, data: bytes) -> None:
  with _as_os_errors(path), open_file(path, "wb") as f:
    f.write(data)
