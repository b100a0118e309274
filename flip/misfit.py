"""One wording for "these tensors do not fit that model", shared by `pretrain_dir` loading and every
converter (FLIP's t5x layout, open_clip, timm / MAE, big_vision).

`misfit_line` turns the three kinds of mismatch into one line: which keys the target needs and the
source lacks, which source keys have no place in the target, and which shapes differ, each with a
count and up to three names, e.g.
`ckpt does not fit the model: missing 1 (e.g. a/b); 2 without a place (e.g. c, d); 1 wrong shape
(e.g. e (3, 4) vs (3, 5))`. It returns None when everything fits, so callers raise their own
error type with it.
"""

from typing import Optional, Sequence, Tuple

Shape = Tuple[int, ...]
SHOWN = 3


def examples(names: Sequence[str], separator: str = ", ") -> str:
  shown = separator.join(names[:SHOWN])
  return f"e.g. {shown}" if len(names) > SHOWN else shown


def shape_mismatch(key: str, got: Shape, want: Shape, target_key: Optional[str] = None) -> str:
  """`key (got) vs (want)`, or `key (got) vs target_key (want)` when the target's name differs."""
  target = f"{target_key} " if target_key and target_key != key else ""
  return f"{key} {tuple(got)} vs {target}{tuple(want)}"


def misfit_line(subject: str, target: str, *, missing: Sequence[str] = (),
                extra: Sequence[str] = (), misshaped: Sequence[str] = ()) -> Optional[str]:
  """`<subject> does not fit <target>: ...` naming every kind of mismatch, or None if it fits.

  `missing`: keys the target needs that the source lacks; `extra`: source keys with no place in
  the target; `misshaped`: `shape_mismatch` strings.
  """
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} ({examples(list(missing))})")
  if extra:
    problems.append(f"{len(extra)} without a place ({examples(list(extra))})")
  if misshaped:
    noun = "wrong shape" if len(misshaped) == 1 else "wrong shapes"
    problems.append(f"{len(misshaped)} {noun} ({examples(list(misshaped), '; ')})")
  if not problems:
    return None
  return f"{subject} does not fit {target}: " + "; ".join(problems)
