"""Where the time of a compiled XLA:CPU program goes: a jax profiler trace summarised per thunk.

`summarise(trace_dir, hlo_text, steps)` reads the Perfetto trace that
`jax.profiler.start_trace(dir, create_perfetto_trace=True)` writes, keeps the events whose name is
an instruction of the compiled program's HLO (`jitted.lower(...).compile().as_text()`): XLA:CPU's
thunks, one per fusion, library call (`ynn_fusion`: a YNNPACK dot or reduction), copy or
conditional) and returns three tables of milliseconds per step:
- `by_kind`: per thunk kind (the instruction name without its number: `ynn_fusion`,
  `convert_add_fusion`, ...);
- `by_part`: per part of the model and pass, read from the instruction's `op_name` metadata
  (forward / backward from jax's `transpose(jvp(...))`, the layer from the module path) and
  whether it is a matmul (`dot_general`) or not;
- `top`: the costliest instructions grouped across layers (`encoderblock_NN` folded), with their
  result shape.
Thunk times are summed over the executor's threads (independent thunks run concurrently on the
CPU pool), so the total can exceed the step's wall time.
"""

import collections
import glob
import gzip
import json
import os
import re
from typing import Dict, List, Tuple

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+)", re.M)
_OP_NAME = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]*)\"", re.M)
# (substring of op_name, part of the model), first match wins.
PARTS: Tuple[Tuple[str, str], ...] = (
    ("MlpBlock_0/Dense_0", "MLP dense 0"), ("MlpBlock_0/Dense_1", "MLP dense 1"),
    ("MlpBlock_0", "MLP activation"), ("_qkv", "attention q/k/v projection"),
    ("query", "attention q/k/v projection"), ("key/", "attention q/k/v projection"),
    ("value", "attention q/k/v projection"), ("_fused_out", "attention output projection"),
    ("MultiHeadSelfAttention_0/out", "attention output projection"),
    ("bqhk,bthk", "attention logits"), ("bhqt,bthk", "attention values"),
    ("bhqt,bqhk", "attention values"), ("bqhk,bthk->bhqt", "attention logits"),
    ("MultiHeadSelfAttention", "attention softmax/mask"), ("LayerNorm", "layer norm"),
    ("encoder_norm", "layer norm"), ("embedding", "patch embedding"),
    ("token_embed", "token embedding"), ("/Transformer/", "residual adds"),
    ("encode_", "pooling/projection"), ("loss", "loss"),
)


def trace_file(trace_dir: str) -> str:
  found = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
  if not found:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir} (was the trace written with "
                            "create_perfetto_trace=True?)")
  return found[-1]


def _events(path: str) -> List[dict]:
  with gzip.open(path, "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  return [e for e in events if e.get("ph") == "X"]


def part_of(op_name: str) -> str:
  """The model part an instruction belongs to, from its op_name metadata."""
  if not op_name:
    return "unattributed (copies and layout changes XLA added)"
  if "encode_" not in op_name and "FlipModel" not in op_name and "Transformer" not in op_name:
    return "optimizer, gradient norm, guard"
  for key, part in PARTS:
    if key in op_name:
      return part
  return "other model ops"


def summarise(trace_dir: str, hlo_text: str, steps: int) -> Dict[str, List[Tuple[str, float]]]:
  shapes = {m.group(1): m.group(2) for m in _INSTRUCTION.finditer(hlo_text)}
  op_names = {}
  for m in _OP_NAME.finditer(hlo_text):
    op_names.setdefault(m.group(1), m.group(2))
  by_kind, by_part, top = collections.Counter(), collections.Counter(), collections.Counter()
  for event in _events(trace_file(trace_dir)):
    name = event["name"]
    if name not in shapes:
      continue
    ms = event["dur"] / 1000.0 / steps
    op_name = op_names.get(name, "")
    kind = re.sub(r"\.\d+$", "", name)
    by_kind[kind] += ms
    is_dot = op_name.endswith("dot_general")
    direction = ("backward" if "transpose(" in op_name else "forward") if op_name else "either pass"
    by_part[f"{part_of(op_name)}, {direction}, {'matmul' if is_dot else 'other'}"] += ms
    folded = re.sub(r"encoderblock_\d+", "encoderblock_*", re.sub(r"^jit\([^)]*\)/", "", op_name))
    top[f"{kind} {re.sub(r'{.*', '', shapes[name])} {folded[-80:]}"] += ms
  return dict(by_kind=by_kind.most_common(), by_part=by_part.most_common(),
              top=top.most_common())


def print_tables(tables: Dict[str, List[Tuple[str, float]]], rows: int = 20) -> None:
  total = sum(ms for _, ms in tables["by_kind"])
  print(f"thunk time per step, summed over threads: {total:.1f} ms")
  for title, key in (("per thunk kind", "by_kind"), ("per model part, pass and op", "by_part"),
                     ("costliest instructions (layers folded)", "top")):
    print(f"-- {title}")
    for label, ms in tables[key][:rows]:
      print(f"{ms:9.1f} ms {100 * ms / total:5.1f} %  {label}")
