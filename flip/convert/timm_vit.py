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
(flip.models.posemb) when `--image_size` differs from the checkpoint's. A file of MAE's
pretraining model (with `decoder_*` and `mask_token`) also fills our `mae_decoder`
(flip.convert.mae_decoder; `--decoder_num_heads`, default MAE's 16), so MAE pretraining continues
from it.

Export reads the `img_encoder` (and `head`) of one of our checkpoints and writes
`<dst>/model.safetensors` (timm's names) and `<dst>/timm_kwargs.json`, the keyword arguments of
`timm.create_model(<model>, pretrained=False, **kwargs)` whose `load_state_dict(strict=True)`
matches every key; `--format=mae` writes the encoder (no head) as MAE's fine-tuning code loads it,
`<dst>/checkpoint.pth` = `{'model': state dict}` (needs torch) and `<dst>/checkpoint.safetensors`,
with the decoder in MAE's names when the checkpoint has one (what MAE's pretraining model loads).
A sin-cos encoder is exported with its table written out for `--image_size` (default 224).
Any misfit is one line naming the key or file (exit 2).
"""

import argparse
import dataclasses
import json
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple

import flax
from flax import traverse_util
import jax
import numpy as np
from safetensors import numpy as safetensors_numpy

from flip import checkpoints
from flip import paths
from flip import process_setup
from flip.convert import flip_t5x
from flip.convert import mae_decoder
from flip.convert import timm_files as files
from flip.convert import timm_mapping
from flip.models import classifier as classifier_lib
from flip.models import mae as mae_lib
from flip.models import posemb as posemb_lib

SIDECAR, TIMM_FILE, KWARGS_FILE = files.SIDECAR, files.TIMM_FILE, files.KWARGS_FILE
MAE_PTH, MAE_SAFETENSORS = files.MAE_PTH, files.MAE_SAFETENSORS
ConversionError = files.ConversionError
NamedModel, parse_model_name = files.NamedModel, files.parse_model_name
named_model = files.named_model
read_state_dict, check_empty_dst = files.read_state_dict, files.check_empty_dst
POOLS = {"token": "cls", "avg": "avg"}
MAE_SHAPE_MASK_RATIO = 0.75  # any ratio in (0, 1): the MAE model's shapes do not depend on it
DEFAULT_IMAGE_SIZE = 224  # a sin-cos encoder's export size when --image_size is not given


# --- import --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Imported:
  """Converted parameters with their axes, the encoder's (and decoder's) fields, the image size."""

  params: Dict[str, Any]
  axes: Dict[str, Any]
  fields: Dict[str, Any]
  image_size: int
  decoder_fields: Optional[Dict[str, Any]] = None


def model_shapes(fields: Mapping[str, Any], num_classes: int, image_size: int, channels: int,
                 decoder_fields: Optional[Mapping[str, Any]] = None
                 ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Parameter shapes and logical axes (no compute) of our classifier with these encoder fields
  (the head left out when num_classes is 0), or of our MAE with these decoder fields."""
  images = np.zeros((1, image_size, image_size, channels), np.float32)
  rngs = {"params": jax.random.PRNGKey(0), "masking": jax.random.PRNGKey(1)}
  if decoder_fields is not None:
    model = mae_lib.MaskedAutoencoder(img=dict(fields, mask_ratio=MAE_SHAPE_MASK_RATIO),
                                      decoder=dict(decoder_fields))
  else:
    model = classifier_lib.ViTClassifier(img=dict(fields), num_classes=max(num_classes, 1))
  variables = jax.eval_shape(lambda: model.init(rngs, images, train=False))
  params = flax.core.unfreeze(variables["params"])
  axes = flax.core.unfreeze(variables["params_axes"])
  if decoder_fields is None and not num_classes:
    params.pop("head")
    axes.pop("head")
  return params, axes


def import_state_dict(sd: Mapping[str, np.ndarray], named: NamedModel,
                      image_size: Optional[int] = None, posemb: str = "auto",
                      global_pool: Optional[str] = None, qkv_layout: str = "fused",
                      decoder_num_heads: int = mae_decoder.DEFAULT_NUM_HEADS) -> Imported:
  """A timm state dict (or MAE's, with its decoder) -> our parameters, checked against our
  model's shapes."""
  decoder_sd = {k: v for k, v in sd.items() if mae_decoder.is_decoder_key(k)}
  sd = {k: v for k, v in sd.items() if not mae_decoder.is_decoder_key(k)}
  try:
    layout = timm_mapping.layout_from_timm(sd, named.num_heads, posemb=posemb,
                                           qkv_layout=qkv_layout)
    encoder, head = timm_mapping.timm_to_ours(sd, layout)
    decoder = mae_decoder.decoder_to_ours(decoder_sd, decoder_num_heads, layout.grid,
                                          layout.cls_token, qkv_layout) if decoder_sd else None
  except (timm_mapping.MappingError, posemb_lib.PosembError) as err:
    raise ConversionError(str(err)) from None
  if decoder and head:
    raise ConversionError("the state dict has both a classification head and MAE's decoder")
  if global_pool is None:
    global_pool = "avg" if layout.pooled_norm or not layout.cls_token else "token"
  if global_pool not in POOLS:
    raise ConversionError(f"--global_pool must be one of {tuple(POOLS)}, got {global_pool!r}")
  return fit_encoder(encoder, head, layout, image_size, POOLS[global_pool], named.gelu,
                     named.layernorm_epsilon, decoder)


def fit_encoder(encoder: Dict[str, np.ndarray], head: Mapping[str, np.ndarray],
                layout: timm_mapping.VitLayout, image_size: Optional[int], pool: str, gelu: str,
                layernorm_epsilon: float,
                decoder: Optional[Tuple[Dict[str, np.ndarray], Dict[str, Any]]] = None
                ) -> Imported:
  """Our flat encoder (head, decoder) params of `layout` at `image_size` (a learned table
  resampled), checked against the shapes of our model."""
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
  decoder_params, decoder_fields = decoder if decoder else (None, None)
  shapes, axes = model_shapes(fields, layout.num_classes, image_size, layout.channels,
                              decoder_fields)
  params = {"img_encoder": encoder, **({"head": head} if head else {}),
            **({"mae_decoder": decoder_params} if decoder else {})}
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
  return Imported(params, axes, fields, image_size, decoder_fields)


def override_flags(overrides: Mapping[str, Any]) -> List[str]:
  """`--config.<key>=<value>` arguments (a list value as a tuple without spaces)."""
  return [f"--config.{k}=({','.join(map(str, v))})" if isinstance(v, list) else f"--config.{k}={v}"
          for k, v in overrides.items()]


def config_overrides(imported: Imported) -> Dict[str, Any]:
  """The `--config.<key>` values that build the imported model (model_img, decoder keys)."""
  transformer = ("num_layers", "num_heads", "mlp_dim", "gelu", "qkv_layout", "layer_scale_init")
  out = {"image_size": imported.image_size}
  for key, value in imported.fields.items():
    if key == "patch_size":
      out["model.model_img.patches.size"] = list(value)
    elif key in transformer:
      out[f"model.model_img.transformer.{key}"] = value
    else:
      out[f"model.model_img.{key}"] = value
  for key, value in (imported.decoder_fields or {}).items():
    out[f"model.decoder.{key}"] = value
  return out


def run_import(src: str, dst: str, model: Optional[str], num_heads: Optional[int] = None,
               image_size: Optional[int] = None, posemb: str = "auto",
               global_pool: Optional[str] = None, qkv_layout: str = "fused",
               gelu: Optional[str] = None,
               decoder_num_heads: int = mae_decoder.DEFAULT_NUM_HEADS) -> str:
  """The `import` command: returns the written checkpoint directory."""
  check_empty_dst(dst)
  named = named_model(model, num_heads, gelu)
  sd = read_state_dict(src)
  imported = import_state_dict(sd, named, image_size, posemb, global_pool, qkv_layout,
                               decoder_num_heads)
  return write_import(dst, imported, {"src": src, "model": model})


def write_import(dst: str, imported: Imported, meta: Mapping[str, Any]) -> str:
  """The imported params as a step-0 t5x checkpoint in `dst` plus the sidecar with the config
  overrides; returns the checkpoint directory."""
  out = flip_t5x.write_params_checkpoint(dst, imported.params, imported.axes)
  sidecar = dict(meta, config_overrides=config_overrides(imported))
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
  if fmt == "mae" and (not layout.cls_token or layout.pooled_norm
                       or not (layout.sincos or layout.cls_posemb)):
    raise ConversionError("MAE's fine-tuning loads an encoder with a class token, its position "
                          "row and the final norm; this encoder differs: use --format=timm")
  if fmt == "mae":
    if "mae_decoder" in params:
      decoder = traverse_util.flatten_dict(flax.core.unfreeze(params["mae_decoder"]), sep="/")
      try:
        sd.update(mae_decoder.decoder_to_mae(decoder, layout.grid, layout.cls_token))
      except (timm_mapping.MappingError, KeyError) as err:
        raise ConversionError(f"mae_decoder: {err}") from None
    paths.makedirs(dst)
    paths.write_bytes(paths.join(dst, MAE_SAFETENSORS), safetensors_numpy.save(sd))
    files.write_torch_checkpoint(paths.join(dst, MAE_PTH), {"model": sd},
                                 wrote=paths.join(dst, MAE_SAFETENSORS))
    return paths.join(dst, MAE_PTH)
  named_gelu = gelu or ("quick" if model and "quickgelu" in model else "exact")
  if global_pool is None:
    global_pool = "avg" if layout.pooled_norm or not layout.cls_token else "token"
  try:
    kwargs = timm_mapping.timm_kwargs(layout, POOLS.get(global_pool, global_pool), named_gelu)
  except timm_mapping.MappingError as err:
    raise ConversionError(str(err)) from None
  paths.makedirs(dst)
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
  parser.add_argument("--decoder_num_heads", type=int, default=mae_decoder.DEFAULT_NUM_HEADS,
                      help="import: heads of MAE's decoder, when the file has one")
  parser.add_argument("--format", default="timm", choices=("timm", "mae"),
                      help="export: timm's state dict or MAE's fine-tuning checkpoint")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  process_setup.configure_process()
  try:
    if args.command == "import":
      out = run_import(args.src, args.dst, args.model, args.num_heads, args.image_size,
                       args.posemb, args.global_pool, args.qkv_layout, args.gelu,
                       args.decoder_num_heads)
      overrides = json.loads(paths.read_bytes(paths.join(args.dst, SIDECAR)))["config_overrides"]
      flags_text = " ".join(override_flags(overrides))
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
