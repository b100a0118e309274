"""The evaluator registry (flip.evals.registry): registration checks, building `config.evals` into
evaluators with one-line refusals, periods in steps, lazy imports of the built-in types, and the
example evaluator of docs/EVALUATORS.md run for real.

References: the docs example's metric against the image tower called with plain jit on one device
over the data layer's own images, in float64 numpy; refusals against their exact one-line text.
"""

import os
import re
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import default
from flip import builders
from flip import config as config_lib
from flip.evals import core
from flip.evals import eval_only
from flip.evals import registry
import train_utils

DOC = train_utils.REPO_ROOT / "docs" / "EVALUATORS.md"
NUM_IMAGES = 13  # not a multiple of the batch (8): the last batch is padded
IMAGE_SIZE = 16


def flip_config(*overrides):
  return train_utils.tiny_config("eval_dataset=", *overrides)


def context_for(config, workdir=""):
  task = builders.build_task(config)
  return eval_only.make_context(config, task, builders.checked_partitioner(config), workdir)


def python_blocks(path):
  return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


class Recorder(registry.Evaluator):
  """A throw-away type: records what it was built with."""
  defaults = {"extra": 1}

  def evaluate(self, params, flax_mutables, step):
    return {"recorder/step": float(step)}


@pytest.fixture
def recorder():
  registry.register_evaluator("recorder")(Recorder)
  yield Recorder
  registry.unregister_evaluator("recorder")


def with_entry(config, name, **entry):
  with config.unlocked():
    config.evals[name] = ml_collections.ConfigDict(entry)
  return config


# ---------------------------------------------------------------- registration

def test_registration_refuses_what_is_not_a_complete_evaluator(recorder):
  with pytest.raises(TypeError, match="is not a subclass of Evaluator"):
    registry.register_evaluator("x")(object)

  class Abstract(registry.Evaluator):
    pass
  with pytest.raises(TypeError, match="does not implement evaluate"):
    registry.register_evaluator("x")(Abstract)

  class Clash(Recorder):
    defaults = {"batch_size": 4}
  with pytest.raises(TypeError, match="redefine the common key 'batch_size'"):
    registry.register_evaluator("x")(Clash)

  class Other(Recorder):
    pass
  with pytest.raises(TypeError, match="'recorder' is registered twice"):
    registry.register_evaluator("recorder")(Other)
  assert "x" not in registry.evaluator_types()


def test_built_in_types_are_imported_on_first_use():
  code = ("import sys; from flip.evals import registry; "
          "assert not [m for m in sys.modules if m.startswith('flip.evals.') and "
          "m not in ('flip.evals.registry', 'flip.evals.core')], sorted(sys.modules); "
          "cls = registry.evaluator_class('classification'); "
          "assert 'flip.evals.classification' in sys.modules and "
          "'flip.evals.zeroshot' not in sys.modules; print(cls.type_name, sorted(cls.requires))")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run([sys.executable, "-c", code], cwd=train_utils.REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "classification [<Capability.CLASSIFIES: 'classifies'>]"


# ---------------------------------------------------------------- building config.evals

def test_entries_build_in_order_with_defaults_and_periods_and_empty_datasets_are_off(recorder):
  config = flip_config("eval_every_epochs=0.05", "samples_per_epoch=1600", "batch_size=16")
  with_entry(config, "b_rec", type="recorder", dataset="anything")
  with_entry(config, "a_rec", type="recorder", dataset="x", every_epochs=0.0, extra=7)
  with_entry(config, "off", type="recorder", dataset="")
  evaluators = registry.build_evaluators(config, context_for(config))
  assert [ev.name for ev in evaluators] == ["a_rec", "b_rec"]
  a, b = evaluators
  assert a.every_steps == 0 and b.every_steps == 5  # round(0.05 * 1600 / 16)
  assert a.settings == {"type": "recorder", "dataset": "x", "batch_size": 1024,
                        "every_epochs": 0.0, "extra": 7}
  assert b.settings["extra"] == 1 and b.key == "config.evals.b_rec"
  assert registry.enabled_names(config) == ["a_rec", "b_rec"]
  assert registry.interval_steps(0.001, config) == 1  # never less than one step


def test_bad_entries_are_refused_in_one_line_naming_the_key(recorder):
  cases = [
      (dict(type="nope", dataset="x"),
       "unknown evaluator type config.evals.e.type='nope'; known: caption_reconstruction, "
       "classification, reconstruction, recorder, retrieval, zeroshot"),
      (dict(type="", dataset="x"),
       "config.evals.e.type is empty; known types: caption_reconstruction, classification, "
       "reconstruction, recorder, retrieval, zeroshot"),
      (dict(type="recorder", dataset="x", extr=2),
       "unknown key config.evals.e.extr for type 'recorder' (known: batch_size, dataset, "
       "every_epochs, extra, type)"),
      (dict(type="recorder", dataset="x", batch_size=0),
       "config.evals.e.batch_size must be > 0, got 0"),
      (dict(type="recorder", dataset="x", every_epochs=-1.0),
       "config.evals.e.every_epochs must be >= 0, got -1.0"),
      (dict(type="zeroshot", dataset="x", templates="templates_80"),
       "config.evals.e.templates='templates_80' is not one of templates_full, templates_none, "
       "templates_short"),
      (dict(type="reconstruction", dataset="x"),
       "config.evals.e.type='reconstruction' needs RECONSTRUCTS, which task 'flip' does not "
       "have: set --config.evals.e.dataset= to turn it off"),
  ]
  for entry, message in cases:
    config = with_entry(flip_config(), "e", **entry)
    with pytest.raises(config_lib.ConfigError) as err:  # main.py: exit status 2
      registry.build_evaluators(config, context_for(config))
    assert isinstance(err.value, core.EvalError)
    assert str(err.value) == message


def test_an_entry_that_is_not_a_config_dict_is_refused_in_one_line():
  config = flip_config()
  with config.unlocked():
    config.evals.e = "zeroshot"
  for call in (registry.enabled_names, lambda c: registry.build_evaluators(c, context_for(c))):
    with pytest.raises(core.EvalConfigError) as err:
      call(config)
    assert str(err.value) == "config.evals.e must be a ConfigDict entry, got str"


def test_run_prints_the_eval_line_and_returns_the_scalars(recorder, capsys):
  config = with_entry(flip_config(), "r", type="recorder", dataset="x")
  (ev,) = registry.build_evaluators(config, context_for(config))
  assert ev.run(None, {}, 12) == {"recorder/step": 12.0}
  assert capsys.readouterr().out == "eval at step 12: recorder/step 1200.00%\n"


def test_format_metrics_counts_losses_and_fractions():
  assert core.format_metrics({"z/top1": 0.5, "z/num_images": 37.0, "mae/heldout_loss": 0.123456,
                              "r/num_skipped": 0.0}) == (
      "mae/heldout_loss 0.1235 | r/num_skipped 0 | z/num_images 37 | z/top1 50.00%")


# ---------------------------------------------------------------- the documented example

def write_folder(root, images):
  for index, image in enumerate(images):
    folder = os.path.join(root, f"class_{index % 2}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(image).save(os.path.join(folder, f"{index:03d}.png"))


def test_the_documented_evaluator_runs_through_build_evaluators(tmp_path, capsys):
  evaluator_code, entry_code = python_blocks(DOC)
  module = types.ModuleType("embedding_spread_doc")
  exec(compile(evaluator_code, str(DOC), "exec"), module.__dict__)  # registers the type
  try:
    config = flip_config()
    with config.unlocked():
      exec(entry_code, {"config": config, "default": default})
    assert config.evals.spread.type == "embedding_spread"
    assert config.evals.spread.every_epochs == config.eval_every_epochs
    rng = np.random.default_rng(0)
    write_folder(str(tmp_path / "images"),
                 rng.integers(0, 256, (NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    with config.unlocked():
      config.evals.spread.dataset = f"folder:{tmp_path / 'images'}"
      config.evals.spread.batch_size = 8
    context = context_for(config)
    (ev,) = registry.build_evaluators(config, context)
    assert isinstance(ev, module.EmbeddingSpread)

    task = context.task
    host_params = jax.device_get(jax.jit(task.init_variables)(jax.random.PRNGKey(3))["params"])
    params = builders.place_host_tree(host_params, context.params_axes,
                                      context.partitioner.mesh)
    metrics = ev.run(params, {}, 0)

    images = np.stack([ex["image"] for ex in ev.source.dataset(0, 1, IMAGE_SIZE)
                       .as_numpy_iterator()])
    assert len(images) == NUM_IMAGES
    with jax.default_device(jax.devices()[0]):
      emb = np.asarray(jax.jit(task.encode_image)(host_params, images), np.float64)
    want = np.linalg.norm(emb.mean(axis=0))
    assert 0.05 < want < 0.999  # neither spread evenly nor collapsed: the number means something
    assert metrics == {"spread/images/mean_embedding_norm": pytest.approx(want, rel=1e-5)}
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"eval at step 0: {core.format_metrics(metrics)}")
  finally:
    registry.unregister_evaluator("embedding_spread")
