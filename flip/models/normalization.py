"""Pixel normalisation of every image model: the `config.image_normalization` key's statistics.

Images stay uint8 (0..255) until the device; the encoders compute (x - mean) / std per channel
with the statistics named here, in 0..255 units:
- `imagenet`: torchvision's ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225),
  FLIP's and MAE's;
- `cc12m`: M3AE's CC12M statistics, mean (0.5762, 0.5503, 0.5213), std (0.3207, 0.3169, 0.3307);
- `openai`: OpenAI CLIP's, mean (0.48145466, 0.4578275, 0.40821073), std (0.26862954, 0.26130258,
  0.27577711), which open_clip's models trained from or like OpenAI's expect.
A model and every task that loads it (probe, fine-tuning, reconstruction targets) must use the
same name; configs without the key use `imagenet`.
"""

from typing import Any, Dict, Mapping, Tuple

from flip import config as config_lib

DEFAULT = "imagenet"
_UNIT_STATS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cc12m": ((0.5762, 0.5503, 0.5213), (0.3207, 0.3169, 0.3307)),
    "openai": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}
NAMES = tuple(_UNIT_STATS)
PixelStats = Tuple[Tuple[float, ...], Tuple[float, ...]]


def stats_by_name(name: str) -> PixelStats:
  """(mean, std) in 0..255 units of a normalisation name, or a one-line ConfigError."""
  if name not in _UNIT_STATS:
    raise config_lib.ConfigError(f"config.image_normalization={name!r} is not one of {NAMES}")
  mean, std = _UNIT_STATS[name]
  return tuple(m * 255 for m in mean), tuple(s * 255 for s in std)


def pixel_stats(config: Any) -> PixelStats:
  """(mean, std) in 0..255 units of `config.image_normalization` (default `imagenet`)."""
  return stats_by_name(config.get("image_normalization", DEFAULT))


def with_pixel_stats(img_kwargs: Mapping[str, Any], config: Any) -> Dict[str, Any]:
  """Image-encoder fields (flip.models.vit.vit_kwargs_from_config) with the config's statistics."""
  mean, std = pixel_stats(config)
  return {**img_kwargs, "pixel_mean": mean, "pixel_std": std}
