"""Data parallelism: N devices give the 1-device run with the same global batch.

Each case runs in a fresh process with 8 fake CPU devices (tests/multidevice_steps.py),
which runs the same real steps on a 1-device and an 8-device mesh. Weights, alphas,
batch-norm statistics, both optimizer states and every step's metrics must agree
(float32, relative difference under 1e-5), and every device must hold the same alphas
bit for bit. Unsynchronised batch-norm statistics or unaveraged gradients would be off
by far more: each device sees 2 of the 16 examples.
"""
import collections
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.multidevice_steps import CASES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
TOLERANCE = 1e-5


def run_with_devices(module: str, *args: str, devices: int = DEVICES,
                     timeout: int = 900) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _relative(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a.astype(np.float64), b.astype(np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _group(name: str) -> str:
  """'state/.params[...]' -> 'state/params'; 'metrics0/[...]' -> 'metrics0'."""
  head, rest = name.split("/", 1)
  return head if head != "state" else "state/" + rest.lstrip(".").split("[")[0]


@pytest.fixture(scope="module", params=sorted(CASES))
def run(request, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("md") / f"{request.param}.npz")
  run_with_devices("tests.multidevice_steps", request.param, path)
  data = np.load(path)
  one = {k[4:]: data[k] for k in data.files if k.startswith("one/")}
  many = {k[5:]: data[k] for k in data.files if k.startswith("many/")}
  return request.param, int(data["devices"]), one, many


@pytest.mark.slow
def test_same_leaves_and_integer_state(run):
  _, devices, one, many = run
  assert devices == DEVICES
  assert one.keys() == many.keys()
  for name, value in one.items():
    if value.dtype.kind != "f":
      np.testing.assert_array_equal(many[name], value, err_msg=name)


@pytest.mark.slow
def test_state_and_metrics_match_one_device(run):
  """Each part of the state (params, batch_stats, alphas, each optimizer state) and
  each step's metrics, as one vector: relative L2 difference under 1e-5."""
  case, _, one, many = run
  sums = collections.defaultdict(lambda: np.zeros(2))
  for name, value in one.items():
    if value.dtype.kind == "f" and not name.startswith("alpha_copies"):
      a, b = many[name].astype(np.float64), value.astype(np.float64)
      sums[_group(name)] += [np.sum((a - b) ** 2), np.sum(b ** 2)]
  expected = {"state/params", "state/batch_stats", "metrics0", "metrics2"}
  expected |= ({"state/opt_state"} if case == "train" else
               {"state/alphas", "state/w_opt_state", "state/a_opt_state"})
  assert expected <= sums.keys()
  worst = {g: float(np.sqrt(d / n)) for g, (d, n) in sums.items()}
  assert max(worst.values()) < TOLERANCE, worst


@pytest.mark.slow
def test_every_metric_and_alpha_matches_one_device(run):
  _, _, one, many = run
  for name, value in one.items():
    if value.dtype.kind == "f" and (name.startswith("metrics") or "alphas" in name):
      assert _relative(many[name], value) < TOLERANCE, name


@pytest.mark.slow
def test_alphas_are_identical_on_every_device(run):
  case, _, _, many = run
  copies = {k: v for k, v in many.items() if k.startswith("alpha_copies/")}
  assert bool(copies) == (case != "train")  # a derived network's train step has none
  for name, stack in copies.items():
    assert stack.shape[0] == DEVICES
    for copy in stack[1:]:
      np.testing.assert_array_equal(copy, stack[0], err_msg=name)
    np.testing.assert_array_equal(stack[0], many[f"state/.alphas['{name.split('/')[1]}']"])


@pytest.mark.slow
@pytest.mark.parametrize("eval_batch", [16, 40])
def test_padded_evaluation_equals_a_numpy_loop(tmp_path, eval_batch):
  """359 test digits, a global batch that does not divide them, 8 devices: top-1 and
  Recall@K equal a one-example-at-a-time numpy loop exactly."""
  path = str(tmp_path / "eval.npz")
  run_with_devices("tests.multidevice_eval", str(eval_batch), path)
  d = np.load(path)
  assert int(d["devices"]) == DEVICES and int(d["loop_total"]) == 359
  assert 359 % eval_batch
  assert len(np.unique(d["loop_predictions"])) > 3     # the predictions vary
  assert int(d["total"]) == 359
  assert int(d["correct"]) == int(d["loop_correct"])
  np.testing.assert_array_equal(d["recall"], d["loop_recall"])


# ------------------------------------------ config and launch checks (this process)


def _quick_config(**overrides):
  from fanas_jax.configs import quickstart
  config = quickstart.get_config("tiny")
  config.update(overrides)
  return config


@pytest.mark.parametrize("overrides, message", [
    (dict(num_devices=4), "num_devices=4 asks for a mesh of 4 devices, but 1 cpu device"),
    (dict(num_devices=-1), "num_devices=-1"),
    (dict(lr_reference_batch=-8), "lr_reference_batch=-8 must be a non-negative"),
    (dict(data_workers=-1), "data_workers=-1 must be a non-negative"),
])
def test_bad_mesh_and_scaling_settings_fail_before_compute(overrides, message):
  import jax
  from fanas_jax.config_checks import ConfigError, validate
  assert jax.device_count() == 1
  with pytest.raises(ConfigError, match=message):
    validate(_quick_config(**overrides))


def test_linear_lr_scaling_multiplies_every_weight_learning_rate():
  import jax.numpy as jnp
  from fanas_jax import optim, parallel
  config = _quick_config()
  assert parallel.lr_scale(448, 56) == 8.0 and parallel.lr_scale(448, 0) == 1.0
  cfg = config.train
  base, scaled = optim.train_schedule(cfg, 10), optim.train_schedule(cfg, 10, 8.0)
  for step in (0, 5, cfg.warmup_epochs * 10, cfg.epochs * 10):
    assert float(scaled(jnp.asarray(step))) == pytest.approx(8 * float(base(jnp.asarray(step))))


def test_distributed_start_is_opt_in(monkeypatch):
  from fanas_jax import parallel
  for name in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(parallel, "_tpu_host", lambda: False)
  calls = []
  monkeypatch.setattr(parallel.jax.distributed, "initialize",
                      lambda **kwargs: calls.append(kwargs))
  assert parallel.initialize_distributed("auto") is False
  assert parallel.initialize_distributed("off", "host:1", 2, 0) is False
  assert calls == []
  assert parallel.initialize_distributed("auto", "host0:1234", 2, 1) is True
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:1234")
  assert parallel.initialize_distributed("auto") is True
  assert calls == [dict(coordinator_address="host0:1234", num_processes=2, process_id=1),
                   dict(coordinator_address=None, num_processes=None, process_id=None)]
  with pytest.raises(ValueError, match="distributed='maybe' is not one of: auto, on, off"):
    parallel.initialize_distributed("maybe")


def test_fingerprint_sees_every_value_dtype_shape_and_name():
  """What `replicate` compares between processes: any changed leaf changes it."""
  from fanas_jax import parallel
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  last_bit = a.copy()
  last_bit[1, 2] = np.nextafter(a[1, 2], np.float32(9))
  tree = {"a": a, "b": [np.int32(7)]}
  changed = [
      {"a": a, "b": [np.int32(8)]},                  # a value
      {"a": last_bit, "b": [np.int32(7)]},           # one bit of one element
      {"a": a.astype(np.int32), "b": [np.int32(7)]},  # a dtype
      {"a": a.reshape(3, 2), "b": [np.int32(7)]},     # a shape
      {"c": a, "b": [np.int32(7)]},                  # a name
      {"a": a, "b": [np.int32(7), np.int32(0)]},      # a leaf more
  ]
  assert parallel.fingerprint(tree) == parallel.fingerprint(
      {"a": a.copy(), "b": [np.int32(7)]})
  assert len({int(parallel.fingerprint(t)) for t in [tree, *changed]}) == 1 + len(changed)
