"""Which file --config=configs/NAME.py[:ARG] reads.

The configs ship inside the package (fanas_jax/configs/), so an installed fanas_jax
runs them from any directory: a path that names no file relative to the working
directory but starts with configs/ is read from the package instead. A file that does
exist there (a user's own configs/NAME.py) is read as given.
"""
from __future__ import annotations

import os

PACKAGED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
PREFIX = "configs/"


def packaged_configs() -> list[str]:
  """The packaged configs, as --config names them (configs/NAME.py, configs/paper/..)."""
  names = []
  for folder, _, files in os.walk(PACKAGED_DIR):
    rel = os.path.relpath(folder, PACKAGED_DIR)
    for file in files:
      if file.endswith(".py") and not file.startswith("_"):
        names.append(os.path.normpath(os.path.join(PREFIX, rel, file)).replace(os.sep, "/"))
  return sorted(names)


def config_path(path: str) -> str:
  """The file --config=PATH reads: PATH if it exists, else the packaged configs/REST.

  Raises FileNotFoundError, listing the packaged configs, when neither exists.
  """
  if os.path.isfile(path):
    return path
  if path.startswith(PREFIX):
    packaged = os.path.join(PACKAGED_DIR, *path[len(PREFIX):].split("/"))
    if os.path.isfile(packaged):
      return packaged
  raise FileNotFoundError(
      f"--config={path}: no such file in {os.getcwd()} nor among the packaged configs; "
      f"valid choices: {', '.join(packaged_configs())} (or the path of a config file).")


def resolve_config_flag(argv: list[str], program: str) -> list[str]:
  """argv with --config=PATH[:ARG] (or --config PATH[:ARG]) naming the file that
  config_path finds; says which when it is the packaged one."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      out[i] = "--config=" + _resolve_spec(arg[len("--config="):], program)
    elif arg == "--config" and i + 1 < len(out):
      out[i + 1] = _resolve_spec(out[i + 1], program)
  return out


def _resolve_spec(spec: str, program: str) -> str:
  path, colon, arg = spec.partition(":")
  found = config_path(path)
  if found != path:
    print(f"{program}: config {path} is the packaged {found}", flush=True)
  return found + colon + arg
