"""This project's FLIP train step and image inference against open_clip's, on the identical model.

The model is `bench_utils.SBS_MODEL` (ViT patch 16, width 384, 12 layers, 6 heads, class token, at
112 px; text width 256, 6 layers, 4 heads, context 32, vocab 30522; embed 256), random weights, no
downloads, float32, batch 64, captions without padding. open_clip's side is `open_clip.CLIP` with
`no_ln_pre=True` (our ViT has no LayerNorm before the transformer), bidirectional text
(`no_causal_mask=True`) with first-token pooling, `torch.optim.AdamW` (betas and weight decay of
our config, no decay on gains/biases/logit scale as open_clip's training script does), its
`ClipLoss`, and its `patch_dropout` set per mask ratio. Remaining differences, none of which
changes the FLOPs by more than 0.1 %: our patch embedding has a bias; our token table is padded
to a multiple of 128 rows; our class token gets no position embedding (open_clip's row 0 of the
position table is zeroed for the equivalence check); open_clip keeps int(49 x (1 - r)) patches
where we keep round(49 x (1 - r)) (24 vs 25 at r = 0.5: the table prints each side's FLOPs).

Equivalence: open_clip's weights are copied once into our parameter tree and both sides' normalised
image and text features (eval mode, unmasked) must agree within `FEATURE_TOLERANCE`.

Timing: each framework runs in a process of its own (this script again, with `--worker ours` or
`--worker open_clip`), one at a time, alternating: ours, open_clip, ours, open_clip for the default
`--rounds 2`. A worker builds only its side, runs two warm-up rounds over the ratios (the first
compiles; the second lets the C heap settle at its working size), then times `--steps` steps per
ratio, alternating ratios, then the image inference batches. Separate processes because that is
how either is used, and because in one process the two frameworks' allocations share a heap and
their idle thread pools share the two cores (measured 2026-12-02: our unmasked step ran at 19.6
img/s next to torch in one process against 24.3 img/s alone). torch gets `--threads` intra-op
threads (XLA's CPU pool uses every core). Prints per ratio the median images/s of each side, ours
/ open_clip (goal >= 1.2), each side's achieved GFLOP/s and the ratio of process CPU seconds per
step (a load-independent second reading; torch's OpenMP threads spin while they wait, which
counts against it there), then the same for image inference (unmasked image embeddings, no
gradient). The equivalence check runs in this process, before the workers.

torchvision: the only wheel on the index is a CUDA build whose import fails against CPU torch;
open_clip imports it only for its data transforms, so `stub_torchvision` puts inert placeholder
modules in `sys.modules` before open_clip is imported (nothing installed is modified).

Precision: `--precision fp32` (both sides float32) or `bf16`: ours with `config.dtype =
"bfloat16"` (flip.models.precision: bfloat16 matmuls with float32 accumulation, float32
parameters, layer norm, softmax and loss), open_clip under `torch.autocast("cpu",
dtype=torch.bfloat16)` around the forward pass and the loss, as its training script's
`--precision amp_bf16` does (backward and AdamW outside, float32 parameters); inference likewise.
The equivalence check is made in float32 either way.

Usage: python bench/openclip_side_by_side.py [--ratios 0 0.5 0.75] [--rounds 2] [--steps 2]
                                             [--threads 2] [--model sbs|tiny]
                                             [--precision fp32|bf16]
"""

import argparse
import json
import os
import subprocess
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# pylint: disable=g-import-not-at-top,wrong-import-position
import bench_utils
import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from flip import flops
from flip import masking
from flip.models import vit as vit_lib

GOAL_SPEED_RATIO = 1.2  # docs/BENCHMARKS.md's goal: ours >= 1.2 x open_clip's images/s, training and inference
FEATURE_TOLERANCE = 1e-5  # features within 1e-5 after copying the weights
SIDES = ("ours", "open_clip")
RESULT_PREFIX = "WORKER_RESULT "
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}  # --precision -> our config.dtype
TORCHVISION_MODULES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
                       "torchvision.transforms.v2", "torchvision.ops", "torchvision.ops.misc")


class _PlaceholderMeta(type):
  """Class attributes of a placeholder (e.g. InterpolationMode.BICUBIC) are inert strings."""

  def __getattr__(cls, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return f"{cls.__name__}.{name}"


def _unavailable(self, *args, **kwargs):
  del self, args, kwargs
  raise RuntimeError("torchvision is stubbed out in this benchmark (its CPU import is broken)")


class _StubModule(types.ModuleType):
  """A module whose every public attribute is a placeholder class that cannot be instantiated."""

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    placeholder = _PlaceholderMeta(name, (), {"__init__": _unavailable})
    setattr(self, name, placeholder)
    return placeholder


def stub_torchvision() -> None:
  """Inert torchvision modules in sys.modules (the real one is never imported: a failed import
  leaves half-registered torch operators behind)."""
  if isinstance(sys.modules.get("torchvision"), _StubModule):
    return
  for name in TORCHVISION_MODULES:
    sys.modules[name] = _StubModule(name)
    if "." in name:
      parent, child = name.rsplit(".", 1)
      setattr(sys.modules[parent], child, sys.modules[name])


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="sbs", choices=("sbs", "tiny"))
  parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5, 0.75])
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=2, help="timed steps per ratio per round")
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  parser.add_argument("--inference_batches", type=int, default=3)
  parser.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS))
  parser.add_argument("--worker", choices=SIDES, default=None,
                      help="internal: time one side in this process and print its times")
  return parser.parse_args(argv)


def model_config(name: str, mask_ratio: float, precision: str = "fp32"):
  """The side-by-side config, or (tests) the same structure at the smoke size."""
  config = bench_utils.side_by_side_config(mask_ratio)
  config.dtype = PRECISIONS[precision]
  if name == "tiny":
    config.image_size = 32
    config.model.model_img.patches.size = (8, 8)
    for tower in (config.model.model_img, config.model.model_txt):
      tower.transformer.num_layers = 1
      tower.transformer.num_heads = 2
      tower.transformer.mlp_dim = 4 * 64
    config.model.model_img.hidden_size = config.model.model_txt.hidden_size = 64
    config.model.clr.proj_dim_out = 32
    config.aug.txt.max_len = 8
    config.model.model_txt.vocab_size = 300
    config.batch_size = 8
  return config


def build_openclip(config, threads: int):
  """open_clip's CLIP with our config's sizes, its AdamW and ClipLoss."""
  stub_torchvision()
  import open_clip
  import torch
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  img, txt = config.model.model_img, config.model.model_txt
  width = img.hidden_size
  model = open_clip.CLIP(
      embed_dim=config.model.clr.proj_dim_out,
      vision_cfg=dict(layers=img.transformer.num_layers, width=width,
                      head_width=width // img.transformer.num_heads,
                      mlp_ratio=img.transformer.mlp_dim / width,
                      patch_size=img.patches.size[0], image_size=config.image_size,
                      no_ln_pre=True, norm_kwargs=dict(eps=img.layernorm_epsilon)),
      text_cfg=dict(context_length=config.aug.txt.max_len, vocab_size=txt.vocab_size,
                    width=txt.hidden_size, heads=txt.transformer.num_heads,
                    layers=txt.transformer.num_layers,
                    mlp_ratio=txt.transformer.mlp_dim / txt.hidden_size,
                    no_causal_mask=True, pool_type="first",
                    norm_kwargs=dict(eps=txt.layernorm_epsilon)))
  with torch.no_grad():
    model.visual.positional_embedding[0].zero_()  # our class token has no position embedding
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
  no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in n]
  optimizer = torch.optim.AdamW(
      [{"params": no_decay, "weight_decay": 0.0},
       {"params": decay, "weight_decay": config.opt.weight_decay}],
      lr=config.learning_rate, betas=(config.opt.b1, config.opt.b2))
  return model, optimizer, open_clip.ClipLoss()


def openclip_to_flip_params(state_dict, params_template):
  """open_clip CLIP weights (torch state dict) -> our FlipModel parameter tree."""
  sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in state_dict.items()}
  template = traverse_util.flatten_dict(flax.core.unfreeze(params_template), sep="/")
  out = {}

  def put(key, value):
    if key not in template:
      raise KeyError(f"our model has no parameter {key}")
    if template[key].shape != value.shape:
      raise ValueError(f"{key}: open_clip gives {value.shape}, ours is {template[key].shape}")
    out[key] = np.asarray(value, np.float32)

  def blocks(prefix, ours):
    layer = 0
    while f"{prefix}.resblocks.{layer}.ln_1.weight" in sd:
      src, dst = f"{prefix}.resblocks.{layer}", f"{ours}/Transformer/encoderblock_{layer:02d}"
      heads, head_dim, width = template[f"{dst}/MultiHeadSelfAttention_0/out_kernel"].shape
      for ln, name in (("ln_1", "LayerNorm_0"), ("ln_2", "LayerNorm_1")):
        put(f"{dst}/{name}/scale", sd[f"{src}.{ln}.weight"])
        put(f"{dst}/{name}/bias", sd[f"{src}.{ln}.bias"])
      in_proj = sd[f"{src}.attn.in_proj_weight"]  # [3 * width, width], rows q | k | v
      put(f"{dst}/MultiHeadSelfAttention_0/qkv_kernel",
          in_proj.reshape(3, heads, head_dim, width).transpose(3, 0, 1, 2))
      put(f"{dst}/MultiHeadSelfAttention_0/qkv_bias",
          sd[f"{src}.attn.in_proj_bias"].reshape(3, heads, head_dim))
      put(f"{dst}/MultiHeadSelfAttention_0/out_kernel",
          sd[f"{src}.attn.out_proj.weight"].T.reshape(heads, head_dim, width))
      put(f"{dst}/MultiHeadSelfAttention_0/out_bias", sd[f"{src}.attn.out_proj.bias"])
      for fc, name in (("c_fc", "Dense_0"), ("c_proj", "Dense_1")):
        put(f"{dst}/MlpBlock_0/{name}/kernel", sd[f"{src}.mlp.{fc}.weight"].T)
        put(f"{dst}/MlpBlock_0/{name}/bias", sd[f"{src}.mlp.{fc}.bias"])
      layer += 1

  blocks("visual.transformer", "img_encoder")
  blocks("transformer", "txt_encoder")
  put("img_encoder/embedding/kernel", sd["visual.conv1.weight"].transpose(2, 3, 1, 0))
  put("img_encoder/embedding/bias", np.zeros(template["img_encoder/embedding/bias"].shape))
  put("img_encoder/cls", sd["visual.class_embedding"][None, None])
  put("img_encoder/pos_embedding", sd["visual.positional_embedding"][None, 1:])
  put("img_encoder/Transformer/encoder_norm/scale", sd["visual.ln_post.weight"])
  put("img_encoder/Transformer/encoder_norm/bias", sd["visual.ln_post.bias"])
  put("img_proj/kernel", sd["visual.proj"])
  table = np.zeros(template["txt_encoder/token_embedding"].shape, np.float32)
  table[:sd["token_embedding.weight"].shape[0]] = sd["token_embedding.weight"]
  put("txt_encoder/token_embedding", table)
  put("txt_encoder/pos_embedding", sd["positional_embedding"][None])
  put("txt_encoder/Transformer/encoder_norm/scale", sd["ln_final.weight"])
  put("txt_encoder/Transformer/encoder_norm/bias", sd["ln_final.bias"])
  put("txt_proj/kernel", sd["text_projection"])
  put("logit_scale", sd["logit_scale"].reshape(template["logit_scale"].shape))
  missing = sorted(set(template) - set(out))
  if missing:
    raise KeyError(f"no open_clip weight for {missing[:3]}")
  return flax.core.freeze(traverse_util.unflatten_dict(out, sep="/"))


def torch_images(images_uint8: np.ndarray):
  """Our uint8 NHWC batch -> open_clip's normalised float NCHW input (our ViT's normalisation)."""
  import torch
  mean = np.asarray(vit_lib.IMAGENET_MEAN_RGB, np.float32)
  std = np.asarray(vit_lib.IMAGENET_STD_RGB, np.float32)
  x = (images_uint8.astype(np.float32) - mean) / std
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def check_features(runner, model, images, tokens) -> tuple:
  """Max |difference| of image and text features with open_clip's weights copied into ours."""
  import torch
  task = runner.task
  template = jax.eval_shape(task.init_variables, jax.random.PRNGKey(0))["params"]
  params = openclip_to_flip_params(model.state_dict(), template)
  ours_img = np.asarray(jax.jit(task.encode_image)(params, jnp.asarray(images)))
  ours_txt = np.asarray(jax.jit(task.encode_text)(params, jnp.asarray(tokens)))
  model.eval()
  with torch.no_grad():
    theirs_img = model.encode_image(torch_images(images), normalize=True).numpy()
    theirs_txt = model.encode_text(torch.from_numpy(tokens.astype(np.int64)),
                                   normalize=True).numpy()
  model.train()
  return (float(np.max(np.abs(ours_img - theirs_img))),
          float(np.max(np.abs(ours_txt - theirs_txt))))


def openclip_kept(num_patches: int, ratio: float) -> int:
  """Patches open_clip's PatchDropout keeps: int(N * (1 - ratio)), at least one."""
  return max(1, int(num_patches * (1.0 - ratio))) if ratio > 0 else num_patches


def openclip_step_flops(dims: flops.FlipDims, batch: int, ratio: float) -> int:
  """Our FLOP count with open_clip's kept-patch rounding (`openclip_kept`)."""
  kept = openclip_kept(dims.num_patches, ratio)
  equivalent_ratio = 1.0 - kept / dims.num_patches
  if ratio > 0 and masking.num_kept(dims.num_patches, equivalent_ratio) != kept:
    raise AssertionError(f"cannot express {kept} kept patches as a mask ratio")
  return flops.train_step_flops(dims, batch, equivalent_ratio if ratio > 0 else 0.0)


def _time_side(fns: dict, steps: int) -> tuple:
  """Two warm-up rounds, then `steps` timed calls per function: (wall, cpu) per name."""
  cpu = {}
  wall = bench_utils.time_alternating(fns, rounds=1, steps_per_round=steps, warmup=2,
                                      cpu_times=cpu)
  return wall, cpu


def run_worker(args) -> dict:
  """One side's train steps at every ratio and its inference batches, timed in this process."""
  runners = {r: bench_utils.StepRunner(model_config(args.model, r, args.precision))
             for r in args.ratios}
  first = runners[args.ratios[0]]
  batch_np = first.batch
  if args.worker == "ours":
    holder = {"state": first.init_state()}

    def jax_step(runner):
      def fn():
        holder["state"] = runner.step(holder["state"])
      return fn

    train_fns = {r: jax_step(runners[r]) for r in args.ratios}
    encode = jax.jit(first.task.encode_image)
    images_j = jnp.asarray(batch_np["image"])

    def infer():
      # The state's own parameters: a train step donates the previous state's buffers.
      jax.block_until_ready(encode(holder["state"].params, images_j))
  else:
    stub_torchvision()
    import torch
    from open_clip import transformer as openclip_transformer
    model, optimizer, clip_loss = build_openclip(first.config, args.threads)
    images_t = torch_images(batch_np["image"])
    tokens_t = torch.from_numpy(batch_np["txt"].astype(np.int64))
    import contextlib
    autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16"
                else contextlib.nullcontext)

    def torch_step(ratio):
      def fn():
        model.visual.patch_dropout = (openclip_transformer.PatchDropout(ratio) if ratio > 0
                                      else torch.nn.Identity())
        optimizer.zero_grad(set_to_none=True)
        with autocast():
          image_features, text_features, logit_scale = model(images_t, tokens_t)[:3]
          loss = clip_loss(image_features, text_features, logit_scale)
        loss.backward()
        optimizer.step()
      return fn

    train_fns = {r: torch_step(r) for r in args.ratios}

    def infer():
      model.eval()
      with torch.no_grad(), autocast():
        model.encode_image(images_t, normalize=True)
      model.train()

  wall, cpu = _time_side(train_fns, args.steps)
  infer_wall, _ = _time_side({"inference": infer}, args.inference_batches)
  result = dict(train={str(r): wall[r] for r in args.ratios},
                train_cpu={str(r): cpu[r] for r in args.ratios},
                inference=infer_wall["inference"])
  print(RESULT_PREFIX + json.dumps(result), flush=True)
  return result


def _run_worker_process(args, side: str) -> dict:
  command = [sys.executable, os.path.abspath(__file__), "--worker", side, "--model", args.model,
             "--ratios", *[str(r) for r in args.ratios], "--steps", str(args.steps),
             "--threads", str(args.threads), "--inference_batches", str(args.inference_batches),
             "--precision", args.precision]
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  lines = [l for l in done.stdout.splitlines() if l.startswith(RESULT_PREFIX)]
  if done.returncode != 0 or not lines:
    raise RuntimeError(f"the {side} worker failed (exit {done.returncode}): "
                       f"{done.stderr.strip().splitlines()[-1:]}")
  return json.loads(lines[-1][len(RESULT_PREFIX):])


def run(args) -> dict:
  if args.worker:
    return run_worker(args)
  stub_torchvision()
  import open_clip
  import torch
  bench_utils.print_header(f"side by side with open_clip, model {args.model}, {args.precision}")
  first = bench_utils.StepRunner(model_config(args.model, args.ratios[0]))
  config, batch_np = first.config, first.batch
  model, _, _ = build_openclip(config, args.threads)
  ours_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      jax.eval_shape(first.task.init_variables, jax.random.PRNGKey(0))["params"]))
  theirs_count = sum(p.numel() for p in model.parameters())
  print(f"open_clip {open_clip.__version__}, torch {torch.__version__} ({args.threads} threads); "
        f"parameters: ours {ours_count:,}, open_clip {theirs_count:,}")
  img_diff, txt_diff = check_features(first, model, batch_np["image"], batch_np["txt"])
  print(f"features with open_clip's weights copied into ours: max |diff| image {img_diff:.2e}, "
        f"text {txt_diff:.2e} (tolerance {FEATURE_TOLERANCE:.0e}: "
        f"{'ok' if max(img_diff, txt_diff) <= FEATURE_TOLERANCE else 'EXCEEDED'})", flush=True)
  del model

  times = {(side, r): [] for side in SIDES for r in args.ratios}
  cpu = {key: [] for key in times}
  infer = {side: [] for side in SIDES}
  for _ in range(args.rounds):
    for side in SIDES:
      got = _run_worker_process(args, side)
      for r in args.ratios:
        times[(side, r)] += got["train"][str(r)]
        cpu[(side, r)] += got["train_cpu"][str(r)]
      infer[side] += got["inference"]

  batch = config.batch_size
  dims = flops.dims_from_config(config)
  print(f"training step, batch {batch}, {args.precision}; {args.rounds} rounds (one process per side per "
        f"round) x {args.steps} steps per ratio; img/s from the median step")
  print(f"{'mask':>5} {'ours img/s':>10} {'open_clip img/s':>15} {'ours/open_clip':>14} goal "
        f"{'ours GFLOP/s':>12} {'open_clip GFLOP/s':>17} {'cpu-time ratio':>14}")
  results = {}
  for r in args.ratios:
    ours_t = bench_utils.median(times[("ours", r)])
    theirs_t = bench_utils.median(times[("open_clip", r)])
    ratio = theirs_t / ours_t
    cpu_ratio = bench_utils.median(cpu[("open_clip", r)]) / bench_utils.median(cpu[("ours", r)])
    results[r] = dict(ours=batch / ours_t, open_clip=batch / theirs_t, ratio=ratio,
                      cpu_ratio=cpu_ratio)
    print(f"{r:>5.2f} {batch / ours_t:>10.1f} {batch / theirs_t:>15.1f} {ratio:>14.2f} "
          f"{'yes' if ratio >= GOAL_SPEED_RATIO else 'no ':>4} "
          f"{flops.train_step_flops(dims, batch, r) / ours_t / 1e9:>12.1f} "
          f"{openclip_step_flops(dims, batch, r) / theirs_t / 1e9:>17.1f} {cpu_ratio:>14.2f}")

  ours_rate = batch / bench_utils.median(infer["ours"])
  theirs_rate = batch / bench_utils.median(infer["open_clip"])
  gflop = flops.image_inference_flops(dims, batch) / 1e9
  print(f"image inference, batch {batch}, unmasked: ours {ours_rate:.1f} img/s "
        f"({gflop * ours_rate / batch:.1f} GFLOP/s), open_clip {theirs_rate:.1f} img/s "
        f"({gflop * theirs_rate / batch:.1f} GFLOP/s), ours/open_clip "
        f"{ours_rate / theirs_rate:.2f} (goal {GOAL_SPEED_RATIO}: "
        f"{'yes' if ours_rate / theirs_rate >= GOAL_SPEED_RATIO else 'no'})")
  results["inference"] = dict(ours=ours_rate, open_clip=theirs_rate,
                              ratio=ours_rate / theirs_rate)
  results["feature_diff"] = (img_diff, txt_diff)
  return results


def main(argv=None):
  return run(parse_args(argv))


if __name__ == "__main__":
  main()
