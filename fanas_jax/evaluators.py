"""Evaluators as plug-ins, chosen per stage by config.

An evaluator is one registered function `run(net, batches, options)` that yields
(metric, value) pairs, over the padded, sharded prediction of evaluate.predict, so
every example counts once whatever the devices. A stage's `evals` config block
names its evaluations:

  train.evals.val = dict(type='top1', split='test', every_epochs=5)

runs top-1 on the test split after every 5th epoch and after the last, logged as
`val/top1` (JSON lines and TensorBoard). Other keys of an entry are the
evaluator's options (e.g. `ks` of recall_at_k and retrieval). The stages' final results use the
same evaluators.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fanas_jax import evaluate, retrieval
from fanas_jax.logging_utils import note
from fanas_jax.registry import ConfigError, Registry

Metrics = Iterator[tuple[str, float]]
# The keys of an `evals` entry that are not the evaluator's options.
SCHEDULE_KEYS = ("type", "split", "every_epochs")


@dataclasses.dataclass(frozen=True)
class Net:
  """A network at inference: `infer(variables, images)` (jitted) is its head's output.

  `objective` makes the corrupted input a reconstruction restores from.
  """
  infer: Callable[[Any, jax.Array], Any]
  variables: Any
  mesh: Any
  head: str
  objective: Any = None


@dataclasses.dataclass(frozen=True)
class Evaluator:
  run: Callable[[Net, Iterable[dict[str, np.ndarray]], Mapping[str, Any]], Metrics]
  head: str                      # the network head it reads
  options: Mapping[str, Any]     # its options and their defaults


EVALUATORS: Registry[Evaluator] = Registry("evaluator")


def register(name: str, head: str, **options: Any) -> Callable:
  def decorator(run):
    EVALUATORS.add(name, Evaluator(run, head, options))
    return run
  return decorator


@register("top1", head="classifier")
def top1(net: Net, batches: Iterable[dict[str, np.ndarray]],
         options: Mapping[str, Any]) -> Metrics:
  """Top-1 accuracy over the real examples, and how many there were."""
  del options
  correct = total = 0.0
  for logits, batch in evaluate.predict(net.infer, net.variables, batches, net.mesh):
    c, n = evaluate.top1_accuracy(logits, batch["label"], batch["mask"])
    correct, total = correct + c, total + n
  yield "top1", correct / total
  yield "examples", total


def embeddings(net: Net, batches: Iterable[dict[str, np.ndarray]]
               ) -> tuple[np.ndarray, np.ndarray]:
  """(embeddings, labels) of the real examples, in order."""
  out, labels = [], []
  for prediction, batch in evaluate.predict(net.infer, net.variables, batches, net.mesh):
    keep = batch["mask"] > 0
    out.append(prediction["embedding"][keep])
    labels.append(batch["label"][keep])
  return np.concatenate(out), np.concatenate(labels)


@register("recall_at_k", head="embedding", ks=(1, 2, 4, 8), block=1024, gallery_block=0)
def recall_at_k(net: Net, batches: Iterable[dict[str, np.ndarray]],
                options: Mapping[str, Any]) -> Metrics:
  """Recall@K of every example querying all the others (zero-shot retrieval), by
  the exact blockwise top-k on the net's mesh (`block` queries at a time)."""
  emb, labels = embeddings(net, batches)
  ks = tuple(options["ks"])
  scores = retrieval.retrieval_scores(emb, labels, ks, block=options["block"],
                                      gallery_block=options["gallery_block"],
                                      mesh=net.mesh)
  for k in ks:
    yield f"recall_at_{k}", scores[f"recall_at_{k}"]
  yield "examples", float(len(labels))


@register("retrieval", head="embedding", ks=(1, 2, 4, 8), block=1024, gallery_block=0,
          nmi=True, seed=0)
def retrieval_metrics(net: Net, batches: Iterable[dict[str, np.ndarray]],
                      options: Mapping[str, Any]) -> Metrics:
  """Recall@K, MAP@R and (with `nmi`) the NMI of k-means with k = the number of
  classes (seeded by `seed`): the zero-shot retrieval benchmark's metrics."""
  emb, labels = embeddings(net, batches)
  yield from retrieval.retrieval_scores(
      emb, labels, tuple(options["ks"]), block=options["block"],
      gallery_block=options["gallery_block"], mesh=net.mesh).items()
  if options["nmi"]:
    yield "nmi", retrieval.clustering_nmi(emb, labels, seed=options["seed"],
                                          block=options["block"])
  yield "examples", float(len(labels))


@register("reconstruction", head="car_decoder", seed=0)
def reconstruction(net: Net, batches: Iterable[dict[str, np.ndarray]],
                   options: Mapping[str, Any]) -> Metrics:
  """Mean per-image L1 between the clean image and the network's restoration of
  the objective's corrupted image (boxes drawn from `seed`, the same each run)."""
  key = jax.random.key(options["seed"])

  def corrupted(batch):
    inputs, _ = net.objective.make_inputs(
        {"image": jnp.asarray(batch["image"]), "label": jnp.asarray(batch["label"])}, key)
    return dict(batch, image=np.asarray(inputs), target=batch["image"])

  total = count = 0.0
  for pred, batch in evaluate.predict(net.infer, net.variables, map(corrupted, batches),
                                      net.mesh):
    l1 = np.mean(np.abs(pred.astype(np.float32) - batch["target"]), axis=(1, 2, 3))
    total, count = total + float(np.sum(l1 * batch["mask"])), count + float(
        np.sum(batch["mask"]))
  yield "l1", total / count
  yield "examples", count


def run(name: str, net: Net, batches: Iterable[dict[str, np.ndarray]],
        **options: Any) -> dict[str, float]:
  """Runs evaluator `name` with its default options updated by `options`."""
  evaluator = EVALUATORS.get(name)
  return dict(evaluator.run(net, batches, {**evaluator.options, **options}))


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """One entry of a stage's `evals`."""
  name: str
  type: str
  split: str
  every_epochs: int
  options: Mapping[str, Any]

  def due(self, epoch: int, epochs: int) -> bool:
    """After every `every_epochs`th epoch (0: none) and after the last."""
    return epoch == epochs or bool(self.every_epochs and epoch % self.every_epochs == 0)


def _entries(evals: Any) -> dict[str, dict[str, Any]]:
  if not evals:
    return {}
  plain = evals.to_dict() if hasattr(evals, "to_dict") else evals
  return {name: dict(entry) for name, entry in plain.items()}


def check_config(evals: Any, key: str, head: str, splits: Sequence[str] = ()) -> None:
  """A stage's `evals` block: known types reading this stage's head, splits of the
  stage's dataset (`splits`, when given), known options."""
  for name, entry in _entries(evals).items():
    where = f"{key}.{name}"
    found = EVALUATORS.get(entry.get("type", ""), key=f"{where}.type")
    if found.head != head:
      valid = [n for n in EVALUATORS.names() if EVALUATORS.get(n).head == head]
      raise ConfigError(f"{where}.type={entry['type']!r} reads a {found.head} head, but "
                        f"this stage's network has a {head} head; valid choices: "
                        f"{', '.join(valid) or 'none'}.")
    if not isinstance(entry.get("split"), str) or not entry.get("split"):
      raise ConfigError(f"{where}.split={entry.get('split')!r} must name a split.")
    if splits and not set(entry["split"].split("+")) <= set(splits):
      raise ConfigError(f"{where}.split={entry['split']!r} is not a split of this stage's "
                        f"dataset; valid splits: {', '.join(splits)} (or several "
                        "joined by '+').")
    every = entry.get("every_epochs", 0)
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
      raise ConfigError(f"{where}.every_epochs={every!r} must be an integer >= 0 "
                        "(0: after the last epoch only).")
    unknown = sorted(set(entry) - set(SCHEDULE_KEYS) - set(found.options))
    if unknown:
      raise ConfigError(f"{where}.{unknown[0]} is not an option of {entry['type']}; "
                        f"valid keys: {', '.join(sorted(SCHEDULE_KEYS + tuple(found.options)))}.")


def specs_from_config(evals: Any) -> list[EvalSpec]:
  specs = []
  for name, entry in _entries(evals).items():
    options = {k: v for k, v in entry.items() if k not in SCHEDULE_KEYS}
    specs.append(EvalSpec(name, entry["type"], entry["split"],
                          int(entry.get("every_epochs", 0)), options))
  return specs


class Evals:
  """The evaluations a stage's config chose, with their splits loaded once."""

  def __init__(self, evals: Any, build: Any, stage: str):
    self.specs = specs_from_config(evals)
    self._build, self._stage = build, stage
    self._data = {s.split: build.load_split(stage, s.split) for s in self.specs}

  def run_due(self, net: Net, epoch: int, epochs: int) -> dict[str, float]:
    """{'NAME/metric': value} of the evaluations due after `epoch` of `epochs`."""
    out = {}
    for spec in self.specs:
      if spec.due(epoch, epochs):
        batches = self._build.eval_batches(self._stage, self._data[spec.split])
        for metric, value in run(spec.type, net, batches, **spec.options).items():
          out[f"{spec.name}/{metric}"] = value
    return out


def log(run: Any, step: int, metrics: dict[str, float]) -> None:
  """One record of the evaluations due after the epoch a StageRun just closed."""
  if not metrics:
    return
  run.writer.write(step, dict(metrics, epoch=run.loop.epoch))
  note(f"[{run.stage}] epoch {run.loop.epoch}: " +
       ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
