"""Tests for flip.data.text: FLIP's BERT tokenizer against a pure-Python WordPiece reference,
truncation/padding, the tf.data path, SentencePiece and byte vocabularies, config errors."""

import unicodedata

import ml_collections
import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf

from flip.data import text

MAX_LEN = 32


def txt_config(**overrides):
  values = dict(tokenizer="tf_bert", max_len=MAX_LEN, cls_token=False, spm_path="")
  values.update(overrides)
  return ml_collections.ConfigDict(values)


class ReferenceWordPiece:
  """BERT uncased tokenization written from its definition: lower-case, NFD + drop accents, split
  on whitespace and punctuation, then greedy longest-match-first WordPiece with '##' suffixes."""

  def __init__(self, vocab_path):
    with open(vocab_path, encoding="utf-8") as f:
      self.ids = {line.rstrip("\n"): i for i, line in enumerate(f)}

  @staticmethod
  def _is_punctuation(ch):
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
      return True
    return unicodedata.category(ch).startswith("P")

  def _words(self, s):
    s = unicodedata.normalize("NFD", s.lower())
    s = "".join(ch for ch in s if unicodedata.category(ch) != "Mn")
    words = []
    for chunk in s.split():
      current = ""
      for ch in chunk:
        if self._is_punctuation(ch):
          if current:
            words.append(current)
          words.append(ch)
          current = ""
        else:
          current += ch
      if current:
        words.append(current)
    return words

  def encode(self, s):
    out = []
    for word in self._words(s):
      pieces, start = [], 0
      while start < len(word):
        end = len(word)
        while end > start:
          piece = word[start:end] if start == 0 else "##" + word[start:end]
          if piece in self.ids:
            break
          end -= 1
        if end == start:
          pieces = [self.ids["[UNK]"]]
          break
        pieces.append(self.ids[piece])
        start = end
      out.extend(pieces)
    return out


@pytest.fixture(scope="module")
def bert():
  return text.get_vocabulary(txt_config())


@pytest.fixture(scope="module")
def reference():
  return ReferenceWordPiece(text.bert_vocab_path())


SENTENCES = [
    "a photo of a dog",
    "A PHOTO of the Unaffable, well-known Café owner!",
    "résumé naïve jalapeño — 3.14159 kg",
    "tokenization of hyperparameterization",
    "  leading and   trailing spaces  ",
]


def test_flip_example_ids(bert):
  # The ids given in the project's issue for FLIP's tokenizer.
  assert bert.encode("a photo of a dog") == [1037, 6302, 1997, 1037, 3899]
  ids = text.tokenize(bert, ["a photo of a dog"], MAX_LEN).numpy()
  assert ids.dtype == np.int32 and ids.shape == (1, MAX_LEN)
  assert ids[0, :5].tolist() == [1037, 6302, 1997, 1037, 3899]
  assert (ids[0, 5:] == 0).all()


def test_bert_matches_reference_wordpiece(bert, reference):
  ids = text.tokenize(bert, SENTENCES, MAX_LEN).numpy()
  for row, sentence in zip(ids, SENTENCES):
    expected = reference.encode(sentence)
    assert len(expected) < MAX_LEN
    assert row[:len(expected)].tolist() == expected, sentence
    assert (row[len(expected):] == 0).all()


def test_truncation_and_padding(bert, reference):
  long_caption = " ".join(["photograph of an unbelievable landscape"] * 12)
  expected = reference.encode(long_caption)
  assert len(expected) > MAX_LEN
  ids = text.tokenize(bert, [long_caption, "dog", ""], MAX_LEN).numpy()
  assert ids.shape == (3, MAX_LEN)
  assert ids[0].tolist() == expected[:MAX_LEN]
  assert ids[1].tolist() == reference.encode("dog") + [0] * (MAX_LEN - 1)
  assert (ids[2] == 0).all()


def test_scalar_python_and_tf_data_paths_agree(bert):
  eager = text.tokenize(bert, SENTENCES, MAX_LEN).numpy()
  assert (text.tokenize(bert, SENTENCES[1], MAX_LEN).numpy() == eager[1:2]).all()
  ds = tf.data.Dataset.from_tensor_slices(SENTENCES).map(
      lambda s: text.tokenize(bert, s, MAX_LEN)[0], num_parallel_calls=2)
  assert (np.stack(list(ds.as_numpy_iterator())) == eager).all()


def test_cls_token_prepends_cls_id(reference):
  vocab = text.get_vocabulary(txt_config(cls_token=True))
  ids = text.tokenize(vocab, ["a photo of a dog"], 8).numpy()[0]
  assert ids.tolist() == [reference.ids["[CLS]"]] + reference.encode("a photo of a dog") + [0, 0]
  assert vocab.decode(ids.tolist()) == "a photo of a dog"


def test_vocab_sizes_and_special_ids(bert):
  assert bert.vocab_size == 30522  # the text tower adds one row: 30523 (FLIP)
  assert bert.pad_id == 0 and bert.unk_id == 100 and bert.eos_id is None
  assert bert.decode([1037, 6302, 1997, 1037, 3899, 0, 0]) == "a photo of a dog"


def test_byte_vocabulary():
  vocab = text.get_vocabulary(txt_config(tokenizer="byte"))
  strings = ["ab", "héllo wörld", ""]
  ids = text.tokenize(vocab, strings, 8).numpy()
  for row, s in zip(ids, strings):
    raw = list(s.encode("utf-8"))[:8]
    # seqio's byte vocabulary reserves pad 0, eos 1, unk 2: byte b has id b + 3.
    assert row.tolist() == [b + 3 for b in raw] + [0] * (8 - len(raw))


def test_sentencepiece_vocabulary(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(["a photo of a dog", "a photo of a cat", "a picture of a sneaker",
                               "a black and white photo of a shirt"] * 50))
  prefix = str(tmp_path / "spm")
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=prefix, vocab_size=24, model_type="unigram",
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  vocab = text.get_vocabulary(txt_config(tokenizer="sentencepiece", spm_path=prefix + ".model"))
  processor = spm.SentencePieceProcessor(model_file=prefix + ".model")
  strings = ["a photo of a dog", "a black and white picture of a cat " * 4]
  ids = text.tokenize(vocab, strings, 16).numpy()
  for row, s in zip(ids, strings):
    expected = processor.encode(s)[:16]
    assert row.tolist() == expected + [0] * (16 - len(expected))


def test_config_errors(tmp_path):
  with pytest.raises(ValueError, match="tokenizer='wordpiece' is not one of"):
    text.get_vocabulary(txt_config(tokenizer="wordpiece"))
  with pytest.raises(ValueError, match="spm_path must name"):
    text.get_vocabulary(txt_config(tokenizer="sentencepiece"))
  with pytest.raises(FileNotFoundError, match="missing.model"):
    text.get_vocabulary(txt_config(tokenizer="sentencepiece", spm_path=str(tmp_path / "missing.model")))
  with pytest.raises(ValueError, match="cls_token=True is only defined"):
    text.get_vocabulary(txt_config(tokenizer="byte", cls_token=True))
  with pytest.raises(ValueError, match="max_len must be positive"):
    text.tokenize(text.get_vocabulary(txt_config()), ["x"], 0)
