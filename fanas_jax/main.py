"""Command line: python -m fanas_jax.main --config=configs/NAME.py --workdir=DIR.

Thin on purpose: all logic lives in importable modules (experiment.run), which
Colab notebooks and tests call directly.
"""
import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fanas_jax import config_checks, config_files, experiment, host, parallel
from fanas_jax.data.pipeline import BadExampleError
from fanas_jax.builders import Builder
from fanas_jax.loop import NonFiniteError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file: configs/NAME.py or configs/NAME.py:VARIANT (a "
    "packaged config when no such file is in the working directory).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for results, checkpoints and logs; rerun to resume.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", os.environ.get("FANAS_DISTRIBUTED", "auto"), parallel.DISTRIBUTED_MODES,
    "Join a multi-process job through jax.distributed.initialize: 'auto' does on Cloud "
    "TPU VMs or when JAX_COORDINATOR_ADDRESS or --coordinator_address is set; 'on' "
    "always (the cluster is detected: TPU, SLURM, Open MPI, Kubernetes); 'off' never. "
    "Default from $FANAS_DISTRIBUTED, else 'auto'.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (else from the environment).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (else from the environment).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index (else from the environment).")
flags.mark_flags_as_required(["config", "workdir"])


def _fail(message: str) -> None:
  print(f"fanas_jax: error: {message}", file=sys.stderr)
  sys.exit(2)


def _load_config(argv: list[str]):
  """The config named by --config=PATH[:ARG], loaded the way config_flags does."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return None
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("fanas_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _unknown_override(argv: list[str]) -> str | None:
  """Names the first --config.a.b override whose key the config does not have."""
  try:
    config = _load_config(argv)
  except Exception:  # The config file itself is broken: absl's message says how.
    return None
  if config is None:
    return None
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0].split(".")
    node = config
    for depth, key in enumerate(path):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if key not in keys:
        where = ".".join(path[:depth]) or "the config"
        return (f"unknown config key {'.'.join(path[:depth + 1])!r} in {arg.split('=')[0]}; "
                f"valid keys of {where}: {', '.join(sorted(keys))}.")
      node = node[key]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with one clear line instead of a traceback for a missing
  config file or a bad override."""
  try:
    argv = config_files.resolve_config_flag(argv, "fanas_jax")
  except FileNotFoundError as e:
    _fail(str(e))
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    _fail(_unknown_override(argv) or f"bad config override: {e}")
  return []


def main(argv: list[str], builder: type[Builder] = Builder) -> None:
  """The command; `builder` makes what the stages are built from (tests inject faults)."""
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  host.collect_garbage_less_often()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Keep library INFO logs off the console.
  parallel.initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value,
                                  _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    experiment.run(_CONFIG.value, _WORKDIR.value, builder)
  except config_checks.ConfigError as e:
    _fail(str(e))
  except (NonFiniteError, BadExampleError) as e:
    print(f"fanas_jax: error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
