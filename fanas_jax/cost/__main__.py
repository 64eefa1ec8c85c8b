"""python -m fanas_jax.cost: the cost table of a genotype or a supernet."""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import app, flags

from fanas_jax import config_files
from fanas_jax.cost import load_genotype, network_cost
from fanas_jax.genotype import search_space_from_config


def _define_flags() -> None:
  """Called only when run as a program, so importing this module defines no flags."""
  from ml_collections import config_flags
  config_flags.DEFINE_config_file(
      "config", None, "Config file: configs/NAME.py or configs/NAME.py:VARIANT (a "
      "packaged config when no such file is in the working directory).",
      lock_config=True)
  flags.DEFINE_string("genotype", None, "A named genotype (default 'original') or the "
                      "path of a genotype JSON (a derive stage's genotype.json).")
  flags.DEFINE_bool("supernet", False, "Cost the supernet of config.search.candidates.")
  flags.DEFINE_integer("width", None, "Width C; default config.train.width "
                       "(config.model.width with --supernet).")
  flags.DEFINE_integer("image_size", None, "Input side; default config.image_size.")
  flags.DEFINE_string("stem", None, "Stem; default config.model.stem.")
  flags.DEFINE_integer("in_channels", None, "Input channels; default the dataset's.")
  flags.DEFINE_integer("num_classes", None,
                       "Classifier classes; default the dataset's; 0 leaves the head out.")
  flags.DEFINE_string("json", None, "Also write the cost as JSON to this path.")
  flags.mark_flags_as_required(["config"])


def _fail(message: str) -> None:
  print(f"fanas_jax.cost: error: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(config_files.resolve_config_flag(argv, "fanas_jax.cost"))
  except (flags.Error, FileNotFoundError, KeyError, AttributeError, TypeError,
          ValueError) as e:
    _fail(str(e))
  return []


def main(argv: Sequence[str]) -> None:
  """python -m fanas_jax.cost --config=configs/default.py [--genotype=...] [--supernet]."""
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  from fanas_jax.data.datasets import get_dataset
  f = flags.FLAGS
  config = f.config
  try:
    if f.supernet:
      if f.genotype is not None:
        raise ValueError("give --genotype or --supernet, not both.")
      layer_ops = search_space_from_config(config.search).layer_ops()
      width = f.width or config.model.width
    else:
      layer_ops = load_genotype(f.genotype or "original").layer_ops()
      width = f.width or config.train.width
    dataset = get_dataset(config.dataset)
    num_classes = dataset.num_classes if f.num_classes is None else f.num_classes
    cost = network_cost(layer_ops, width, f.image_size or config.image_size,
                        in_channels=f.in_channels or dataset.channels,
                        stem=f.stem or config.model.stem,
                        num_classes=num_classes or None)
  except (OSError, TypeError, ValueError) as e:  # OSError: an unloadable --config.
    _fail(str(e))
  print(cost.table())
  if f.json:
    try:
      with open(f.json, "w") as out:
        json.dump(cost.to_dict(), out, indent=2)
    except OSError as e:
      _fail(f"cannot write --json={f.json}: {e}")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
