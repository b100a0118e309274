"""open_clip's CLIP BPE tokenizer behind seqio's `Vocabulary` interface (`tokenizer=open_clip`).

`OpenClipVocabulary` wraps `open_clip.tokenizer.SimpleTokenizer` itself (its BPE merges file ships
inside the open_clip package: nothing is downloaded), so an imported open_clip model is evaluated
and tuned with the tokenizer it was trained with:
* `encode("a dog")` -> [49406 (start of text), BPE ids..., 49407 (end of text)]: the sequence
  open_clip builds before padding (text cleaned as SimpleTokenizer's default, `clean="lower"`:
  ftfy, html unescape, whitespace collapsed, lower-cased);
* `tokenize_tf(strings, max_len)` -> int32 [N, max_len], zero-padded; a sequence longer than
  max_len is cut to max_len and its last id replaced by end of text, exactly as
  `open_clip.get_tokenizer(<model>)(texts, context_length=max_len)` does.
  `flip.data.text.tokenize` routes this vocabulary here, so the input pipeline and the zero-shot
  evaluator both produce open_clip's tokens;
* `decode` drops padding and the two special tokens.
The TensorFlow functions run the Python tokenizer through `tf.numpy_function` (CPU, host side).

open_clip is imported when the vocabulary is built (so a missing package is reported before any
parameter is read), never at module import; without it the error is a one-line `ConfigError`
saying to install the `openclip` extra. open_clip's package `__init__` imports torchvision, which
the tokenizer does not use; when that import fails with a RuntimeError (a torchvision build that
does not match the installed torch: the registries serve only CUDA torchvision wheels for CPU
torch 2.13), open_clip's `tokenizer.py` is loaded from the package folder on its own (it imports
torch, ftfy and regex only) and the same `SimpleTokenizer` class is used.
"""

import functools
import importlib.util
import os
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import seqio
import tensorflow as tf

from flip import config as config_lib

PAD_ID = 0  # open_clip pads with zeros
INSTALL_HINT = "pip install '.[openclip]'"


class OpenClipUnavailable(config_lib.ConfigError):
  """open_clip cannot be imported; one line saying what to install."""


def _tokenizer_module_alone(import_error: BaseException) -> Any:
  """open_clip's tokenizer.py executed on its own, without the package `__init__`."""
  spec = importlib.util.find_spec("open_clip")
  path = os.path.join(list(spec.submodule_search_locations or [""])[0], "tokenizer.py")
  if not os.path.isfile(path):
    raise OpenClipUnavailable(f"config.aug.txt.tokenizer='open_clip': importing open_clip failed "
                              f"({' '.join(str(import_error).split())}) and {path} is missing")
  module_spec = importlib.util.spec_from_file_location("flip_open_clip_tokenizer", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


@functools.lru_cache(maxsize=None)
def _simple_tokenizer() -> Any:
  """open_clip's SimpleTokenizer on the BPE file inside the open_clip package (cached)."""
  if importlib.util.find_spec("open_clip") is None:
    raise OpenClipUnavailable(f"config.aug.txt.tokenizer='open_clip' needs the open_clip package: "
                              f"install the openclip extra ({INSTALL_HINT})")
  try:
    from open_clip import tokenizer as oc_tokenizer  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise OpenClipUnavailable(
        f"config.aug.txt.tokenizer='open_clip': importing open_clip failed ({err}); install the "
        f"openclip extra: {INSTALL_HINT}") from None
  except RuntimeError as err:  # torchvision not matching torch: see the module docstring
    oc_tokenizer = _tokenizer_module_alone(err)
  return oc_tokenizer.SimpleTokenizer()


class OpenClipVocabulary(seqio.Vocabulary):
  """CLIP's BPE (open_clip's SimpleTokenizer): start/end-of-text around every text, pad 0."""

  def __init__(self):
    super().__init__(extra_ids=0)
    _simple_tokenizer()  # a missing open_clip is reported now, not at the first text

  @property
  def tokenizer(self) -> Any:
    return _simple_tokenizer()

  def __eq__(self, other):
    return isinstance(other, OpenClipVocabulary)

  def __hash__(self):
    return hash(OpenClipVocabulary)

  def __str__(self):
    return "OpenClipVocabulary(open_clip SimpleTokenizer, clean='lower')"

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def bos_id(self) -> Optional[int]:
    return self.tokenizer.sot_token_id

  @property
  def eos_id(self) -> Optional[int]:
    return self.tokenizer.eot_token_id

  @property
  def unk_id(self) -> Optional[int]:
    return None  # byte-level BPE: every string has a tokenisation

  @property
  def _base_vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  # --- Python ---------------------------------------------------------------------------------
  def _encode(self, s: str) -> List[int]:
    tok = self.tokenizer
    return [tok.sot_token_id] + tok.encode(s) + [tok.eot_token_id]

  def _decode(self, ids: Sequence[int]) -> str:
    tok = self.tokenizer
    special = {PAD_ID, tok.sot_token_id, tok.eot_token_id}
    return tok.decode([int(i) for i in ids if int(i) not in special]).strip()

  def encode_fixed(self, strings: Sequence[str], max_len: int) -> np.ndarray:
    """int32 [N, max_len] exactly as open_clip's tokenizer call with context_length=max_len."""
    if max_len <= 0:
      raise ValueError(f"OpenClipVocabulary: max_len must be positive, got {max_len}")
    out = np.zeros((len(strings), max_len), np.int32)
    for row, text in enumerate(strings):
      ids = self._encode(text)
      if len(ids) > max_len:
        ids = ids[:max_len]
        ids[-1] = self.eos_id
      out[row, :len(ids)] = ids
    return out

  # --- TensorFlow -----------------------------------------------------------------------------
  def _encode_numpy(self, strings: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    rows = [self._encode(s.decode("utf-8")) for s in strings.reshape(-1)]
    values = np.asarray([i for row in rows for i in row], np.int32)
    return values, np.asarray([len(row) for row in rows], np.int64)

  def encode_batch_tf(self, strings: tf.Tensor) -> tf.RaggedTensor:
    """int32 ids [N, None] of a rank-1 string tensor (start and end of text included)."""
    values, lengths = tf.numpy_function(self._encode_numpy, [strings], (tf.int32, tf.int64),
                                        stateful=False)
    values.set_shape([None])
    lengths.set_shape([None])
    return tf.RaggedTensor.from_row_lengths(values, lengths, validate=False)

  def tokenize_tf(self, strings: tf.Tensor, max_len: int) -> tf.Tensor:
    """int32 [N, max_len]: zero-padded, truncated keeping end of text last (open_clip's rule)."""
    ids = self.encode_batch_tf(strings)
    dense = ids.to_tensor(default_value=PAD_ID, shape=[None, max_len])
    truncated = ids.row_lengths() > max_len
    last = tf.equal(tf.range(max_len), max_len - 1)
    return tf.where(truncated[:, None] & last[None, :], tf.constant(self.eos_id, tf.int32), dense)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    s = tf.convert_to_tensor(s, tf.string)
    if s.shape.rank == 0:
      return self.encode_batch_tf(s[tf.newaxis])[0]
    return self.encode_batch_tf(s)

  def _decode_numpy(self, ids: np.ndarray) -> np.ndarray:
    flat = ids.reshape(-1, ids.shape[-1]) if ids.ndim else ids.reshape(1, 1)
    text = [self._decode(row).encode("utf-8") for row in flat]
    return np.asarray(text, object).reshape(ids.shape[:-1])

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    ids = tf.convert_to_tensor(ids)
    text = tf.numpy_function(self._decode_numpy, [ids], tf.string, stateful=False)
    return tf.reshape(text, tf.shape(ids)[:-1])
