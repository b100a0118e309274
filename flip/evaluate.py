"""Zero-shot classification, image-text retrieval, and the `config.eval_only` entry point.

Owns the evaluation arithmetic and its sharded loop; data sources are `flip.data.imagenet`,
prompt tokenisation is the training tokenizer (`flip.data.text`).

Zero-shot classifier (CLIP's recipe, as FLIP and open_clip use it). For every class, each prompt
template is filled with the class name ("{}" placeholder), encoded by the text tower, L2-normalised;
the template embeddings are averaged and the mean is renormalised: the class weight. An image is
scored by the cosine similarity of its unmasked, normalised embedding with every class weight.
Top-k counts an image as correct when fewer than k other classes score at least as high as its
label (ties count against the model, so a constant model scores 0 top-1); k is capped by the
number of classes. Metrics are fractions in [0, 1] under `zeroshot/<dataset>/top1|top5` (the "top5"
key holds top-min(5, C)) plus `zeroshot/<dataset>/num_images`.

Prompt text preprocessing. By default prompts go through exactly the training tokenizer (BERT
uncased WordPiece: lower-cases and splits punctuation into tokens). Reported numbers use this
default. `config.zeroshot.canonicalize=True` first applies big_vision-style canonicalisation
(lower-case, remove punctuation characters, collapse runs of whitespace, strip): "a photo of the
t-shirt." -> "a photo of the tshirt". Retrieval captions always get the training preprocessing.

Retrieval (`config.zeroshot.retrieval_path`, a held-out LAION-layout caption set, one caption per
image): recall@1/5/10 for image->text and text->image, with the same tie rule, under
`retrieval/<set>/i2t_r1` ... `t2i_r10`, `retrieval/<set>/num_pairs` and `num_skipped` (pairs whose
image could not be decoded).

Sharding. Images, labels and a validity mask are batched over the mesh's data axis exactly like
training batches (each process reads its shard from `partitioner.get_data_layout`); parameters keep
the partitioner's sharding (from the model's logical axes); the encode functions are partitioned
with the partitioner. Every process pads its shard to the same number of batches with invalid
examples, so the last partial batch is counted once, and the total of valid images is checked
against the source's count. Prompts are known to every process; they are sharded over data too.

Settings live in `config.zeroshot` (`ZeroShotSettings` lists the keys and defaults); a config
without that section uses the defaults.
"""

import dataclasses
import math
import re
import sys
import unicodedata
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from absl import logging
import flax
from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flip import checkpoints

Array = jax.Array
Params = Any
Metrics = Dict[str, float]
ImageEncoder = Callable[[Params, Array], Array]  # (params, uint8 [B, S, S, 3]) -> [B, D]
TextEncoder = Callable[[Params, Array], Array]  # (params, int32 [B, L]) -> [B, D]
Tokenizer = Callable[[Sequence[str]], np.ndarray]  # strings -> int32 [N, L]

TOPK = 5  # CLIP/FLIP report top-1 and top-5
RETRIEVAL_KS = (1, 5, 10)  # CLIP/open_clip retrieval recalls
_RANK_CHUNK = 1024  # query rows per block when ranking retrieval candidates on the host
_IMAGE_AXES = ("batch", None, None, None)
_TOKEN_AXES = ("batch", None)
_VECTOR_AXES = ("batch",)


class EvalError(ValueError):
  """An evaluation that cannot run, in one line naming the key, path or data set."""


@dataclasses.dataclass(frozen=True)
class ZeroShotSettings:
  """`config.zeroshot`: keys and defaults."""
  templates: str = "templates_full"  # key in flip/assets/imagenet_zeroshot.json (CLIP's 80)
  batch_size: int = 1024  # global images (and prompts) per evaluation step
  canonicalize: bool = False  # big_vision-style prompt canonicalisation before tokenising
  classnames_file: str = ""  # image folders: default <dir>/classnames.txt
  retrieval_path: str = ""  # held-out LAION-layout caption TFRecords; "" = no retrieval
  max_images: int = 0  # evaluate only the first N images (and caption pairs); 0 = all


def zeroshot_settings(config: ml_collections.ConfigDict) -> ZeroShotSettings:
  node = config.get("zeroshot") if hasattr(config, "get") else None
  if node is None:
    return ZeroShotSettings()
  known = {f.name for f in dataclasses.fields(ZeroShotSettings)}
  values = dict(node)
  unknown = sorted(set(values) - known)
  if unknown:
    raise EvalError(f"unknown key config.zeroshot.{unknown[0]} (known: {', '.join(sorted(known))})")
  settings = ZeroShotSettings(**values)
  if settings.batch_size <= 0:
    raise EvalError(f"config.zeroshot.batch_size must be > 0, got {settings.batch_size}")
  if settings.max_images < 0:
    raise EvalError(f"config.zeroshot.max_images must be >= 0, got {settings.max_images}")
  return settings


# --- prompts ------------------------------------------------------------------------------------

def canonicalize_text(text: str) -> str:
  """Lower-case, drop punctuation (Unicode category P*), collapse whitespace, strip."""
  lowered = text.lower()
  kept = "".join(ch for ch in lowered if not unicodedata.category(ch).startswith("P"))
  return re.sub(r"\s+", " ", kept).strip()


def class_prompts(classnames: Sequence[str], templates: Sequence[str],
                  canonicalize: bool = False) -> List[str]:
  """Prompts in class-major order: class 0 with every template, then class 1, ..."""
  prompts = [template.replace("{}", name) for name in classnames for template in templates]
  return [canonicalize_text(p) for p in prompts] if canonicalize else prompts


def make_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
  """The training tokenizer (`flip.data.text`) as strings -> int32 [N, config.aug.txt.max_len]."""
  from flip.data import text  # pylint: disable=g-import-not-at-top (tf only when evaluating)
  vocab = text.get_vocabulary(config.aug.txt)
  max_len = config.aug.txt.max_len
  return lambda strings: np.asarray(text.tokenize(vocab, list(strings), max_len), np.int32)


# --- metrics on the host ------------------------------------------------------------------------

def _l2_normalize_np(x: np.ndarray) -> np.ndarray:
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(norm, np.finfo(x.dtype).tiny)


def pair_ranks(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
  """For query i, how many candidates j != i score at least as high as its pair candidate i."""
  queries = np.asarray(queries, np.float32)
  candidates = np.asarray(candidates, np.float32)
  ranks = np.empty(len(queries), np.int64)
  for start in range(0, len(queries), _RANK_CHUNK):
    stop = min(start + _RANK_CHUNK, len(queries))
    scores = queries[start:stop] @ candidates.T
    rows = np.arange(stop - start)
    true = scores[rows, np.arange(start, stop)]
    ranks[start:stop] = np.sum(scores >= true[:, None], axis=1) - 1
  return ranks


def retrieval_metrics(img_emb: np.ndarray, txt_emb: np.ndarray,
                      ks: Sequence[int] = RETRIEVAL_KS) -> Metrics:
  """Recall@k both ways for paired rows of image and text embeddings (cosine similarity)."""
  img = _l2_normalize_np(np.asarray(img_emb, np.float32))
  txt = _l2_normalize_np(np.asarray(txt_emb, np.float32))
  i2t, t2i = pair_ranks(img, txt), pair_ranks(txt, img)
  metrics = {}
  for k in ks:
    metrics[f"i2t_r{k}"] = float(np.mean(i2t < k))
    metrics[f"t2i_r{k}"] = float(np.mean(t2i < k))
  return metrics


# --- the sharded evaluator ----------------------------------------------------------------------

def params_mesh_axes(task: Any, partitioner: Any) -> Dict[str, Any]:
  """PartitionSpecs of the task's parameters under the partitioner's rules (as training uses)."""
  variables = jax.eval_shape(task.init_variables, jax.random.PRNGKey(0))
  logical = nn_partitioning.get_axis_names(variables["params_axes"])
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  return jax.tree.map(
      lambda axes: nn_partitioning.logical_to_mesh_axes(axes, partitioner.logical_axis_rules),
      flax.core.unfreeze(logical), is_leaf=is_spec)


def params_shapes(task: Any) -> Dict[str, Any]:
  variables = jax.eval_shape(task.init_variables, jax.random.PRNGKey(0))
  return flax.core.unfreeze(variables["params"])


class Evaluator:
  """Partitioned encoders plus the zero-shot and retrieval loops over per-process data shards."""

  def __init__(self, partitioner: Any, encode_image: ImageEncoder, encode_text: TextEncoder,
               params_axes: Any, tokenize: Tokenizer, image_size: int, batch_size: int,
               canonicalize: bool = False, crop_fraction: Optional[float] = None):
    self.partitioner = partitioner
    self.tokenize = tokenize
    self.image_size = image_size
    self.crop_fraction = crop_fraction
    self.batch_size = batch_size
    self.canonicalize = canonicalize
    data_size = partitioner.data_mesh_size
    if batch_size % data_size:
      raise EvalError(f"config.zeroshot.batch_size {batch_size} is not divisible by the "
                      f"data-parallel size {data_size}")
    self.layout = partitioner.get_data_layout(batch_size)
    self.local_batch = batch_size // self.layout.num_shards
    rules = partitioner.logical_axis_rules
    to_mesh = lambda axes: nn_partitioning.logical_to_mesh_axes(axes, rules)
    self._image_spec = to_mesh(_IMAGE_AXES)
    self._token_spec = to_mesh(_TOKEN_AXES)
    self._vector_spec = to_mesh(_VECTOR_AXES)
    replicated = jax.sharding.PartitionSpec()
    self._replicated = replicated
    self._params_axes = params_axes
    self._encode_image = encode_image
    self._encode_text = encode_text
    self._p_text = partitioner.partition(
        self._text_step, in_axis_resources=(params_axes, self._token_spec),
        out_axis_resources=replicated)
    self._p_pairs = partitioner.partition(
        self._pairs_step,
        in_axis_resources=(params_axes, self._image_spec, self._token_spec, self._vector_spec),
        out_axis_resources=(replicated, replicated, replicated))
    self._p_classify: Dict[int, Any] = {}
    self._prompt_tokens: Dict[Tuple[Tuple[str, ...], Tuple[str, ...]], np.ndarray] = {}

  @classmethod
  def from_task(cls, config: ml_collections.ConfigDict, task: Any, partitioner: Any,
                tokenize: Optional[Tokenizer] = None) -> "Evaluator":
    settings = zeroshot_settings(config)
    return cls(partitioner, task.encode_image, task.encode_text,
               params_axes=params_mesh_axes(task, partitioner),
               tokenize=tokenize or make_tokenizer(config), image_size=task.image_size,
               batch_size=settings.batch_size, canonicalize=settings.canonicalize,
               crop_fraction=config.aug.get("eval_crop_fraction"))

  # --- jitted steps ---------------------------------------------------------------------------
  def _text_step(self, params, tokens):
    return self._encode_text(params, tokens).astype(jnp.float32)

  def _pairs_step(self, params, images, tokens, valid):
    return (self._encode_image(params, images).astype(jnp.float32),
            self._encode_text(params, tokens).astype(jnp.float32), valid)

  def _classify_fn(self, k: int):
    """(params, weights [D, C], images, labels, valid) -> (top-1, top-k, valid) counts."""
    if k not in self._p_classify:
      def step(params, weights, images, labels, valid):
        emb = self._encode_image(params, images).astype(jnp.float32)
        emb = emb * jax.lax.rsqrt(jnp.maximum(jnp.sum(emb * emb, -1, keepdims=True),
                                              jnp.finfo(jnp.float32).tiny))
        logits = jnp.dot(emb, weights, precision=jax.lax.Precision.HIGHEST)
        label_logit = jnp.take_along_axis(logits, labels[:, None], axis=1)
        rank = jnp.sum(logits >= label_logit, axis=1) - 1
        count = lambda hit: jnp.sum(hit & valid, dtype=jnp.int32)
        return count(rank < 1), count(rank < k), jnp.sum(valid, dtype=jnp.int32)
      self._p_classify[k] = self.partitioner.partition(
          step,
          in_axis_resources=(self._params_axes, self._replicated, self._image_spec,
                             self._vector_spec, self._vector_spec),
          out_axis_resources=(self._replicated,) * 3)
    return self._p_classify[k]

  # --- host <-> global arrays -----------------------------------------------------------------
  def _global_from_full(self, array: np.ndarray, spec) -> Array:
    """A host array every process holds in full -> a global array with `spec`."""
    sharding = jax.sharding.NamedSharding(self.partitioner.mesh, spec)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

  def _global_from_local(self, array: np.ndarray, spec) -> Array:
    sharding = jax.sharding.NamedSharding(self.partitioner.mesh, spec)
    return jax.make_array_from_process_local_data(sharding, np.asarray(array))

  def place_params(self, params: Mapping[str, Any]) -> Any:
    """Host (numpy) parameters -> global arrays with the partitioner's parameter sharding."""
    return jax.tree.map(lambda x, spec: self._global_from_full(np.asarray(x), spec),
                        flax.core.unfreeze(params), self._params_axes,
                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))

  # --- text -----------------------------------------------------------------------------------
  def encode_texts(self, params: Any, tokens: np.ndarray) -> Iterator[Tuple[int, np.ndarray]]:
    """Yields (start row, embeddings [rows, D]) over `tokens` in global batches."""
    params = flax.core.unfreeze(params)
    total = len(tokens)
    for start in range(0, total, self.batch_size):
      chunk = tokens[start:start + self.batch_size]
      rows = len(chunk)
      if rows < self.batch_size:
        chunk = np.concatenate([chunk, np.zeros((self.batch_size - rows,) + chunk.shape[1:],
                                                chunk.dtype)])
      emb = self._p_text(params, self._global_from_full(chunk, self._token_spec))
      yield start, np.asarray(jax.device_get(emb))[:rows]

  def classifier_weights(self, params: Any, classnames: Sequence[str],
                         templates: Sequence[str]) -> np.ndarray:
    """Zero-shot class weights [D, C]: mean of normalised template embeddings, renormalised."""
    key = (tuple(classnames), tuple(templates))
    if key not in self._prompt_tokens:  # tokenised once; the weights change with the params
      self._prompt_tokens[key] = self.tokenize(class_prompts(classnames, templates,
                                                             self.canonicalize))
    tokens = self._prompt_tokens[key]
    num_templates = len(templates)
    sums = None
    for start, emb in self.encode_texts(params, tokens):
      emb = _l2_normalize_np(emb.astype(np.float64))
      if sums is None:
        sums = np.zeros((len(classnames), emb.shape[-1]), np.float64)
      np.add.at(sums, (start + np.arange(len(emb))) // num_templates, emb)
    weights = _l2_normalize_np(sums / num_templates)
    return weights.T.astype(np.float32)

  # --- image batches --------------------------------------------------------------------------
  def local_batches(self, source: Any) -> Tuple[int, Iterator[Dict[str, np.ndarray]]]:
    """This process's shard of `source`, padded with invalid examples to a common batch count."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    layout = self.layout
    if source.num_examples <= 0:
      raise EvalError(f"evaluation data {source.name!r} holds no examples")
    per_shard = int(math.ceil(source.num_examples / layout.num_shards))
    num_batches = int(math.ceil(per_shard / self.local_batch))
    crop = {} if self.crop_fraction is None else {"crop_fraction": self.crop_fraction}
    ds = source.dataset(layout.shard_id, layout.num_shards, self.image_size, **crop)
    ds = ds.map(lambda ex: dict(ex, valid=tf.constant(True)))
    pad_example = {key: tf.zeros(spec.shape, spec.dtype) for key, spec in ds.element_spec.items()}
    pad_example["valid"] = tf.constant(False)
    padding = tf.data.Dataset.from_tensors(pad_example).repeat()
    ds = ds.concatenate(padding).take(num_batches * self.local_batch)
    ds = ds.batch(self.local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return num_batches, ds.as_numpy_iterator()

  def _check_count(self, source: Any, counted: int) -> None:
    if counted != source.num_examples:
      raise EvalError(f"evaluation data {source.name!r}: counted {counted} images but the source "
                      f"holds {source.num_examples} (a shard was larger than expected)")

  # --- evaluations ----------------------------------------------------------------------------
  def zeroshot(self, params: Any, source: Any) -> Metrics:
    """Top-1/top-5 of the zero-shot classifier built from `source`'s class names and templates."""
    num_classes = len(source.classnames)
    k = min(TOPK, num_classes)
    weights = self.classifier_weights(params, source.classnames, source.templates)
    weights = self._global_from_full(weights, self._replicated)
    classify = self._classify_fn(k)
    params = flax.core.unfreeze(params)
    _, batches = self.local_batches(source)
    counts = []
    for batch in batches:
      labels = batch["label"]
      bad = labels[batch["valid"] & ((labels < 0) | (labels >= num_classes))]
      if bad.size:
        raise EvalError(f"evaluation data {source.name!r} has label {int(bad[0])} outside "
                        f"[0, {num_classes}) classes")
      counts.append(classify(
          params, weights, self._global_from_local(batch["image"], self._image_spec),
          self._global_from_local(labels.astype(np.int32), self._vector_spec),
          self._global_from_local(batch["valid"], self._vector_spec)))
    top1, topk, counted = np.sum(np.asarray(jax.device_get(counts), np.int64), axis=0)
    self._check_count(source, int(counted))
    prefix = f"zeroshot/{source.name}"
    return {f"{prefix}/top1": float(top1) / counted, f"{prefix}/top{TOPK}": float(topk) / counted,
            f"{prefix}/num_images": float(counted)}

  def retrieval(self, params: Any, source: Any) -> Metrics:
    """Recall@1/5/10 both ways on a held-out caption set (training text preprocessing)."""
    params = flax.core.unfreeze(params)
    _, batches = self.local_batches(source)
    img_parts, txt_parts = [], []
    for batch in batches:
      captions = [c.decode("utf-8") for c in batch["caption"]]
      tokens = self.tokenize(captions)
      img, txt, valid = self._p_pairs(
          params, self._global_from_local(batch["image"], self._image_spec),
          self._global_from_local(tokens, self._token_spec),
          self._global_from_local(batch["valid"], self._vector_spec))
      img, txt, valid = jax.device_get((img, txt, valid))
      img_parts.append(np.asarray(img)[valid])
      txt_parts.append(np.asarray(txt)[valid])
    img_emb, txt_emb = np.concatenate(img_parts), np.concatenate(txt_parts)
    skipped = source.num_examples - len(img_emb)  # undecodable images (CaptionSource drops them)
    if skipped < 0 or not len(img_emb):
      self._check_count(source, len(img_emb))
    if skipped:
      logging.warning("retrieval %s: %d of %d images could not be decoded and were skipped",
                      source.name, skipped, source.num_examples)
    prefix = f"retrieval/{source.name}"
    metrics = {f"{prefix}/{key}": value
               for key, value in retrieval_metrics(img_emb, txt_emb).items()}
    metrics[f"{prefix}/num_pairs"] = float(len(img_emb))
    metrics[f"{prefix}/num_skipped"] = float(skipped)
    return metrics


# --- what to evaluate, for the training loop and eval_only --------------------------------------

class EvalSuite:
  """Every evaluation a config asks for; callable as a training eval hook(task, state, step).

  Sources (file listings, counts) and the evaluator are built on first use and reused; the
  classifier weights are recomputed from the current parameters on every call.
  """

  def __init__(self, config: ml_collections.ConfigDict, partitioner: Any = None):
    self.config = config
    self.settings = zeroshot_settings(config)
    self._partitioner = partitioner
    self._evaluator: Optional[Evaluator] = None
    self._task_id: Optional[int] = None
    self._classification = None
    self._captions = None

  @property
  def enabled(self) -> bool:
    return bool(self.config.get("eval_dataset")) or bool(self.settings.retrieval_path)

  def evaluator(self, task: Any) -> Evaluator:
    if self._evaluator is None or self._task_id != id(task):
      if self._partitioner is None:
        from flip import train  # pylint: disable=g-import-not-at-top (train imports the loop)
        self._partitioner = train.build_partitioner(self.config.partitioning)
      self._evaluator = Evaluator.from_task(self.config, task, self._partitioner)
      self._task_id = id(task)
    return self._evaluator

  def sources(self):
    """The classification and caption sources (built once; data problems -> EvalError)."""
    from flip.data import eval_sources as imagenet  # pylint: disable=g-import-not-at-top (tf)
    try:
      if self._classification is None and self.config.get("eval_dataset"):
        self._classification = imagenet.classification_source(
            self.config.eval_dataset, self.settings.templates, self.settings.classnames_file,
            self.settings.max_images)
      if self._captions is None and self.settings.retrieval_path:
        self._captions = imagenet.caption_source(self.settings.retrieval_path,
                                                 self.settings.max_images)
    except imagenet.EvalDataError as err:
      raise EvalError(str(err)) from None
    return self._classification, self._captions

  def evaluate(self, task: Any, params: Any) -> Metrics:
    evaluator = self.evaluator(task)
    classification, captions = self.sources()
    metrics: Metrics = {}
    if classification is not None:
      metrics.update(evaluator.zeroshot(params, classification))
    if captions is not None:
      metrics.update(evaluator.retrieval(params, captions))
    return metrics

  def __call__(self, task: Any, state: Any, step: int) -> Metrics:
    metrics = self.evaluate(task, state.params)
    if jax.process_index() == 0:
      print(f"eval at step {step}: {format_metrics(metrics)}", flush=True)
    return metrics


def eval_hooks(config: ml_collections.ConfigDict) -> List[Callable[[Any, Any, int], Metrics]]:
  """The evaluation hooks `flip.train.train_and_evaluate` runs (none if nothing is configured).

  The data sources are resolved now, so a missing data set stops the run before training starts
  (one line: EvalError); `--config.eval_dataset=` turns zero-shot evaluation off.
  """
  suite = EvalSuite(config)
  if not suite.enabled:
    return []
  suite.sources()
  return [suite]


def format_metrics(metrics: Mapping[str, float]) -> str:
  parts = []
  for key, value in sorted(metrics.items()):
    if key.endswith(("/num_images", "/num_pairs", "/num_skipped")):
      parts.append(f"{key} {int(value)}")
    else:
      parts.append(f"{key} {100.0 * value:.2f}%")
  return " | ".join(parts)


def eval_checkpoint_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`config.pretrain_dir` if set, else the latest complete checkpoint in workdir.

  Raises `checkpoints.CheckpointError` (one line naming the path) when there is none.
  """
  if config.get("pretrain_dir"):
    return checkpoints.find_checkpoint_dir(config.pretrain_dir)
  step = checkpoints.latest_complete_step(workdir)
  if step is None:
    raise checkpoints.CheckpointError(
        f"no checkpoint to evaluate: config.pretrain_dir is empty and {workdir} holds no complete "
        "checkpoint_<step> directory")
  return checkpoints.checkpoint_dir(workdir, step)


def _checkpoint_step(ckpt_dir: str) -> int:
  match = re.search(r"checkpoint_(\d+)/?$", ckpt_dir)
  return int(match.group(1)) if match else 0


def run_eval_only(config: ml_collections.ConfigDict, workdir: str, task: Any = None,
                  partitioner: Any = None) -> Metrics:
  """Loads the parameters to evaluate, runs every configured evaluation, prints and returns them.

  Never reads `config.laion_path`. Metrics are also written (clu writer) into `workdir` at the
  checkpoint's step. A missing checkpoint raises `checkpoints.CheckpointError`, unusable data
  `EvalError`; both are one line naming the path or data set.
  """
  from flip import train  # pylint: disable=g-import-not-at-top
  ckpt_dir = eval_checkpoint_dir(config, workdir)
  suite = EvalSuite(config, partitioner)
  if not suite.enabled:
    raise EvalError("config.eval_only=True but nothing to evaluate: config.eval_dataset and "
                    "config.zeroshot.retrieval_path are both empty")
  suite.sources()
  task = task or train.build_task(config)
  params = checkpoints.load_pretrained_params(ckpt_dir, params_shapes(task),
                                              posemb_grid=train.task_posemb_grid(task))
  evaluator = suite.evaluator(task)
  metrics = suite.evaluate(task, evaluator.place_params(params))
  report_eval_only(workdir, ckpt_dir, metrics)
  return metrics


def report_eval_only(workdir: str, ckpt_dir: str, metrics: Metrics) -> None:
  """An eval_only result: tensorboard scalars in `workdir` at the checkpoint's step, and one
  `eval_only <checkpoint>: ...` line (logged; printed by process 0)."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_scalars(_checkpoint_step(ckpt_dir), metrics)
  writer.flush()
  line = f"eval_only {ckpt_dir}: {format_metrics(metrics)}"
  logging.info("%s", line)
  if jax.process_index() == 0:
    print(line, file=sys.stdout, flush=True)
