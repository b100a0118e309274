"""M3AE's discretised image targets: a small randomly initialised VQGAN tokenizer of MaskGIT's
architecture (flip.models.vqgan) loaded from a file the test writes; codes against a numpy
nearest-codebook reference, their grid, and the task's image loss against a float64 numpy
cross-entropy on the masked patches of paired rows."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flip import config as config_lib
from flip import masking
from flip.models import vqgan
from flip.tasks import m3ae as m3ae_tasks

IMAGE_SIZE, BATCH, TEXT_LEN = 16, 4, 8
SMALL = dict(filters=8, num_res_blocks=1, channel_multipliers=(1, 2, 2), embedding_dim=8,
             codebook_size=16)  # 16 px -> 4 x 4 codes, the 4 px patch grid
TOWER = ("image_size=16", "model.model_img.patches.size=(4, 4)", "model.model_img.hidden_size=32",
         "model.model_img.transformer.mlp_dim=64", "model.model_img.transformer.num_heads=2",
         "model.model_img.transformer.num_layers=1", "model.decoder.hidden_size=16",
         "model.decoder.mlp_dim=32", "model.decoder.num_heads=2", "model.decoder.num_layers=1",
         "model.m3ae.vocab_size=64", "model.m3ae.text_max_len=8")


def images(seed):
  return np.random.default_rng(seed).integers(0, 256, (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)
                                              ).astype(np.uint8)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
  tokenizer = vqgan.VqganTokenizer(**SMALL)
  params = tokenizer.init(jax.random.PRNGKey(0), images(0))["params"]
  path = str(tmp_path_factory.mktemp("vq") / "tokenizer.npz")
  vqgan.save_npz(path, params)
  return path, tokenizer, params


def vq_config(path, architecture=SMALL):
  small = [f"model.m3ae.vqgan.{k}={v}" for k, v in architecture.items()]
  return config_lib.load_config("configs/cfg_m3ae_base.py:smoke", list(TOWER) + small + [
      "model.m3ae.discretized_image=True", f"model.m3ae.vqgan.weights={path}",
      "model.m3ae.unpaired_text_loss_weight=0.5"])


def test_the_default_architecture_is_maskgit_imagenet256():
  config = config_lib.load_config("configs/cfg_m3ae_base.py")
  settings = {k: config.model.m3ae.vqgan[k] for k in vqgan.MASKGIT_IMAGENET256}
  assert settings == {**vqgan.MASKGIT_IMAGENET256,
                      "channel_multipliers": tuple(vqgan.MASKGIT_IMAGENET256[
                          "channel_multipliers"])}
  tokenizer = vqgan.tokenizer_from_config(config.model.m3ae.vqgan)
  assert tokenizer.grid(256) == (16, 16) and tokenizer.codebook_size == 1024
  shapes = vqgan.param_shapes(tokenizer, 256)
  assert shapes["codebook"].shape == (1024, 256)


def test_codes_have_the_grid_shape_and_are_the_nearest_codebook_entries(tokenizer_file):
  _, tokenizer, params = tokenizer_file
  x = images(1)
  codes, state = tokenizer.apply({"params": params}, x, capture_intermediates=True)
  assert codes.shape == (BATCH,) + tokenizer.grid(IMAGE_SIZE) == (BATCH, 4, 4)
  features = np.asarray(state["intermediates"]["conv_out"]["__call__"][0], np.float64)
  codebook = np.asarray(params["codebook"], np.float64)
  distances = ((features[..., None, :] - codebook) ** 2).sum(-1)
  np.testing.assert_array_equal(np.asarray(codes), distances.argmin(-1))
  assert len(np.unique(np.asarray(codes))) > 1


def test_weights_load_from_npz_and_msgpack_and_a_mismatch_names_the_file(tokenizer_file,
                                                                          tmp_path):
  path, tokenizer, params = tokenizer_file
  loaded = vqgan.load_params(path, tokenizer, IMAGE_SIZE)
  assert jax.tree.all(jax.tree.map(np.array_equal, flax.core.unfreeze(params), loaded))
  msgpack = tmp_path / "tokenizer.msgpack"
  msgpack.write_bytes(flax.serialization.to_bytes(flax.core.unfreeze(params)))
  again = vqgan.load_params(str(msgpack), tokenizer, IMAGE_SIZE)
  assert jax.tree.all(jax.tree.map(np.array_equal, loaded, again))
  other = vqgan.VqganTokenizer(**dict(SMALL, codebook_size=32))
  with pytest.raises(ValueError, match=r"tokenizer.npz does not fit the model: [0-9]+ wrong shape"):
    vqgan.load_params(path, other, IMAGE_SIZE)


def test_a_code_grid_other_than_the_patch_grid_is_refused(tokenizer_file):
  path, _, _ = tokenizer_file
  deeper = dict(SMALL, channel_multipliers=(1, 2, 2, 2))
  with pytest.raises(config_lib.ConfigError, match=r"\(2, 2\) code grid .* grid is \(4, 4\)"):
    m3ae_tasks.M3aeTask(vq_config(path, deeper))


def test_discretised_image_loss_is_cross_entropy_of_the_codes_on_masked_paired_patches(
    tokenizer_file):
  path, tokenizer, params = tokenizer_file
  task = m3ae_tasks.M3aeTask(vq_config(path))
  rng = jax.random.PRNGKey(3)
  model_params = jax.jit(task.init_variables)(rng)["params"]
  assert model_params["m3ae_decoder"]["decoder_pred"]["kernel"].shape[-1] == 16
  text = np.random.default_rng(4).integers(1, 64, (BATCH, TEXT_LEN)).astype(np.int32)
  batch = {"image": images(5), "text": text, "paired": np.array([1, 0, 1, 1], np.int32)}
  noise = np.random.default_rng(6).uniform(size=(BATCH, 16)).astype(np.float32)
  text_noise = np.random.default_rng(7).uniform(size=(BATCH, TEXT_LEN)).astype(np.float32)

  def image_loss(p):
    outputs = task.forward(p, batch, noise, text_noise)
    counts = {k: jnp.sum(v) for k, v in task.weights_for(noise, text_noise, batch).items()}
    return task.combine(task.term_sums(p, batch, outputs), counts)[1]["image_loss"], outputs

  loss, outputs = jax.jit(image_loss)(model_params)
  codes = np.asarray(tokenizer.apply({"params": params}, batch["image"])).reshape(BATCH, -1)
  logits = np.asarray(outputs["pred"], np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  ce = logz - np.take_along_axis(logits, codes[..., None], -1)[..., 0]
  removed = np.asarray(masking.token_mask_from_noise(noise, 0.75).mask, np.float64)
  weight = removed * batch["paired"][:, None]
  np.testing.assert_allclose(float(loss), np.sum(ce * weight) / np.sum(weight), rtol=1e-5)
