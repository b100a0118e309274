"""Text vocabularies behind seqio's `Vocabulary` interface, and the fixed-length tokenizer.

This module owns how captions and prompts become token ids:

* `BertUncasedVocabulary`: FLIP's tokenizer. BERT-base uncased WordPiece (tensorflow-text's
  `BertTokenizer` on the vocabulary shipped in `flip/assets/bert_uncased_vocab.txt`): lower-case,
  accents stripped, punctuation split, no [CLS]/[SEP] unless `cls_token=True` (then [CLS] is
  prepended; FLIP's configs keep it off). "a photo of a dog" -> [1037, 6302, 1997, 1037, 3899].
* SentencePiece (`seqio.SentencePieceVocabulary` on a user model file) and bytes
  (`seqio.ByteVocabulary`), both with pad id 0 like the BERT vocabulary.
* `open_clip`: CLIP's BPE through open_clip's own tokenizer (`flip.data.clip_bpe`; start and end
  of text around every text, pad 0, truncation keeping end of text last, as open_clip does).
* `tokenize(vocab, strings, max_len)`: int32 [N, max_len], truncated at max_len and padded with the
  vocabulary's pad id (0). It is the one function both the input pipeline (inside tf.data) and the
  zero-shot evaluator (eagerly, on prompt strings) call, so text preprocessing cannot drift between
  training and evaluation.

Decisions where the design docs are silent:
* `vocab_size` of the BERT vocabulary is the file's 30522 entries; the text tower's embedding table
  has 30523 rows (FLIP's 30522 + 1), which leaves one spare id and changes nothing here.
* No EOS is appended by the BERT, SentencePiece and byte vocabularies (FLIP's text features are
  the first token's); the open_clip vocabulary adds its start and end of text, as open_clip does.
* The tensorflow-text tokenizer and its lookup table are built lazily, outside any function graph,
  and dropped when pickled (gin deep-copies configurables' arguments).
"""

import functools
import importlib.resources
import os
from typing import Optional, Sequence, Union

import ml_collections
import seqio
import tensorflow as tf
import tensorflow_text as tf_text

from flip.data import clip_bpe

# Tokenizer names accepted in `config.aug.txt.tokenizer`.
TOKENIZER_BERT = "tf_bert"
TOKENIZER_SENTENCEPIECE = "sentencepiece"
TOKENIZER_BYTE = "byte"
TOKENIZER_OPEN_CLIP = "open_clip"
TOKENIZERS = (TOKENIZER_BERT, TOKENIZER_SENTENCEPIECE, TOKENIZER_BYTE, TOKENIZER_OPEN_CLIP)

# BERT-base uncased special tokens (the vocabulary file: [PAD]=0, [UNK]=100, [CLS]=101).
BERT_VOCAB_ASSET = "assets/bert_uncased_vocab.txt"
BERT_PAD_ID = 0
BERT_UNK_TOKEN = "[UNK]"
BERT_CLS_TOKEN = "[CLS]"
# tensorflow-text's default: words longer than this many bytes become [UNK] (as in BERT).
BERT_MAX_BYTES_PER_WORD = 100


def bert_vocab_path() -> str:
  """Path of the BERT uncased vocabulary file shipped inside the package."""
  return str(importlib.resources.files("flip").joinpath(BERT_VOCAB_ASSET))


class BertUncasedVocabulary(seqio.Vocabulary):
  """BERT uncased WordPiece through tensorflow-text, with pad 0 and no EOS (FLIP's tokenizer)."""

  def __init__(self, vocab_path: Optional[str] = None, cls_token: bool = False):
    self._vocab_path = vocab_path or bert_vocab_path()
    if not tf.io.gfile.exists(self._vocab_path):
      raise FileNotFoundError(f"BERT vocabulary file not found: {self._vocab_path}")
    self._cls_token = cls_token
    with tf.io.gfile.GFile(self._vocab_path, "r") as f:
      self._tokens = [line.rstrip("\n") for line in f]
    self._token_to_id = {token: i for i, token in enumerate(self._tokens)}
    for token in (BERT_UNK_TOKEN, BERT_CLS_TOKEN):
      if token not in self._token_to_id:
        raise ValueError(f"BERT vocabulary {self._vocab_path} has no {token} entry")
    self._tokenizer = None
    self._encode_fn = None
    super().__init__(extra_ids=0)

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_tokenizer"] = None  # holds a TF lookup table; rebuilt lazily after unpickling
    state["_encode_fn"] = None
    return state

  def __eq__(self, other):
    return (isinstance(other, BertUncasedVocabulary) and other._vocab_path == self._vocab_path
            and other._cls_token == self._cls_token)

  def __hash__(self):
    return hash((self._vocab_path, self._cls_token))

  def __str__(self):
    return f"BertUncasedVocabulary(vocab_path={self._vocab_path}, cls_token={self._cls_token})"

  @property
  def tokenizer(self) -> tf_text.BertTokenizer:
    if self._tokenizer is None:
      # Lift table creation out of any tf.function / tf.data trace that triggers the first use.
      with tf.init_scope():
        self._tokenizer = tf_text.BertTokenizer(
            self._vocab_path, lower_case=True, token_out_type=tf.int64,
            unknown_token=BERT_UNK_TOKEN, max_bytes_per_word=BERT_MAX_BYTES_PER_WORD)
    return self._tokenizer

  @property
  def pad_id(self) -> int:
    return BERT_PAD_ID

  @property
  def bos_id(self) -> Optional[int]:
    return self._token_to_id[BERT_CLS_TOKEN] if self._cls_token else None

  @property
  def eos_id(self) -> Optional[int]:
    return None

  @property
  def unk_id(self) -> int:
    return self._token_to_id[BERT_UNK_TOKEN]

  @property
  def _base_vocab_size(self) -> int:
    return len(self._tokens)

  def _encode_batch(self, strings: tf.Tensor) -> tf.RaggedTensor:
    pieces = self.tokenizer.tokenize(strings).merge_dims(-2, -1)  # [N, words, pieces] -> [N, ids]
    ids = tf.cast(pieces, tf.int32)
    if self._cls_token:
      cls = tf.fill([ids.nrows(), 1], tf.constant(self.bos_id, tf.int32))
      ids = tf.concat([cls, ids], axis=1)
    return ids

  def encode_batch_tf(self, strings: tf.Tensor) -> tf.RaggedTensor:
    """int32 ids of a rank-1 string tensor as a RaggedTensor [N, None]."""
    if self._encode_fn is None:
      # Traced once per vocabulary: building tensorflow-text's graph is slow, and every input
      # pipeline and evaluator calls this.
      self._encode_fn = tf.function(self._encode_batch, autograph=False,
                                    input_signature=[tf.TensorSpec([None], tf.string)])
    return self._encode_fn(strings)

  def _encode_tf(self, s: tf.Tensor) -> Union[tf.Tensor, tf.RaggedTensor]:
    s = tf.convert_to_tensor(s, tf.string)
    if s.shape.rank == 0:
      return self.encode_batch_tf(s[tf.newaxis])[0]
    return self.encode_batch_tf(s)

  def _encode(self, s: str) -> Sequence[int]:
    return self._encode_tf(tf.constant(s)).numpy().tolist()

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    ids = tf.convert_to_tensor(ids)
    flat = tf.reshape(ids, [-1, tf.shape(ids)[-1]])
    keep = tf.not_equal(flat, self.pad_id)
    if self._cls_token:
      keep &= tf.not_equal(flat, self.bos_id)
    words = self.tokenizer.detokenize(tf.ragged.boolean_mask(tf.cast(flat, tf.int64), keep))
    text = tf.strings.reduce_join(words, axis=-1, separator=" ")
    return tf.reshape(text, tf.shape(ids)[:-1])

  def _decode(self, ids: Sequence[int]) -> str:
    return self._decode_tf(tf.constant([list(ids)], tf.int64))[0].numpy().decode("utf-8")


@functools.lru_cache(maxsize=None)
def _cached_vocabulary(tokenizer: str, cls_token: bool, spm_path: str) -> seqio.Vocabulary:
  if tokenizer == TOKENIZER_BERT:
    return BertUncasedVocabulary(cls_token=cls_token)
  if cls_token:
    raise ValueError(f"config.aug.txt.cls_token=True is only defined for tokenizer "
                     f"{TOKENIZER_BERT!r} (the [CLS] token), not {tokenizer!r}")
  if tokenizer == TOKENIZER_SENTENCEPIECE:
    if not spm_path:
      raise ValueError("config.aug.txt.spm_path must name a SentencePiece model file when "
                       f"config.aug.txt.tokenizer={TOKENIZER_SENTENCEPIECE!r}")
    if not tf.io.gfile.exists(spm_path):
      raise FileNotFoundError(f"config.aug.txt.spm_path: SentencePiece model not found: {spm_path}")
    return seqio.SentencePieceVocabulary(spm_path)
  if tokenizer == TOKENIZER_BYTE:
    return seqio.ByteVocabulary()
  if tokenizer == TOKENIZER_OPEN_CLIP:
    return clip_bpe.OpenClipVocabulary()
  raise ValueError(f"config.aug.txt.tokenizer={tokenizer!r} is not one of {TOKENIZERS}")


def get_vocabulary(txt_config: ml_collections.ConfigDict) -> seqio.Vocabulary:
  """The vocabulary named by `config.aug.txt` (keys tokenizer, cls_token, spm_path).

  Vocabularies are cached per setting, so repeated calls share one lookup table.
  """
  tokenizer = txt_config.get("tokenizer", TOKENIZER_BERT)
  spm_path = os.fspath(txt_config.get("spm_path", "") or "")
  return _cached_vocabulary(tokenizer, bool(txt_config.get("cls_token", False)), spm_path)


def _encode_ragged(vocab: seqio.Vocabulary, strings: tf.Tensor) -> tf.RaggedTensor:
  """int32 ids [N, None] of a rank-1 string tensor for any seqio vocabulary."""
  if isinstance(vocab, BertUncasedVocabulary):
    return vocab.encode_batch_tf(strings)
  if isinstance(vocab, seqio.SentencePieceVocabulary):
    return tf.cast(vocab.tf_tokenizer.tokenize(strings), tf.int32)
  # Generic path (e.g. bytes, whose encode_tf only takes scalars): one string at a time.
  return tf.map_fn(lambda s: tf.cast(vocab.encode_tf(s), tf.int32), strings,
                   fn_output_signature=tf.RaggedTensorSpec([None], tf.int32))


def tokenize(vocab: seqio.Vocabulary, strings: Union[tf.Tensor, Sequence[str], str],
             max_len: int) -> tf.Tensor:
  """Token ids int32 [N, max_len]: truncated to max_len, padded with `vocab.pad_id`.

  Works inside tf.data functions and eagerly; `strings` may be a string tensor of rank 0 or 1, a
  Python string or a list of them (a scalar is treated as a batch of one).
  """
  if max_len <= 0:
    raise ValueError(f"tokenize: max_len must be positive, got {max_len}")
  strings = tf.convert_to_tensor(strings, dtype=tf.string)
  if strings.shape.rank == 0:
    strings = strings[tf.newaxis]
  elif strings.shape.rank != 1:
    raise ValueError("tokenize: expected a scalar or rank-1 string tensor, got shape "
                     f"{strings.shape}")
  if isinstance(vocab, clip_bpe.OpenClipVocabulary):
    return vocab.tokenize_tf(strings, max_len)  # truncation keeps end of text last
  ids = _encode_ragged(vocab, strings)
  return ids.to_tensor(default_value=vocab.pad_id, shape=[None, max_len])
