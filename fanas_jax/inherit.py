"""Weight inheritance from the search supernet (SPEC.md 4), `train.init='supernet'`.

Training from scratch is the authors' protocol; this option starts the derived
network from the chosen ops' weights of the last search phase instead. The
supernet and the derived network name their layers alike (`stage{s}_layer{l}_{op}`,
`stem`, `stage{s}_pre_conv`), so every backbone variable of the derived network is
copied from the same path of the supernet's final checkpoint, batch-norm
statistics included. Two kinds start fresh: the classifier head (sized for the
training dataset) and the stage preprocess BN's scale and bias, which the
supernet's non-affine BN does not have (they start at 1 and 0).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fanas_jax.registry import ConfigError
from fanas_jax.stage import Need

INITS = ("scratch", "supernet")
SUPERNET = Need("supernet weights", ("search_phase2", "search_phase1"),
                "train.init='supernet'", ", or train from scratch: train.init='scratch'")
_FRESH = ("scale", "bias")  # What a non-affine pre_bn lacks.


def latest_checkpoint(stage_dir: str) -> str:
  """The newest finished checkpoint step directory of a stage."""
  root = os.path.join(stage_dir, "checkpoints")
  steps = sorted(int(d) for d in (os.listdir(root) if os.path.isdir(root) else [])
                 if d.isdigit() and os.path.isdir(os.path.join(root, d, "state")))
  if not steps:
    raise ConfigError(f"train.init='supernet': {root} holds no checkpoint of the "
                      "supernet's final weights (rerun the search, or train.init='scratch').")
  return os.path.join(root, str(steps[-1]))


def read_supernet(step_dir: str) -> dict[str, Any]:
  """{'params', 'batch_stats'} (numpy) of a search checkpoint step directory."""
  tree = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
  if not isinstance(tree, dict) or not {"params", "batch_stats", "alphas"} <= tree.keys():
    raise ConfigError(f"train.init='supernet': {step_dir} is not a search checkpoint "
                      "(no params, batch_stats and alphas).")
  return {k: jax.tree.map(np.asarray, tree[k]) for k in ("params", "batch_stats")}


def _inherited(path: tuple[Any, ...], fresh: Any, have: dict[tuple[Any, ...], Any],
               collection: str, where: str) -> Any:
  """The supernet's value for one backbone leaf of the derived network."""
  name = f"{collection}/backbone{jax.tree_util.keystr(path)}"
  old = have.get(path)
  if old is None:
    if path[0].key.endswith("_pre_bn") and path[-1].key in _FRESH:
      return fresh
    raise ConfigError(f"train.init='supernet': the supernet in {where} has no {name}; "
                      "the genotype's ops must be among its candidates (search.candidates) "
                      "and model.stem the same.")
  if tuple(old.shape) != tuple(fresh.shape):
    raise ConfigError(f"train.init='supernet': {name} is {tuple(old.shape)} in the "
                      f"supernet in {where}, {tuple(fresh.shape)} here; train.width must "
                      "be the search's model.width, and the datasets' channels alike.")
  return jnp.asarray(old, fresh.dtype)


def start_from_supernet(supernet: dict[str, Any], where: str
                        ) -> Callable[[dict[str, Any]], dict[str, Any]]:
  """variables -> the derived network's backbone from `supernet`, a fresh head."""
  def start(fresh: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for collection in ("params", "batch_stats"):  # A missing op is named by its params.
      tree = fresh[collection]
      have = dict(jax.tree_util.tree_flatten_with_path(
          supernet[collection].get("backbone", {}))[0])
      out[collection] = dict(tree)
      out[collection]["backbone"] = jax.tree_util.tree_map_with_path(
          lambda path, leaf, c=collection, h=have: _inherited(path, leaf, h, c, where),
          tree["backbone"])
    return out
  return start


def check_config(config: Any) -> None:
  """train.init is a known choice; inheriting needs the supernet's width."""
  init = config.train.init
  if init not in INITS:
    raise ConfigError(f"train.init={init!r} is not one of: {', '.join(INITS)}.")
  if init == "supernet" and config.train.width != config.model.width:
    raise ConfigError(f"train.init='supernet' copies the search supernet's weights: "
                      f"train.width={config.train.width} must equal model.width="
                      f"{config.model.width}, the supernet's width.")
