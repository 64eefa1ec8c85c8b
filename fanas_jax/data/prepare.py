"""Prepares one of the paper's datasets from its official archives, offline.

  python -m fanas_jax.data.prepare NAME --manual_dir=DIR [--data_dir=DATA_DIR]

DIR holds the archives as downloaded (a missing one is named with its URL);
DATA_DIR is the TFDS data dir the configs read (default $TFDS_DATA_DIR or
~/tensorflow_datasets). The result is ArrayRecord in TFDS's layout,
DATA_DIR/NAME/VERSION/.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence

from fanas_jax.data import cifar
from fanas_jax.data import datasets
from fanas_jax.data import fine_grained
from fanas_jax.data import imagenet
from fanas_jax.data import manual_builder
from fanas_jax.data.archives import ArchiveError
from fanas_jax.registry import ConfigError, Registry

BUILDERS: Registry[type[manual_builder.ManualBuilder]] = Registry(
    "preparable dataset")
for _cls in (cifar.Cifar10, cifar.Cifar100, fine_grained.CaltechBirds2011,
             fine_grained.Cars196, fine_grained.FgvcAircraft,
             fine_grained.StanfordOnlineProducts, imagenet.Imagenet2012,
             imagenet.Imagenet100_32):
  BUILDERS.add(_cls.name, _cls)


def prepare(name: str, manual_dir: str, data_dir: str = "",
            verify: bool = True) -> manual_builder.ManualBuilder:
  """Builds dataset `name` into `data_dir` (default: the configs' data dir)."""
  builder_cls = BUILDERS.get(name, key="NAME")
  return manual_builder.prepare(builder_cls, manual_dir,
                                data_dir or datasets.default_data_dir(), verify)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m fanas_jax.data.prepare", description=__doc__.split("\n")[0])
  parser.add_argument("name", metavar="NAME",
                      help=f"one of: {', '.join(BUILDERS.names())}")
  parser.add_argument("--manual_dir", required=True,
                      help="directory holding the downloaded archives")
  parser.add_argument("--data_dir", default="",
                      help="TFDS data dir to write (default $TFDS_DATA_DIR or "
                      "~/tensorflow_datasets)")
  parser.add_argument("--noverify", action="store_true",
                      help="skip checking archive sizes and SHA-256")
  return parser.parse_args(argv)


def _warn_in_one_line(message: Warning | str, *args: object, **kwargs: object) -> None:
  del args, kwargs  # Where the warning came from says nothing to a user.
  print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str]) -> int:
  """Runs the command; a bad name or archive is one line on stderr, exit 1."""
  args = _parse(argv)
  with warnings.catch_warnings():
    warnings.showwarning = _warn_in_one_line
    try:
      builder = prepare(args.name, args.manual_dir, args.data_dir, not args.noverify)
    except (ArchiveError, ConfigError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
  sizes = ", ".join(f"{split} {info.num_examples}"
                    for split, info in sorted(builder.info.splits.items()))
  print(f"[data] {args.name} {builder.version} is in {builder.data_dir} ({sizes})")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
