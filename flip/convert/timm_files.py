"""Files and names of the timm / MAE converters: state-dict files in and out (torch only for
`.bin` / `.pth` / `.pt`, imported when such a file is read or written), what a timm ViT name says
beyond the tensors, the converters' error type and output names.
"""

import dataclasses
import re
from typing import Any, Dict, Mapping, Optional

import numpy as np
from safetensors import numpy as safetensors_numpy

from flip import paths

TORCH_SUFFIXES = (".bin", ".pth", ".pt")
SIDECAR = "timm_import.json"
TIMM_FILE, KWARGS_FILE = "model.safetensors", "timm_kwargs.json"
MAE_PTH, MAE_SAFETENSORS = "checkpoint.pth", "checkpoint.safetensors"
HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16, "giant": 16,
         "gigantic": 16}
_NAME = re.compile(r"^vit_(?P<size>[a-z]+)_patch(?P<patch>\d+)(?P<rest>[a-z_]*?)_(?P<res>\d+)"
                   r"(\.[\w-]+)?$")


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
    raise ConversionError(f"--model {name!r} is not a timm ViT name "
                          "vit_<size>_patch<p>_<res>[.tag] "
                          f"with size one of {tuple(HEADS)}: give --num_heads")
  clip = "clip" in match["rest"]
  return NamedModel(num_heads=HEADS[match["size"]],
                    gelu="quick" if "quickgelu" in match["rest"] else "exact",
                    layernorm_epsilon=1e-5 if clip else 1e-6)


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


def write_torch_checkpoint(path: str, tree: Mapping[str, Any], wrote: str = "") -> None:
  """`tree` ({name: numpy array} dicts, nested) saved with torch.save; without torch a one-line
  ConversionError (naming `wrote`, what was written before)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top (optional, only for torch files)
  except ImportError:
    done = f"wrote {wrote}; " if wrote else ""
    raise ConversionError(f"{done}{path} needs torch, which is not importable") from None

  def to_torch(x):
    return {k: to_torch(v) for k, v in x.items()} if isinstance(x, Mapping) else torch.from_numpy(x)

  with paths.open_file(path, "wb") as f:
    torch.save(to_torch(tree), f)
