"""timm / MAE ViT weights in and out: `import` to a `pretrain_dir`, `export` to timm or MAE files.

    python -m flip.convert.timm_vit import --src=<state dict> --model=<timm name> --dst=<new dir>
        [--image_size=N] [--posemb=auto|sincos|learned] [--global_pool=token|avg]
        [--qkv_layout=fused|separate] [--num_heads=H] [--gelu=exact|tanh|quick]
    python -m flip.convert.timm_vit export --src=<our checkpoint or workdir> --dst=<new dir>
        [--format=timm|mae] [--model=<timm name>] [--image_size=N] [--global_pool=token|avg]
        [--gelu=exact|tanh|quick]

Import reads a timm `VisionTransformer` state dict (`.safetensors`, or `.bin` / `.pth` / `.pt`
through `torch.load(weights_only=True)`: tensors only, never code; MAE's `{'model': ...}` wrapper is
accepted) and writes a t5x checkpoint holding `img_encoder` (and `head` when the file has one) in
our layout (flip.convert.timm_mapping), plus `timm_import.json` with the `--config` overrides that
build the same model; `--config.pretrain_dir=<dst>` with those overrides loads it into the MAE,
linear-probe and fine-tuning tasks (the encoder) or evaluates it as a classifier (`eval_only`).
The architecture is read off the tensors; the head count (which the tensors do not give), the
activation and the LayerNorm epsilon come from `--model` (timm's ViT names: vit_<size>_patch<p>
[_clip][_quickgelu]_<res>[.tag]) or `--num_heads`. Position embeddings: MAE's fixed sin-cos table
(stored with a zero class row) is checked against the table our model computes and imported as
`sincos=True` (the MAE encoder exactly, nothing learned); any other table is imported as a learned
table (`sincos=False`, `cls_posemb=True` when it has a class row) and resampled as timm does
(flip.models.posemb) when `--image_size` differs from the checkpoint's.

Export reads the `img_encoder` (and `head`) of one of our checkpoints and writes
`<dst>/model.safetensors` (timm's names) and `<dst>/timm_kwargs.json`, the keyword arguments of
`timm.create_model(<model>, pretrained=False, **kwargs)` whose `load_state_dict(strict=True)`
matches every key; `--format=mae` writes the encoder (no head) as MAE's fine-tuning code loads it,
`<dst>/checkpoint.pth` = `{'model': state dict}` (needs torch) and `<dst>/checkpoint.safetensors`.
A sin-cos encoder is exported with its table written out for `--image_size` (default 224).
Any misfit is one line naming the key or file (exit 2).
"""

import argparse
import dataclasses
import json
import re
import sys
from typing import Any, Dict, Mapping, Optional, Tuple

import flax
from flax import traverse_util
import jax
import numpy as np
from safetensors import numpy as safetensors_numpy

from flip import checkpoints
from flip import paths
from flip import process_setup
from flip.convert import flip_t5x
from flip.convert import timm_mapping
from flip.models import classifier as classifier_lib
from flip.models import posemb as posemb_lib

TORCH_SUFFIXES = (".bin", ".pth", ".pt")
SIDECAR = "timm_import.json"
TIMM_FILE, KWARGS_FILE = "model.safetensors", "timm_kwargs.json"
MAE_PTH, MAE_SAFETENSORS = "checkpoint.pth", "checkpoint.safetensors"
HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16, "giant": 16,
         "gigantic": 16}
_NAME = re.compile(r"^vit_(?P<size>[a-z]+)_patch(?P<patch>\d+)(?P<rest>[a-z_]*?)_(?P<res>\d+)"
                   r"(\.[\w-]+)?$")
POOLS = {"token": "cls", "avg": "avg"}
DEFAULT_IMAGE_SIZE = 224  # a sin-cos encoder's export size when --image_size is not given


class ConversionError(ValueError):
  """A file or checkpoint that does not convert, in one line naming the key or file."""


@dataclasses.dataclass(frozen=True)
class NamedModel:
  """What a timm ViT name says beyond the tensors."""

  num_heads: int
  gelu: str
  layernorm_epsilon: float


def parse_model_name(name: str) -> NamedModel:
  """timm's vit_<size>_patch<p>[_clip][_quickgelu]_<res>[.tag] -> heads, activation, epsilon."""
  match = _NAME.match(name or "")
  if not match or match["size"] not in HEADS:
    raise ConversionError(f"--model {name!r} is not a timm ViT name vit_<size>_patch<p>_<res>[.tag] "
                          f"with size one of {tuple(HEADS)}: give --num_heads")
  clip = "clip" in match["rest"]
  return NamedModel(num_heads=HEADS[match["size"]],
                    gelu="quick" if "quickgelu" in match["rest"] else "exact",
                    layernorm_epsilon=1e-5 if clip else 1e-6)


# --- files ---------------------------------------------------------------------------------------

def read_state_dict(src: str) -> Dict[str, np.ndarray]:
  """A state dict file -> {name: float32/int numpy array} (torch only for .bin/.pth/.pt)."""
  if not paths.exists(src):
    raise ConversionError(f"--src {src} does not exist")
  if src.endswith(".safetensors"):
    try:
      return dict(safetensors_numpy.load(paths.read_bytes(src)))
    except Exception as err:  # pylint: disable=broad-except (safetensors raises several types)
      raise ConversionError(f"{src} is not a readable safetensors file: {_line(err)}") from None
  if not src.endswith(TORCH_SUFFIXES):
    raise ConversionError(f"--src {src}: expected .safetensors or one of {TORCH_SUFFIXES}")
  try:
    import torch  # pylint: disable=g-import-not-at-top (optional, only for torch files)
  except ImportError:
    raise ConversionError(f"reading {src} needs torch (or convert it to .safetensors)") from None
  try:
    with paths.open_file(src, "rb") as f:
      loaded = torch.load(f, map_location="cpu", weights_only=True)
  except Exception as err:  # pylint: disable=broad-except (torch raises several types)
    raise ConversionError(f"{src} is not a tensors-only torch file: {_line(err)}") from None
  if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
    loaded = loaded["model"]
  if not isinstance(loaded, Mapping):
    raise ConversionError(f"{src} holds a {type(loaded).__name__}, not a state dict")
  out = {}
  for key, value in loaded.items():
    if not isinstance(value, torch.Tensor):
      raise ConversionError(f"{src}: {key} is a {type(value).__name__}, not a tensor")
    value = value.detach().cpu()
    out[key] = (value.float() if value.is_floating_point() else value).numpy()
  return out


def _line(err: BaseException) -> str:
  return " ".join(str(err).split())[:300] or type(err).__name__


def check_empty_dst(dst: str) -> None:
  if paths.exists(dst) and paths.listdir(dst):
    raise ConversionError(f"--dst {dst} is not empty")


# --- import --------------------------------------------------------------------------------------

def model_shapes(fields: Mapping[str, Any], num_classes: int, image_size: int,
                 channels: int) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Parameter shapes and logical axes of our classifier with these encoder fields (no compute);
  without a head (num_classes 0) the head is left out."""
  model = classifier_lib.ViTClassifier(img=dict(fields), num_classes=max(num_classes, 1))
  images = np.zeros((1, image_size, image_size, channels), np.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
  params, axes = flax.core.unfreeze(variables["params"]), flax.core.unfreeze(variables["params_axes"])
  if not num_classes:
    params.pop("head")
    axes.pop("head")
  return params, axes


def import_state_dict(sd: Mapping[str, np.ndarray], named: NamedModel,
                      image_size: Optional[int] = None, posemb: str = "auto",
                      global_pool: Optional[str] = None, qkv_layout: str = "fused"
                      ) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any], int]:
  """timm state dict -> (our params {img_encoder[, head]}, their axes, encoder fields, image
  size), checked against our model's shapes."""
  try:
    layout = timm_mapping.layout_from_timm(sd, named.num_heads, posemb=posemb,
                                           qkv_layout=qkv_layout)
    encoder, head = timm_mapping.timm_to_ours(sd, layout)
  except (timm_mapping.MappingError, posemb_lib.PosembError) as err:
    raise ConversionError(str(err)) from None
  if global_pool is None:
    global_pool = "avg" if layout.pooled_norm or not layout.cls_token else "token"
  if global_pool not in POOLS:
    raise ConversionError(f"--global_pool must be one of {tuple(POOLS)}, got {global_pool!r}")
  return fit_encoder(encoder, head, layout, image_size, POOLS[global_pool], named.gelu,
                     named.layernorm_epsilon)


def fit_encoder(encoder: Dict[str, np.ndarray], head: Mapping[str, np.ndarray],
                layout: timm_mapping.VitLayout, image_size: Optional[int], pool: str, gelu: str,
                layernorm_epsilon: float
                ) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any], int]:
  """Our flat encoder (and head) params of `layout` at `image_size` (a learned table resampled)
  -> (params {img_encoder[, head]}, their axes, encoder fields, image size), checked against the
  shapes of our model."""
  if image_size is None:
    image_size = layout.grid[0] * layout.patch[0]
  if image_size % layout.patch[0] or layout.patch[0] != layout.patch[1]:
    raise ConversionError(f"--image_size {image_size} is not a multiple of the patch "
                          f"{layout.patch}")
  new_grid = (image_size // layout.patch[0],) * 2
  if new_grid != layout.grid and not layout.sincos:
    encoder["pos_embedding"] = posemb_lib.resample(
        encoder["pos_embedding"], new_grid, 1 if layout.cls_posemb else 0, layout.grid)
  layout = dataclasses.replace(layout, grid=new_grid)
  fields = timm_mapping.vit_fields(layout, pool, gelu, layernorm_epsilon)
  shapes, axes = model_shapes(fields, layout.num_classes, image_size, layout.channels)
  params = {"img_encoder": encoder, **({"head": head} if head else {})}
  flat = traverse_util.flatten_dict(params, sep="/")
  flat_shapes = traverse_util.flatten_dict(shapes, sep="/")
  misshaped = [f"{k} {tuple(np.shape(v))} vs the model's {tuple(flat_shapes[k].shape)}"
               for k, v in sorted(flat.items()) if k in flat_shapes
               and tuple(np.shape(v)) != tuple(flat_shapes[k].shape)]
  missing, extra = sorted(set(flat_shapes) - set(flat)), sorted(set(flat) - set(flat_shapes))
  if misshaped or missing or extra:
    raise ConversionError("the converted tensors do not fit the model: " + "; ".join(
        misshaped[:3] + [f"missing {k}" for k in missing[:3]] + [f"extra {k}" for k in extra[:3]]))
  params = traverse_util.unflatten_dict(
      {k: np.asarray(v, flat_shapes[k].dtype) for k, v in flat.items()}, sep="/")
  return params, axes, fields, image_size


def config_overrides(fields: Mapping[str, Any], image_size: int) -> Dict[str, Any]:
  """The `--config.<key>` values that build the imported encoder (model_img keys)."""
  transformer = ("num_layers", "num_heads", "mlp_dim", "gelu", "qkv_layout", "layer_scale_init")
  out = {"image_size": image_size}
  for key, value in fields.items():
    if key == "patch_size":
      out["model.model_img.patches.size"] = list(value)
    elif key in transformer:
      out[f"model.model_img.transformer.{key}"] = value
    else:
      out[f"model.model_img.{key}"] = value
  return out


def named_model(model: Optional[str], num_heads: Optional[int] = None,
                gelu: Optional[str] = None) -> NamedModel:
  """What `--model` says, with `--num_heads` / `--gelu` taking precedence."""
  if model:
    named = parse_model_name(model) if not num_heads else NamedModel(
        num_heads, "quick" if "quickgelu" in model else "exact", 1e-5 if "clip" in model else 1e-6)
  elif num_heads:
    named = NamedModel(num_heads, "exact", 1e-6)
  else:
    raise ConversionError("give --model (a timm ViT name) or --num_heads")
  return dataclasses.replace(named, gelu=gelu) if gelu else named


def run_import(src: str, dst: str, model: Optional[str], num_heads: Optional[int] = None,
               image_size: Optional[int] = None, posemb: str = "auto",
               global_pool: Optional[str] = None, qkv_layout: str = "fused",
               gelu: Optional[str] = None) -> str:
  """The `import` command: returns the written checkpoint directory."""
  check_empty_dst(dst)
  named = named_model(model, num_heads, gelu)
  sd = read_state_dict(src)
  params, axes, fields, image_size = import_state_dict(sd, named, image_size, posemb, global_pool,
                                                       qkv_layout)
  return write_import(dst, params, axes, fields, image_size, {"src": src, "model": model})


def write_import(dst: str, params: Mapping[str, Any], axes: Mapping[str, Any],
                 fields: Mapping[str, Any], image_size: int, meta: Mapping[str, Any]) -> str:
  """The imported params as a step-0 t5x checkpoint in `dst` plus the sidecar with the config
  overrides; returns the checkpoint directory."""
  out = flip_t5x.write_params_checkpoint(dst, params, axes)
  sidecar = dict(meta, config_overrides=config_overrides(fields, image_size))
  paths.write_bytes(paths.join(dst, SIDECAR), json.dumps(sidecar, indent=1).encode())
  return out


# --- export --------------------------------------------------------------------------------------

def export_params(params: Mapping[str, Any], image_size: Optional[int], with_head: bool = True
                  ) -> Tuple[Dict[str, np.ndarray], timm_mapping.VitLayout]:
  """Our params ({img_encoder[, head], ...}) -> (timm state dict, layout)."""
  if "img_encoder" not in params:
    raise ConversionError(f"the checkpoint has no img_encoder parameters (top-level modules: "
                          f"{', '.join(sorted(params))})")
  encoder = traverse_util.flatten_dict(flax.core.unfreeze(params["img_encoder"]), sep="/")
  head = None
  if with_head and "head" in params:
    head = traverse_util.flatten_dict(flax.core.unfreeze(params["head"]), sep="/")
  try:
    patch = np.shape(encoder.get("embedding/kernel", np.zeros((1,))))[0]
    grid = (image_size // patch,) * 2 if image_size else None
    if "pos_embedding" not in encoder:
      layout = timm_mapping.layout_from_ours(
          encoder, head, grid or (DEFAULT_IMAGE_SIZE // patch,) * 2)
    else:
      layout = timm_mapping.layout_from_ours(encoder, head, None)
      if grid is not None and grid != layout.grid:
        encoder = dict(encoder, pos_embedding=posemb_lib.resample(
            encoder["pos_embedding"], grid, 1 if layout.cls_posemb else 0, layout.grid))
        layout = dataclasses.replace(layout, grid=grid)
    sd = timm_mapping.ours_to_timm(encoder, head, layout)
  except (timm_mapping.MappingError, posemb_lib.PosembError) as err:
    raise ConversionError(str(err)) from None
  return {k: np.array(v, np.float32) for k, v in sd.items()}, layout


def run_export(src: str, dst: str, fmt: str = "timm", model: Optional[str] = None,
               image_size: Optional[int] = None, global_pool: Optional[str] = None,
               gelu: Optional[str] = None) -> str:
  """The `export` command: returns the main file written."""
  check_empty_dst(dst)
  params = checkpoints.load_params_tree(src)
  if fmt not in ("timm", "mae"):
    raise ConversionError(f"--format must be timm or mae, got {fmt!r}")
  sd, layout = export_params(params, image_size, with_head=(fmt == "timm"))
  paths.makedirs(dst)
  if fmt == "mae":
    if not layout.cls_token or layout.pooled_norm or not (layout.sincos or layout.cls_posemb):
      raise ConversionError("MAE's fine-tuning loads an encoder with a class token, its position "
                            "row and the final norm; this encoder differs")
    paths.write_bytes(paths.join(dst, MAE_SAFETENSORS), safetensors_numpy.save(sd))
    try:
      import torch  # pylint: disable=g-import-not-at-top (optional)
    except ImportError:
      raise ConversionError(f"wrote {paths.join(dst, MAE_SAFETENSORS)}; {MAE_PTH} needs torch, "
                            "which is not importable") from None
    with paths.open_file(paths.join(dst, MAE_PTH), "wb") as f:
      torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, f)
    return paths.join(dst, MAE_PTH)
  named_gelu = gelu or ("quick" if model and "quickgelu" in model else "exact")
  if global_pool is None:
    global_pool = "avg" if layout.pooled_norm or not layout.cls_token else "token"
  try:
    kwargs = timm_mapping.timm_kwargs(layout, POOLS.get(global_pool, global_pool), named_gelu)
  except timm_mapping.MappingError as err:
    raise ConversionError(str(err)) from None
  paths.write_bytes(paths.join(dst, TIMM_FILE), safetensors_numpy.save(sd))
  paths.write_bytes(paths.join(dst, KWARGS_FILE),
                    json.dumps({"model": model, "kwargs": kwargs}, indent=1).encode())
  return paths.join(dst, TIMM_FILE)


def parse_args(argv) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m flip.convert.timm_vit",
                                   description="timm / MAE ViT weights in and out")
  parser.add_argument("command", choices=("import", "export"))
  parser.add_argument("--src", required=True,
                      help="import: a timm state dict; export: our checkpoint or workdir")
  parser.add_argument("--dst", required=True, help="a new (empty) directory")
  parser.add_argument("--model", help="timm model name, e.g. vit_base_patch16_224.mae")
  parser.add_argument("--num_heads", type=int, help="attention heads (default: from --model)")
  parser.add_argument("--image_size", type=int, help="target image size (default: the source's)")
  parser.add_argument("--posemb", default="auto", choices=timm_mapping.POSEMB_KINDS,
                      help="import: how to take pos_embed")
  parser.add_argument("--global_pool", choices=tuple(POOLS),
                      help="token | avg (default: avg with fc_norm or without a class token)")
  parser.add_argument("--qkv_layout", default="fused", choices=("fused", "separate"),
                      help="import: our attention parameter layout")
  parser.add_argument("--gelu", choices=tuple(timm_mapping.TIMM_ACT),
                      help="the activation (default: from --model, else exact)")
  parser.add_argument("--format", default="timm", choices=("timm", "mae"),
                      help="export: timm's state dict or MAE's fine-tuning checkpoint")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  process_setup.configure_process()
  try:
    if args.command == "import":
      out = run_import(args.src, args.dst, args.model, args.num_heads, args.image_size,
                       args.posemb, args.global_pool, args.qkv_layout, args.gelu)
      overrides = json.loads(paths.read_bytes(paths.join(args.dst, SIDECAR)))["config_overrides"]
      flags_text = " ".join(f"--config.{k}={json.dumps(v) if isinstance(v, list) else v}"
                            for k, v in overrides.items())
      print(f"wrote {out}; use it as --config.pretrain_dir={args.dst} {flags_text}")
    else:
      out = run_export(args.src, args.dst, args.format, args.model, args.image_size,
                       args.global_pool, args.gelu)
      print(f"wrote {out}")
  except (ConversionError, checkpoints.CheckpointError) as err:
    print(f"flip.convert.timm_vit: {err}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
