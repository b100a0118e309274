"""M3AE caption reconstructions (flip.evals.caption_reconstruction, M3aeTask.reconstruct_text):
tokens joined back into text, masked positions replaced by the model's argmax only, and the
evaluator run on an HDF5 file with a small WordPiece vocabulary, writing its table to a writer.

References: a hand-made vocabulary and caption; the argmax of the full-length logits
(`all_text_logits`) in numpy; the vocabulary file's own entries for the decoded text.
"""

import h5py
import jax
import numpy as np
import pytest

from flip import builders
from flip import config as config_lib
from flip.evals import caption_reconstruction as captions_lib
from flip.evals import eval_only
from flip.evals import registry
from flip.tasks import m3ae as m3ae_tasks

ENTRIES = ["[PAD]", "[UNK]", "[CLS]", "a", "photo", "of", "dog", "##s", "cat", "on", "grass",
           "black", "and", "white", "picture"]
CAPTIONS = ["a photo of dogs on grass", "", "a black and white picture of a cat", "cat",
            "dogs and cats", "a photo of a photo of a dog on black and white grass"]
TINY = ("image_size=16", "model.model_img.patches.size=(4, 4)", "model.model_img.hidden_size=32",
        "model.model_img.transformer.mlp_dim=64", "model.model_img.transformer.num_heads=2",
        "model.model_img.transformer.num_layers=1", "model.decoder.hidden_size=16",
        "model.decoder.mlp_dim=32", "model.decoder.num_heads=2", "model.decoder.num_layers=1",
        "model.m3ae.vocab_size=64", "model.m3ae.text_max_len=8", "aug.eval_crop_fraction=1.0")


def test_join_pieces_glues_continuations_like_bert():
  assert captions_lib.join_pieces(["a", "photo", "of", "dog", "##s"]) == "a photo of dogs"
  assert captions_lib.join_pieces(["[MASK]", "##s", "on", "[MASK]"]) == "[MASK]s on [MASK]"
  assert captions_lib.join_pieces([]) == ""


def test_caption_texts_show_masks_and_replace_only_masked_tokens():
  # "a photo of dogs" + padding; "photo" and "##s" masked; the model guessed "cat" and "##s".
  text = np.array([[3, 4, 5, 6, 7, 0, 0]])
  mask = np.array([[0, 1, 0, 0, 1, 0, 0]])
  predicted = np.array([[3, 8, 5, 6, 7, 0, 0]])
  (original, masked, guessed), = captions_lib.caption_texts(text, predicted, mask, ENTRIES)
  assert original == "a photo of dogs"
  assert masked == "a [MASK] of dog[MASK]"
  assert guessed == "a cat of dogs"
  table = captions_lib.markdown_table([(original, masked, guessed)])
  assert table.splitlines()[-1] == "| a photo of dogs | a [MASK] of dog[MASK] | a cat of dogs |"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("captions")
  vocab = root / "vocab.txt"
  vocab.write_text("".join(e + "\n" for e in ENTRIES))
  rng = np.random.default_rng(0)
  data = root / "heldout.h5"
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  jpegs = []
  for _ in CAPTIONS:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "JPEG")
    jpegs.append(buffer.getvalue())
  jpegs[3] = b"not a jpeg"  # passed over, like the blank caption
  with h5py.File(data, "w") as f:
    column = f.create_dataset("jpg", (len(jpegs),), dtype=h5py.vlen_dtype(np.uint8))
    for row, value in enumerate(jpegs):
      column[row] = np.frombuffer(value, np.uint8)
    f.create_dataset("caption", data=CAPTIONS, dtype=h5py.string_dtype("utf-8"))
  return str(vocab), str(data)


def m3ae_config(vocab, data, *overrides):
  return config_lib.load_config("configs/cfg_m3ae_base.py:smoke", list(TINY) + [
      f"model.m3ae.vocab_file={vocab}", f"evals.captions.dataset={data}",
      "evals.reconstruction.dataset=", "evals.captions.num_captions=3", *overrides])


class TextWriter:
  def __init__(self):
    self.texts = {}

  def write_texts(self, step, texts):
    self.texts[step] = dict(texts)

  def flush(self):
    pass


def test_reconstruct_text_replaces_exactly_the_masked_tokens_by_the_argmax(files):
  task = m3ae_tasks.M3aeTask(m3ae_config(*files))
  full = m3ae_tasks.M3aeTask(task.config)
  full.model = full.model.clone(all_text_logits=True)
  rng = jax.random.PRNGKey(0)
  params = jax.jit(task.init_variables)(rng)["params"]
  text = np.array([[3, 4, 5, 6, 7, 9, 10, 0], [11, 12, 13, 14, 0, 0, 0, 0],
                   [8, 8, 8, 8, 8, 8, 8, 8]], np.int32)
  images = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
  paired = np.array([1, 0, 1], np.int32)
  noise = (np.asarray(task.mask_noise(rng, 3)),
           np.random.default_rng(2).uniform(size=text.shape).astype(np.float32))
  out = jax.jit(task.reconstruct_text)(params, images, text, paired, *noise)
  reference = jax.jit(full.forward)(params, {"image": images, "text": text, "paired": paired},
                                    *noise)
  argmax = np.argmax(np.asarray(reference["text_logits"]), -1)
  mask = np.asarray(out["text_mask"]) > 0
  assert mask.sum() == 5 + 3 + 6  # n - round(n / 4) masked of 7, 4 and 8 real tokens
  predicted = np.asarray(out["predicted"])
  np.testing.assert_array_equal(predicted[~mask], text[~mask])
  np.testing.assert_array_equal(predicted[mask], argmax[mask])


def test_the_evaluator_writes_original_masked_and_predicted_captions(files):
  config = m3ae_config(*files)
  task = builders.build_task(config)
  writer = TextWriter()
  context = eval_only.make_context(config, task, builders.checked_partitioner(config), "",
                                   writer)
  evaluator, = registry.build_evaluators(config, context)
  assert evaluator.type_name == "caption_reconstruction"
  rng = jax.random.PRNGKey(3)
  params = jax.jit(task.init_variables)(rng)["params"]
  metrics = evaluator.run(params, {}, 7)
  table = writer.texts[7][captions_lib.TENSORBOARD_TAG].splitlines()[2:]
  usable = [CAPTIONS[0], CAPTIONS[2], CAPTIONS[4]]  # the blank caption and bad JPEG passed over
  assert len(table) == 3
  outputs = evaluator.predict(params)
  mask = outputs["text_mask"] > 0
  for row, (line, caption) in enumerate(zip(table, usable)):
    original, masked, predicted = [c.strip() for c in line.strip("|").split("|")]
    assert original == caption
    assert masked.count("[MASK]") == mask[row].sum() > 0
    ids = evaluator.batch["text"][row]
    guessed = np.where(mask[row], outputs["predicted"][row], ids)
    pieces = [ENTRIES[i] if i < len(ENTRIES) else f"[id {i}]" for i in guessed[ids > 0]]
    assert predicted == captions_lib.join_pieces(pieces)
    for word, shown in zip(original.split(), masked.split()):  # kept words shown as they are
      assert shown == word or "[MASK]" in shown
  correct = np.sum((outputs["predicted"] == evaluator.batch["text"]) & mask)
  assert metrics[captions_lib.ACCURACY_TAG] == pytest.approx(correct / mask.sum())


def test_an_hdf5_file_without_caption_columns_is_one_line(files, tmp_path):
  bad = tmp_path / "bad.h5"
  with h5py.File(bad, "w") as f:
    f.create_dataset("train_labels", data=np.arange(3))
  config = m3ae_config(files[0], str(bad))
  task = builders.build_task(config)
  context = eval_only.make_context(config, task, builders.checked_partitioner(config), "")
  with pytest.raises(Exception, match=r"config.evals.captions.dataset: HDF5 file .*bad.h5 has "
                                      r"neither `jpg` \+ `caption`"):
    registry.build_evaluators(config, context)
