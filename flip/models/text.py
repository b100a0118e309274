"""Text transformer (FLIP's text tower): token + learned position embedding, a bidirectional
pre-norm transformer with a key padding mask, and first-token pooling.

The token table is `vocab_size` rounded up to a multiple of VOCAB_ROW_MULTIPLE rows (see there).
Padding (id 0) is masked out of every attention, so appending pad tokens never changes the
features of the real tokens; FLIP's tokenizer adds no [CLS], so the pooled feature is the encoded
first word (`pool="first"`, FLIP's `txt_avg_token=False`); `pool="avg"` averages the real tokens.
"""

import dataclasses
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from flip.models import layers

Array = jax.Array

PAD_ID = 0
POOLS = ("first", "avg")
EMBEDDING_INIT_STDDEV = 0.02
# The token table gets rows up to a multiple of this, so its `vocab` axis divides evenly over any
# power-of-two model-parallel size (t5x's rules shard `vocab` over `model`; FLIP's 30523 is odd).
# Ids >= vocab_size never occur, so the extra rows receive no gradient and only weight decay.
VOCAB_ROW_MULTIPLE = 128


def padded_vocab_rows(vocab_size: int) -> int:
  return -(-vocab_size // VOCAB_ROW_MULTIPLE) * VOCAB_ROW_MULTIPLE


class TextTransformer(nn.Module):
  """Encodes int token ids [B, L] (pad = 0) into pooled features [B, D] and tokens [B, L, D]."""

  vocab_size: int = 30523
  max_len: int = 32
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  droppath_rate: float = 0.0
  remat_policy: str = "none"
  pool: str = "first"
  layernorm_epsilon: float = 1e-6
  gelu: str = "exact"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array, *, train: bool) -> Dict[str, Array]:
    layers.check_choice("text pool", self.pool, POOLS)
    length = tokens.shape[1]
    if length > self.max_len:
      raise ValueError(f"text length {length} exceeds max_len {self.max_len}")
    key_mask = tokens != PAD_ID

    embedding = layers.param_with_axes(
        "token_embedding", nn.initializers.normal(stddev=EMBEDDING_INIT_STDDEV),
        (padded_vocab_rows(self.vocab_size), self.hidden_size), jnp.float32,
        axes=("vocab", "embed"))
    x = jnp.take(embedding, tokens, axis=0).astype(self.dtype)
    posemb = layers.param_with_axes(
        "pos_embedding", nn.initializers.normal(stddev=EMBEDDING_INIT_STDDEV),
        (1, self.max_len, self.hidden_size), jnp.float32, axes=("_null0", "length", "embed"))
    x = x + posemb[:, :length].astype(self.dtype)
    x = layers.with_sharding_constraint(x, ("batch", "length", "embed"))
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)

    x = layers.Encoder(
        num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        droppath_rate=self.droppath_rate, remat_policy=self.remat_policy,
        layernorm_epsilon=self.layernorm_epsilon, gelu=self.gelu, dtype=self.dtype,
        name="Transformer")(x, key_mask, train=train)

    if self.pool == "first":
      pooled = x[:, 0]
    else:
      weights = key_mask.astype(jnp.float32)[:, :, None]
      pooled = (jnp.sum(x.astype(jnp.float32) * weights, axis=1) /
                jnp.maximum(jnp.sum(weights, axis=1), 1.0)).astype(self.dtype)
    return {"pooled": pooled, "tokens": x}


def text_kwargs_from_config(txt_config: Any, max_len: int,
                            dtype: Any = jnp.float32) -> Dict[str, Any]:
  """`config.model.model_txt` (FLIP's key names) + `config.aug.txt.max_len` -> fields."""
  transformer = txt_config.transformer
  kwargs = dict(
      vocab_size=txt_config.vocab_size,
      max_len=max_len,
      hidden_size=txt_config.hidden_size,
      num_layers=transformer.num_layers,
      num_heads=transformer.num_heads,
      mlp_dim=transformer.mlp_dim,
      dropout_rate=transformer.dropout_rate,
      attention_dropout_rate=transformer.attention_dropout_rate,
      droppath_rate=transformer.droppath_rate,
      remat_policy=transformer.remat_policy,
      pool=txt_config.pool,
      layernorm_epsilon=txt_config.layernorm_epsilon,
      gelu=transformer.gelu,
      dtype=dtype,
  )
  field_names = {f.name for f in dataclasses.fields(TextTransformer)}
  assert set(kwargs) <= field_names, set(kwargs) - field_names
  return kwargs
