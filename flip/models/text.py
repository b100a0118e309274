"""Text transformer (FLIP's text tower): token + learned position embedding, a bidirectional
pre-norm transformer, and first-token pooling.

The token table is `vocab_size` rounded up to a multiple of VOCAB_ROW_MULTIPLE rows (see there).
`pad_mask=False` is FLIP's tower: no attention mask at all (padding tokens are attended to like
any other, so the features depend on the padded length). `pad_mask=True` (ours) masks padding
(id 0) out of every attention, so appending pad tokens never changes the features of the real
tokens. FLIP's tokenizer adds no [CLS], so the pooled feature is the encoded first word
(`pool="first"`, FLIP's `txt_avg_token=False`); `pool="avg"` averages the real (non-pad) tokens;
`pool="eot"` takes the token at the position of each row's largest id (open_clip's argmax pooling:
CLIP's BPE gives end-of-text the largest id). With `transformer.causal` every position attends only
to itself and earlier ones (open_clip's text tower).
"""

from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from flip.models import layers
from flip.models import precision

Array = jax.Array

PAD_ID = 0
POOLS = ("first", "avg", "eot")
EMBEDDING_INIT_STDDEV = 0.02
# The token table gets rows up to a multiple of this, so its `vocab` axis divides evenly over any
# power-of-two model-parallel size (t5x's rules shard `vocab` over `model`; FLIP's 30523 is odd).
# Ids >= vocab_size never occur, so the extra rows receive no gradient and only weight decay.
VOCAB_ROW_MULTIPLE = 128


def padded_vocab_rows(vocab_size: int) -> int:
  return -(-vocab_size // VOCAB_ROW_MULTIPLE) * VOCAB_ROW_MULTIPLE


class TextTransformer(layers.EncoderFields):
  """Encodes int token ids [B, L] (pad = 0) into pooled features [B, D] and tokens [B, L, D]."""

  # The stack's fields come from layers.EncoderFields; these three with this tower's defaults.
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072

  vocab_size: int = 30523
  max_len: int = 32
  hidden_size: int = 768
  pool: str = "first"
  pad_mask: bool = True

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
    x = precision.add_param(x, posemb[:, :length], self.dtype)
    x = layers.with_sharding_constraint(x, ("batch", "length", "embed"))
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)

    x = layers.encoder_of(self)(x, key_mask if self.pad_mask else None, train=train)

    if self.pool == "first":
      pooled = x[:, 0]
    elif self.pool == "eot":
      pooled = jnp.take_along_axis(x, jnp.argmax(tokens, axis=1)[:, None, None], axis=1)[:, 0]
    else:
      weights = key_mask.astype(jnp.float32)[:, :, None]
      pooled = (jnp.sum(x.astype(jnp.float32) * weights, axis=1) /
                jnp.maximum(jnp.sum(weights, axis=1), 1.0)).astype(self.dtype)
    return {"pooled": pooled, "tokens": x}


def text_kwargs_from_config(txt_config: Any, max_len: int,
                            dtype: Any = jnp.float32) -> Dict[str, Any]:
  """`config.model.model_txt` (FLIP's key names) + `config.aug.txt.max_len` -> fields."""
  return layers.checked_fields(TextTransformer, dict(
      layers.config_fields(txt_config.transformer, layers.ENCODER_CONFIG_KEYS),
      **layers.present_config_fields(txt_config.transformer, layers.ENCODER_OPTIONAL_CONFIG_KEYS),
      max_len=max_len,
      **layers.config_fields(txt_config, ("vocab_size", "hidden_size", "pool",
                                          "layernorm_epsilon")),
      **layers.present_config_fields(txt_config, ("pad_mask",)),
      dtype=dtype))
