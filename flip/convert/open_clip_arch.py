"""open_clip model configs <-> our FLIP config: which architectures map, and their config keys.

An open_clip model config (the JSON of open_clip's `model_configs/`, or the `model_cfg` of an
`open_clip_config.json`) is read into an `Arch`; `flip_overrides(arch)` gives the dotted keys of
our config that build the same function (`configs/cfg_open_clip.py` applies them), and
`open_clip_model_config(arch)` writes the model config back. `arch_from_flip_config(config)` reads
an `Arch` from one of our FLIP configs, for export.

What maps (open_clip -> ours):
  vision: a plain ViT (`layers` an int, no `timm_model_name`): class token + learned position table
    with the class token's row (`cls_posemb`), patch embedding without bias (`patch_bias=False`),
    `ln_pre` unless `no_ln_pre`, `pool_type` tok -> pool "cls", avg -> "avg" (patch tokens; with
    `final_ln_after_pool` the final LayerNorm is applied to the pooled vector: `pooled_norm`),
    heads = width // head_width, mlp_dim = int(width * mlp_ratio), LayerScale from
    `ls_init_value`, LayerNorm eps from `norm_kwargs` (torch's 1e-5 by default);
  text: open_clip's TextTransformer (no `hf_model_name`): causal attention unless
    `no_causal_mask`, no padding mask (CLIP.encode_text uses none), `pool_type` argmax -> pool
    "eot", first -> "first"; the projection a bias-free matrix (`proj_type` linear, no
    `proj_bias`);
  both: GELU exact, QuickGELU with `quick_gelu`, the tanh approximation with
    `act_kwargs={"approximate": "tanh"}`; `init_logit_bias` -> the sigmoid loss's logit bias.
Refused, in one line naming the key: timm or ModifiedResNet image towers, attentional poolers,
HF text towers, HF/SigLIP tokenizers or tokenizer options, CustomTextCLIP (`custom_text`), CoCa
(`multimodal_cfg`), text `embed_cls`, text pools "last"/"eos", custom attention blocks
(`block_type`, qk_norm, scaled cosine attention, head/attention/fc scaling), non-square images or
patches, other activation or norm options. Pixel statistics: open_clip's default (OpenAI's) unless
a `preprocess_cfg` says otherwise; they must be one of `config.image_normalization`'s names.
"""

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional, Tuple

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.constants.OPENAI_DATASET_MEAN
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = {"openai": (OPENAI_MEAN, OPENAI_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
TORCH_LN_EPS = 1e-5  # torch.nn.LayerNorm's default, open_clip's unless norm_kwargs say otherwise
CLIP_VOCAB_SIZE = 49408  # open_clip's SimpleTokenizer
TOKENIZER = "open_clip"

_VISION_KNOWN = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size",
                 "ls_init_value", "patch_dropout", "no_ln_pre", "pos_embed_type",
                 "final_ln_after_pool", "pool_type", "output_tokens", "act_kwargs", "norm_kwargs"}
_TEXT_KNOWN = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
               "ls_init_value", "pad_id", "no_causal_mask", "final_ln_after_pool", "pool_type",
               "proj_type", "proj_bias", "output_tokens", "act_kwargs", "norm_kwargs",
               "tokenizer_kwargs", "eos_id"}
_TOP_KNOWN = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale",
              "init_logit_bias", "nonscalar_logit_scale"}
_UNSUPPORTED = {  # key -> what it would need
    "timm_model_name": "a timm image tower", "attentional_pool": "an attentional pooler",
    "hf_model_name": "a Hugging Face text tower", "hf_tokenizer_name": "a Hugging Face tokenizer",
    "custom_text": "CustomTextCLIP (text tower under text.*)", "multimodal_cfg": "a CoCa decoder",
    "embed_cls": "a text class embedding", "block_type": "a custom attention block",
    "qk_norm": "q/k LayerNorm", "scaled_cosine_attn": "scaled cosine attention",
    "scale_heads": "head scaling", "scale_attn_inner": "inner attention LayerNorm",
    "scale_attn": "attention LayerNorm", "scale_fc": "MLP LayerNorm",
    "tokenizer_mode": "a tokenizer mode",
}


class ArchError(ValueError):
  """An architecture that does not map, in one line naming the key."""


@dataclasses.dataclass(frozen=True)
class Tower:
  width: int
  layers: int
  heads: int
  mlp_dim: int
  gelu: str  # exact | tanh | quick
  eps: float
  layer_scale: Optional[float]


@dataclasses.dataclass(frozen=True)
class Vision(Tower):
  image_size: int
  patch_size: int
  ln_pre: bool
  pool: str  # cls | avg
  pooled_norm: bool


@dataclasses.dataclass(frozen=True)
class Text(Tower):
  context_length: int
  vocab_size: int
  causal: bool
  pool: str  # eot | first


@dataclasses.dataclass(frozen=True)
class Arch:
  embed_dim: int
  vision: Vision
  text: Text
  logit_bias: bool
  normalization: str  # a config.image_normalization name


def _square(value: Any, key: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ArchError(f"{key}={value}: only square sizes map (our config.image_size and "
                      "patches.size are one number)")
    value = value[0]
  return int(value)


def _check_flags(cfg: Mapping[str, Any], where: str, known: set) -> None:
  for key, value in cfg.items():
    if key in _UNSUPPORTED and value:
      shown = f"={value!r}" if isinstance(value, (str, bool, int, float)) else ""
      raise ArchError(f"{where}.{key}{shown}: {_UNSUPPORTED[key]} is not supported")
  for key in cfg:
    if key not in known and key not in _UNSUPPORTED:
      raise ArchError(f"{where}.{key}: an open_clip key this converter does not support")


def _gelu(cfg: Mapping[str, Any], quick: bool, where: str) -> str:
  act = cfg.get("act_kwargs") or {}
  if quick:
    if act:
      raise ArchError(f"{where}.act_kwargs={act!r} with quick_gelu is not supported")
    return "quick"
  if not act:
    return "exact"
  if dict(act) == {"approximate": "tanh"}:
    return "tanh"
  if dict(act) == {"approximate": "none"}:
    return "exact"
  raise ArchError(f"{where}.act_kwargs={act!r}: only {{'approximate': 'tanh'}} is supported")


def _eps(cfg: Mapping[str, Any], where: str) -> float:
  norm = dict(cfg.get("norm_kwargs") or {})
  eps = float(norm.pop("eps", TORCH_LN_EPS))
  if norm:
    raise ArchError(f"{where}.norm_kwargs: only eps is supported, got {sorted(norm)}")
  return eps


def _mlp_dim(width: int, ratio: float) -> int:
  return int(width * ratio)  # open_clip's ResidualAttentionBlock


def _normalization(preprocess: Mapping[str, Any], where: str) -> str:
  mean = tuple(preprocess.get("mean", OPENAI_MEAN))
  std = tuple(preprocess.get("std", OPENAI_STD))
  for name, (m, s) in NORMALIZATIONS.items():
    if all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(mean + std, m + s)):
      return name
  raise ArchError(f"{where}.mean/std {mean}/{std}: not one of config.image_normalization's "
                  f"statistics ({', '.join(NORMALIZATIONS)})")


def parse_model_config(cfg: Mapping[str, Any], where: str = "model config") -> Arch:
  """An open_clip model config (or an open_clip_config.json with `model_cfg`) -> `Arch`."""
  preprocess: Mapping[str, Any] = {}
  if "model_cfg" in cfg:
    preprocess = cfg.get("preprocess_cfg") or {}
    cfg, where = cfg["model_cfg"], f"{where} model_cfg"
  for key in ("embed_dim", "vision_cfg", "text_cfg"):
    if key not in cfg:
      raise ArchError(f"{where} has no {key!r}")
  v, t = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
  vw, tw = f"{where} vision_cfg", f"{where} text_cfg"
  _check_flags(v, vw, _VISION_KNOWN)
  _check_flags(t, tw, _TEXT_KNOWN)
  _check_flags(cfg, where, _TOP_KNOWN)
  if isinstance(v.get("layers", 12), (list, tuple)):
    raise ArchError(f"{vw}.layers={v['layers']}: a ModifiedResNet image tower is not supported")
  if v.get("pos_embed_type", "learnable") not in ("learnable", "sin_cos_2d"):
    raise ArchError(f"{vw}.pos_embed_type={v['pos_embed_type']!r} is not supported")
  pool_type = v.get("pool_type", "tok")
  if pool_type not in ("tok", "avg"):
    raise ArchError(f"{vw}.pool_type={pool_type!r}: only 'tok' and 'avg' map")
  final_ln_after_pool = bool(v.get("final_ln_after_pool", False))
  tokenizer_kwargs = t.get("tokenizer_kwargs") or {}
  if tokenizer_kwargs and dict(tokenizer_kwargs) != {"clean": "lower"}:
    raise ArchError(f"{tw}.tokenizer_kwargs={tokenizer_kwargs!r}: only open_clip's default "
                    "SimpleTokenizer (clean='lower') is supported")
  text_pool = {"argmax": "eot", "first": "first"}.get(t.get("pool_type", "argmax"))
  if text_pool is None:
    raise ArchError(f"{tw}.pool_type={t['pool_type']!r}: only 'argmax' and 'first' map")
  if t.get("proj_type", "linear") != "linear" or t.get("proj_bias", False):
    raise ArchError(f"{tw}: only a bias-free linear text projection maps (proj_type="
                    f"{t.get('proj_type', 'linear')!r}, proj_bias={t.get('proj_bias', False)})")
  quick = bool(cfg.get("quick_gelu", False))
  vwidth, twidth = int(v.get("width", 768)), int(t.get("width", 512))
  head_width = int(v.get("head_width", 64))
  if vwidth % head_width:
    raise ArchError(f"{vw}.width {vwidth} is not a multiple of head_width {head_width}")
  vision = Vision(
      width=vwidth, layers=int(v.get("layers", 12)), heads=vwidth // head_width,
      mlp_dim=_mlp_dim(vwidth, float(v.get("mlp_ratio", 4.0))), gelu=_gelu(v, quick, vw),
      eps=_eps(v, vw), layer_scale=v.get("ls_init_value"),
      image_size=_square(v.get("image_size", 224), f"{vw}.image_size"),
      patch_size=_square(v.get("patch_size", 16), f"{vw}.patch_size"),
      ln_pre=not v.get("no_ln_pre", False), pool="cls" if pool_type == "tok" else "avg",
      pooled_norm=final_ln_after_pool and pool_type == "avg")
  text = Text(
      width=twidth, layers=int(t.get("layers", 12)), heads=int(t.get("heads", 8)),
      mlp_dim=_mlp_dim(twidth, float(t.get("mlp_ratio", 4.0))), gelu=_gelu(t, quick, tw),
      eps=_eps(t, tw), layer_scale=t.get("ls_init_value"),
      context_length=int(t.get("context_length", 77)),
      vocab_size=int(t.get("vocab_size", CLIP_VOCAB_SIZE)),
      causal=not t.get("no_causal_mask", False), pool=text_pool)
  if text.vocab_size < CLIP_VOCAB_SIZE:
    raise ArchError(f"{tw}.vocab_size={text.vocab_size} is smaller than the CLIP BPE's "
                    f"{CLIP_VOCAB_SIZE} ids")
  if twidth % text.heads:
    raise ArchError(f"{tw}.width {twidth} is not divisible by heads {text.heads}")
  return Arch(embed_dim=int(cfg["embed_dim"]), vision=vision, text=text,
              logit_bias=cfg.get("init_logit_bias") is not None,
              normalization=_normalization(preprocess, f"{where} preprocess_cfg"))


def _tower_keys(prefix: str, tower: Tower) -> Dict[str, Any]:
  keys = {f"{prefix}.hidden_size": tower.width, f"{prefix}.layernorm_epsilon": tower.eps,
          f"{prefix}.transformer.num_layers": tower.layers,
          f"{prefix}.transformer.num_heads": tower.heads,
          f"{prefix}.transformer.mlp_dim": tower.mlp_dim,
          f"{prefix}.transformer.gelu": tower.gelu,
          f"{prefix}.transformer.qkv_layout": "fused"}
  if tower.layer_scale is not None:
    keys[f"{prefix}.transformer.layer_scale_init"] = float(tower.layer_scale)
  return keys


def flip_overrides(arch: Arch) -> Dict[str, Any]:
  """Dotted keys of our FLIP config (over configs/default.py) that build `arch`'s function."""
  v, t = arch.vision, arch.text
  img, txt = "model.model_img", "model.model_txt"
  return {
      "image_size": v.image_size, "image_normalization": arch.normalization,
      "aug.txt.tokenizer": TOKENIZER, "aug.txt.max_len": t.context_length,
      f"{img}.patches.size": (v.patch_size, v.patch_size), f"{img}.mask_ratio": 0.0,
      f"{img}.use_cls_token": True, f"{img}.sincos": False, f"{img}.cls_posemb": True,
      f"{img}.patch_bias": False, f"{img}.ln_pre": v.ln_pre, f"{img}.pool": v.pool,
      f"{img}.pooled_norm": v.pooled_norm, **_tower_keys(img, v),
      f"{img}.transformer.causal": False,
      f"{txt}.vocab_size": t.vocab_size, f"{txt}.pool": t.pool, f"{txt}.pad_mask": False,
      **_tower_keys(txt, t), f"{txt}.transformer.causal": t.causal,
      "model.clr.proj_dim_out": arch.embed_dim, "model.clr.proj_out_bias": False,
      "model.clr.loss": "sigmoid" if arch.logit_bias else "softmax",
      "model.clr.tau_learnable": True,
  }


# --- export: our config -> Arch -> open_clip model config ---------------------------------------

def _get(config: Any, dotted: str, default: Any = None) -> Any:
  node = config
  for part in dotted.split("."):
    if part not in node:
      return default
    node = node[part]
  return node


def _tower_from_config(config: Any, prefix: str) -> Dict[str, Any]:
  tr = f"{prefix}.transformer"
  width, heads = int(_get(config, f"{prefix}.hidden_size")), int(_get(config, f"{tr}.num_heads"))
  return dict(width=width, layers=int(_get(config, f"{tr}.num_layers")), heads=heads,
              mlp_dim=int(_get(config, f"{tr}.mlp_dim")), gelu=_get(config, f"{tr}.gelu"),
              eps=float(_get(config, f"{prefix}.layernorm_epsilon", 1e-6)),
              layer_scale=_get(config, f"{tr}.layer_scale_init"))


def arch_from_flip_config(config: Any) -> Arch:
  """The open_clip architecture of our FLIP config; what open_clip cannot express is refused."""
  img, txt = "model.model_img", "model.model_txt"
  if not _get(config, f"{img}.use_cls_token", False):
    raise ArchError(f"config.{img}.use_cls_token=False: open_clip's ViT always has a class token")
  pool = {"cls": "cls", "avg": "avg"}.get(_get(config, f"{img}.pool"))
  if pool is None:
    raise ArchError(f"config.{img}.pool={_get(config, f'{img}.pool')!r}: open_clip pools the "
                    "class token ('tok') or the patch tokens ('avg') only")
  if _get(config, f"{img}.transformer.causal", False):
    raise ArchError(f"config.{img}.transformer.causal=True: open_clip's ViT is bidirectional")
  text_pool = _get(config, f"{txt}.pool")
  if text_pool not in ("eot", "first"):
    raise ArchError(f"config.{txt}.pool={text_pool!r}: open_clip's CLIP pools 'argmax' (eot) or "
                    "'first'")
  if _get(config, f"{txt}.pad_mask", True):
    raise ArchError(f"config.{txt}.pad_mask=True: open_clip's CLIP.encode_text masks no padding")
  if _get(config, "model.clr.proj_out_bias", False):
    raise ArchError("config.model.clr.proj_out_bias=True: open_clip's image projection has no bias")
  patch = tuple(_get(config, f"{img}.patches.size"))
  image_size = int(config.image_size)
  vision = Vision(**_tower_from_config(config, img), image_size=image_size,
                  patch_size=_square(patch, f"config.{img}.patches.size"),
                  ln_pre=bool(_get(config, f"{img}.ln_pre", False)), pool=pool,
                  pooled_norm=bool(_get(config, f"{img}.pooled_norm", False)))
  text = Text(**_tower_from_config(config, txt), context_length=int(config.aug.txt.max_len),
              vocab_size=int(_get(config, f"{txt}.vocab_size")),
              causal=bool(_get(config, f"{txt}.transformer.causal", False)), pool=text_pool)
  if (vision.gelu == "quick") != (text.gelu == "quick"):
    raise ArchError(f"config.{img}.transformer.gelu={vision.gelu!r} and config.{txt}.transformer."
                    f"gelu={text.gelu!r}: open_clip's quick_gelu is one switch for both towers")
  if vision.pooled_norm and pool != "avg":
    raise ArchError(f"config.{img}.pooled_norm=True maps to open_clip's final_ln_after_pool only "
                    "with pool='avg'")
  for tower, where in ((vision, img), (text, txt)):
    if _mlp_dim(tower.width, tower.mlp_dim / tower.width) != tower.mlp_dim:
      raise ArchError(f"config.{where}.transformer.mlp_dim={tower.mlp_dim}: int(width * "
                      "mlp_ratio) cannot reproduce it")
  normalization = config.get("image_normalization", "imagenet")
  if normalization not in NORMALIZATIONS:
    raise ArchError(f"config.image_normalization={normalization!r}: no open_clip preprocess "
                    f"statistics for it (known: {', '.join(NORMALIZATIONS)})")
  return Arch(embed_dim=int(config.model.clr.proj_dim_out), vision=vision, text=text,
              logit_bias=config.model.clr.loss == "sigmoid", normalization=normalization)


def _tower_cfg(tower: Tower) -> Dict[str, Any]:
  cfg: Dict[str, Any] = {"width": tower.width, "layers": tower.layers,
                         "mlp_ratio": tower.mlp_dim / tower.width}
  if tower.layer_scale is not None:
    cfg["ls_init_value"] = float(tower.layer_scale)
  if tower.gelu == "tanh":
    cfg["act_kwargs"] = {"approximate": "tanh"}
  if tower.eps != TORCH_LN_EPS:
    cfg["norm_kwargs"] = {"eps": tower.eps}
  return cfg


def open_clip_model_config(arch: Arch, init_logit_bias: Optional[float] = None) -> Dict[str, Any]:
  """The open_clip model config (model_configs/*.json format) of `arch`."""
  v, t = arch.vision, arch.text
  vision = {"image_size": v.image_size, "patch_size": v.patch_size,
            "head_width": v.width // v.heads, **_tower_cfg(v)}
  if not v.ln_pre:
    vision["no_ln_pre"] = True
  if v.pool == "avg":
    vision["pool_type"] = "avg"
    vision["final_ln_after_pool"] = v.pooled_norm
  text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "heads": t.heads,
          **_tower_cfg(t)}
  if not t.causal:
    text["no_causal_mask"] = True
  if t.pool == "first":
    text["pool_type"] = "first"
  cfg: Dict[str, Any] = {"embed_dim": arch.embed_dim, "vision_cfg": vision, "text_cfg": text}
  if v.gelu == "quick":
    cfg["quick_gelu"] = True
  if arch.logit_bias:
    cfg["init_logit_bias"] = float(init_logit_bias if init_logit_bias is not None else -10.0)
  return cfg


def preprocess_stats(arch: Arch) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
  """(mean, std) in 0..1 units that open_clip's preprocessing must use for `arch`."""
  return NORMALIZATIONS[arch.normalization]
