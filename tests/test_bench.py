"""Tests of the benchmark tooling: the analytic FLOP counter (flip/flops.py) against a hand count
and against the matmuls a traced model really contains, and smoke runs of the bench scripts on
tiny models (they must run and print their tables; their numbers are not checked: benchmarks are
not tests). Smoke runs that compile a train step are marked slow (FLIP_SLOW_TESTS=1)."""

import importlib
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from flip import flops
from flip import builders
from flip.tasks import common

os.environ.setdefault("FLIP_BENCH_CACHE_DIR", "")  # no persistent cache from tests
BENCH_DIR = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "bench")


def one_layer_config(mask_ratio=0.5, use_cls_token=True):
  """Image 8 px, patch 4 (4 patches), width 8, MLP 16, one layer; text 3 tokens, width 4, MLP 8,
  one layer; projection 2."""
  config = default.get_config()
  config.image_size = 8
  default.set_img_tower(config, patch=4, width=8, depth=1, heads=2)
  config.model.model_img.transformer.mlp_dim = 16
  config.model.model_img.use_cls_token = use_cls_token
  config.model.model_img.pool = "cls" if use_cls_token else "avg"
  config.model.model_img.mask_ratio = mask_ratio
  default.set_txt_tower(config, width=4, depth=1, heads=2)
  config.model.model_txt.transformer.mlp_dim = 8
  config.model.model_txt.vocab_size = 50
  config.aug.txt.max_len = 3
  config.model.clr.proj_dim_out = 2
  return config


def test_one_layer_model_against_a_hand_count():
  dims = flops.dims_from_config(one_layer_config())
  batch = 2
  # Patch embedding on all 4 patches: 4 patches x (4*4*3) inputs x 8 outputs multiply-adds.
  patch = 2 * (4 * 48 * 8)
  # Image block on 2 kept patches + class token = 3 tokens, D = 8, M = 16 (multiply-adds):
  # qkv 3*3*8*8 = 576, logits 3*3*8 = 72, values 72, output 3*8*8 = 192, MLP 2*3*8*16 = 768.
  image_block = 2 * (576 + 72 + 72 + 192 + 768)
  # Text block, 3 tokens, D = 4, M = 8: qkv 144, logits 36, values 36, output 48, MLP 192.
  text_block = 2 * (144 + 36 + 36 + 48 + 192)
  proj = 2 * (8 + 4) * 2
  loss = 2 * batch * batch * 2
  expected_forward = batch * (patch + image_block + text_block + proj) + loss
  assert expected_forward == 14800
  parts = flops.forward_flops(dims, batch, 0.5)
  assert parts["total"] == expected_forward
  assert parts["image"] == batch * image_block and parts["text"] == batch * text_block
  assert flops.train_step_flops(dims, batch, 0.5) == 3 * expected_forward
  assert dims.image_tokens(0.0) == 5 and dims.image_tokens(0.5) == 3


def _dot_flops_in_jaxpr(jaxpr) -> int:
  """2 x multiply-adds of every dot_general in a (closed) jaxpr, sub-jaxprs included."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
      rhs_free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
      total += 2 * math.prod(lhs) * math.prod(rhs_free)
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          total += _dot_flops_in_jaxpr(sub.jaxpr)
        elif hasattr(sub, "eqns"):
          total += _dot_flops_in_jaxpr(sub)
  return total


@pytest.mark.parametrize("mask_ratio,use_cls_token", [(0.0, True), (0.5, True), (0.75, False)])
def test_forward_count_equals_the_matmuls_of_the_traced_model_and_loss(mask_ratio, use_cls_token):
  config = one_layer_config(mask_ratio, use_cls_token)
  config.image_size = 16  # 16 patches: 0.75 keeps 4
  task = builders.build_task(config)
  batch = 3
  params = jax.eval_shape(task.init_variables, jax.random.PRNGKey(0))["params"]
  images = jax.ShapeDtypeStruct((batch, 16, 16, 3), jnp.uint8)
  tokens = jax.ShapeDtypeStruct((batch, 3), jnp.int32)

  def forward_and_loss(p, im, tok):
    outputs = task.model.apply({"params": p}, im, tok, train=True,
                               rngs=common.split_rngs(jax.random.PRNGKey(1)))
    return task.loss_from_outputs(outputs)[0]

  traced = jax.make_jaxpr(forward_and_loss)(params, images, tokens)
  expected = flops.forward_flops(flops.dims_from_config(config), batch, mask_ratio)["total"]
  assert _dot_flops_in_jaxpr(traced.jaxpr) == expected


def test_flop_ratio_of_the_side_by_side_model_matches_open_clip_published_numbers():
  # The figures for this model: 7.52 GFLOP per image per step, FLOP ratios 1.78 / 2.81 at
  # open_clip's kept-patch counts (24 and 12 of 49).
  sys.path.insert(0, BENCH_DIR)
  bench_utils = importlib.import_module("bench_utils")
  config = bench_utils.side_by_side_config()
  dims = flops.dims_from_config(config)
  batch = config.batch_size
  per_image = flops.train_step_flops(dims, batch, 0.0) / batch
  assert per_image == pytest.approx(7.52e9, rel=1e-3)
  ratio_24_kept = flops.flop_ratio(dims, batch, 1 - 24 / 49)
  ratio_12_kept = flops.flop_ratio(dims, batch, 1 - 12 / 49)
  assert (round(ratio_24_kept, 2), round(ratio_12_kept, 2)) == (1.78, 2.81)


def test_dims_from_config_refuses_rectangular_patches():
  config = one_layer_config()
  config.model.model_img.patches.size = (4, 2)
  with pytest.raises(ValueError, match="patches.size"):
    flops.dims_from_config(config)


def _bench(name):
  sys.path.insert(0, BENCH_DIR)
  return importlib.import_module(name)


@pytest.mark.slow  # compiles two train steps: ~11 min on the loaded 2-core machine
def test_masking_speedup_smoke(capsys):
  results = _bench("masking_speedup").main(
      ["--model", "tiny", "--ratios", "0", "0.5", "--rounds", "1", "--steps", "1"])
  assert set(results) == {0.0, 0.5}
  base, half = results[0.0], results[0.5]
  assert base["step_time"] > 0 and half["step_time"] > 0
  # The speedup is measured against the unmasked step, and the fraction of the FLOP ratio reached
  # is that speedup over the analytic ratio; half the patches dropped is fewer FLOPs.
  assert half["speedup"] == pytest.approx(base["step_time"] / half["step_time"])
  assert half["fraction"] == pytest.approx(half["speedup"] / half["flop_ratio"])
  assert base["flop_ratio"] == pytest.approx(1.0) and half["flop_ratio"] > 1.0
  assert "measured/FLOP" in capsys.readouterr().out


@pytest.mark.slow  # compiles a train step and times it: ~4.5 min on the loaded machine
def test_mfu_smoke(capsys):
  results = _bench("mfu").main(["--model", "tiny", "--n", "64", "--matmuls", "2", "--rounds", "1"])
  assert results["peak"] > 0 and np.isfinite(results["mfu"])
  assert "MFU" in capsys.readouterr().out


def test_scaling_plan_without_the_check(capsys):
  results = _bench("scaling_plan").main(["--no_check", "--devices", "256"])
  rows = {(name, remat, ps): parts for name, _, remat, ps, parts in results["plan"]}
  large = rows[("cfg_flip_large", "none", False)]
  # partition_states divides the Adam moments of the matrices over 256 data shards.
  assert rows[("cfg_flip_large", "none", True)]["adam"] < large["adam"] / 100
  # actcp (FLIP: full remat) keeps far fewer activations than none, and fewer than minimal.
  actcp = rows[("cfg_flip_large", "actcp", True)]["activations"]
  assert actcp < large["activations"] / 5
  assert actcp < rows[("cfg_flip_large", "minimal", True)]["activations"] / 2
  assert "cfg_flip_huge14" in capsys.readouterr().out


@pytest.mark.slow
def test_memory_and_scaling_check_smoke(capsys):
  results = _bench("memory").main(["--model", "tiny", "--steps", "0"])
  assert len(results) == 6 and all(r["peak"] > 0 for r in results.values())
  checked = _bench("scaling_plan").main(["--check_model", "tiny", "--devices", "256"])["check"]
  assert len(checked) == 6
  assert "predicted" in capsys.readouterr().out


def test_trace_summary_attributes_thunks_of_a_traced_program(tmp_path):
  trace_summary = _bench("trace_summary")
  x = jnp.asarray(np.random.RandomState(0).standard_normal((256, 128)), jnp.float32)
  fn = jax.jit(lambda a: jnp.tanh(a @ a.T).sum())
  hlo = fn.lower(x).compile().as_text()
  jax.block_until_ready(fn(x))
  jax.profiler.start_trace(str(tmp_path), create_perfetto_trace=True)
  for _ in range(2):
    jax.block_until_ready(fn(x))
  jax.profiler.stop_trace()
  tables = trace_summary.summarise(str(tmp_path), hlo, steps=2)
  kinds = dict(tables["by_kind"])
  assert kinds and all(ms > 0 for ms in kinds.values())
  # Every kind counted is an instruction of the compiled program (host-side events are not).
  assert all(re.search(r"%" + re.escape(kind) + r"(\.\d+)? = ", hlo) for kind in kinds)
  assert sum(kinds.values()) == pytest.approx(sum(ms for _, ms in tables["by_part"]))


def test_trace_summary_reads_the_model_part_and_pass_from_op_names():
  part_of = _bench("trace_summary").part_of
  image = "jit(_train_step)/jvp(FlipModel.embed)/FlipModel.encode_image/img_encoder/Transformer/"
  assert part_of(image + "encoderblock_03/MlpBlock_0/Dense_1/dot_general") == "MLP dense 1"
  assert part_of(image + "encoderblock_03/MlpBlock_0/erf") == "MLP activation"
  assert part_of(image + "encoderblock_00/MultiHeadSelfAttention_0/"
                 "MultiHeadSelfAttention_0._fused_qkv/dot_general") == (
                     "attention q/k/v projection")
  assert part_of(image + "encoderblock_00/LayerNorm_1/reduce_sum") == "layer norm"
  assert part_of("jit(_train_step)/add") == "optimizer, gradient norm, guard"
  assert part_of("") == "unattributed (copies and layout changes XLA added)"


def test_step_profile_inference_trace_smoke(tmp_path, capsys):
  results = _bench("step_profile").main(["--model", "tiny", "--steps", "2", "--inference",
                                         "--dtype", "bfloat16", "--trace", str(tmp_path)])
  assert len(results["steps"]) == 2 and results["median_step"] > 0
  out = capsys.readouterr().out
  assert "per model part, pass and op" in out and "thunk time per step" in out


@pytest.mark.slow
def test_step_profile_smoke(capsys):
  results = _bench("step_profile").main(["--model", "tiny", "--steps", "2"])
  assert len(results["steps"]) == 2 and results["median_step"] > 0
  assert "page faults" in capsys.readouterr().out


@pytest.mark.slow
def test_openclip_side_by_side_smoke(capsys):
  pytest.importorskip("torch")
  module = _bench("openclip_side_by_side")
  module.stub_torchvision()
  pytest.importorskip("open_clip")
  results = module.main(["--model", "tiny", "--ratios", "0", "0.5", "--rounds", "1", "--steps",
                         "1", "--inference_batches", "1"])
  # Same weights, same features: the equivalence check is the real content of this smoke run.
  assert max(results["feature_diff"]) <= module.FEATURE_TOLERANCE
  assert "ours/open_clip" in capsys.readouterr().out
