"""The filter language of `config.laion_filter` and its tf predicates on parsed examples.

"similarity>=0.28,NSFW!=NSFW": comma-separated conditions on img2dataset's extra columns, all of
which must hold; `==` `!=` for strings, `<` `<=` `>` `>=` `==` `!=` for numbers. An example without
the column fails the condition and is counted as `filtered`. TFRecord columns are read as
Example features (typed from the first record of a source: float or int64); webdataset columns
are read from the sample's KEY.json by pattern (img2dataset writes flat JSON).
"""

import dataclasses
import re
from typing import Callable, Dict, Mapping, Sequence, Tuple, Union

from absl import logging
import tensorflow as tf

from flip.data.laion_contract import LaionDataError

FILTER_PATTERN = re.compile(r"^\s*([A-Za-z_][\w\-]*)\s*(==|!=|>=|<=|>|<)\s*(.*?)\s*$")
STRING_FILTER_OPS = ("==", "!=")


@dataclasses.dataclass(frozen=True)
class Condition:
  """One `column op value` test on an extra column."""
  column: str
  op: str
  value: Union[float, str]

  @property
  def numeric(self) -> bool:
    return isinstance(self.value, float)


def parse_filter(spec: str) -> Tuple[Condition, ...]:
  """Parses "similarity>=0.28,NSFW!=NSFW" into conditions (all must hold)."""
  conditions = []
  for part in filter(None, (p.strip() for p in (spec or "").split(","))):
    match = FILTER_PATTERN.match(part)
    if not match:
      raise LaionDataError(f"config.laion_filter: cannot parse condition {part!r} "
                           "(expected e.g. 'similarity>=0.28' or 'NSFW!=NSFW')")
    column, op, raw = match.groups()
    raw = raw.strip("'\"")
    try:
      value: Union[float, str] = float(raw)
    except ValueError:
      if op not in STRING_FILTER_OPS:
        raise LaionDataError(f"config.laion_filter: {part!r} compares the string {raw!r} with "
                             f"{op}; strings support only == and !=") from None
      value = raw
    conditions.append(Condition(column, op, value))
  return tuple(conditions)


def condition_holds(condition: Condition, value: tf.Tensor, present: tf.Tensor) -> tf.Tensor:
  """Whether `value` (of a column that is `present`) meets the condition."""
  ops = {"==": tf.equal, "!=": tf.not_equal, ">=": tf.greater_equal, "<=": tf.less_equal,
         ">": tf.greater, "<": tf.less}
  target = (tf.constant(condition.value, tf.float64) if condition.numeric
            else tf.constant(condition.value.encode("utf-8")))
  return present & ops[condition.op](value, target)


def json_column(json_text: tf.Tensor, condition: Condition) -> Tuple[tf.Tensor, tf.Tensor]:
  """(value, present) of a column in webdataset's KEY.json, by pattern (flat img2dataset JSON)."""
  column = re.escape(condition.column)
  if condition.numeric:
    pattern = rf'(?s).*"{column}"\s*:\s*(-?[0-9][0-9.eE+\-]*).*'
    present = tf.strings.regex_full_match(json_text, pattern)
    raw = tf.where(present, tf.strings.regex_replace(json_text, pattern, r"\1"), b"0")
    return tf.strings.to_number(raw, tf.float64), present
  pattern = rf'(?s).*"{column}"\s*:\s*"([^"\\]*)".*'
  present = tf.strings.regex_full_match(json_text, pattern)
  return tf.where(present, tf.strings.regex_replace(json_text, pattern, r"\1"), b""), present


def tfrecord_filter_specs(conditions: Sequence[Condition],
                          first_file: str) -> Dict[str, tf.io.VarLenFeature]:
  """Feature specs for the filter columns, typed from the first record (float or int64 columns)."""
  if not conditions:
    return {}
  example = None
  try:
    for raw in tf.data.TFRecordDataset(first_file).take(1):
      example = tf.train.Example.FromString(raw.numpy())
  except (tf.errors.OpError, ValueError) as e:  # a damaged first record: numbers default to float
    logging.warning("cannot read the first record of %s to type the filter columns: %s",
                    first_file, e)
  specs = {}
  for condition in conditions:
    kind = None
    if example is not None and condition.column in example.features.feature:
      kind = example.features.feature[condition.column].WhichOneof("kind")
    if condition.numeric:
      dtype = tf.int64 if kind == "int64_list" else tf.float32
    else:
      dtype = tf.string
    specs[condition.column] = tf.io.VarLenFeature(dtype)
  return specs


def column_dtype(column: str, conditions: Sequence[Condition]) -> tf.DType:
  """The dtype a parsed TFRecord column is compared in (float64 for numeric conditions)."""
  numeric = any(c.column == column and c.numeric for c in conditions)
  return tf.float64 if numeric else tf.string


def all_hold(conditions: Sequence[Condition],
             column_value: Callable[[Condition], Tuple[tf.Tensor, tf.Tensor]]) -> tf.Tensor:
  """Whether every condition holds; `column_value(condition)` gives (value, present)."""
  passes = tf.constant(True)
  for condition in conditions:
    passes &= condition_holds(condition, *column_value(condition))
  return passes


def tfrecord_passes(features: Mapping[str, tf.Tensor],
                    conditions: Sequence[Condition]) -> tf.Tensor:
  """Whether a parsed Example (dense value vectors per column) meets every condition."""
  def column_value(condition):
    values = features[condition.column]
    return tf.concat([values, tf.zeros([1], values.dtype)], 0)[0], tf.size(values) > 0
  return all_hold(conditions, column_value)


def webdataset_passes(json_text: tf.Tensor, conditions: Sequence[Condition]) -> tf.Tensor:
  """Whether a webdataset sample's KEY.json meets every condition."""
  return all_hold(conditions, lambda condition: json_column(json_text, condition))
