"""The loop's parts one by one: loop state, epoch meter, fault guard, preemption, and
the TensorBoard purge step of a resumed writer."""
import glob
import json
import os
import signal
import struct
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fanas_jax import loop
from fanas_jax.logging_utils import MetricWriter
from fanas_jax.registry import ConfigError


def test_loop_state_counts_steps_epochs_and_round_trips_json():
  state = loop.LoopState(steps_per_epoch=4, epochs=2)
  for _ in range(6):
    state.batch += 1
    if state.epoch_ended:
      state.epoch, state.batch = state.epoch + 1, 0
  assert (state.epoch, state.batch, state.position) == (1, 2, 6)
  assert not state.finished and state.epoch_of(4) == 1 and state.epoch_of(5) == 2
  saved = json.loads(json.dumps(state.to_json()))
  assert saved == {"epoch": 1, "batch": 2, "step": 6}
  other = loop.LoopState(steps_per_epoch=4, epochs=2)
  other.load(saved)
  assert other == state


def test_epoch_meter_is_exact_through_json():
  rng = np.random.default_rng(0)
  steps = [{"loss": jnp.float32(rng.normal()), "count": jnp.int32(i)} for i in range(7)]
  straight = loop.EpochMeter()
  for m in steps:
    straight.add(m)
  resumed = loop.EpochMeter()
  for m in steps[:3]:
    resumed.add(m)
  restored = loop.EpochMeter()
  restored.load(json.loads(json.dumps(resumed.to_json())))
  for m in steps[3:]:
    restored.add(m)
  assert restored.count == straight.count == 7
  want = {k: np.asarray(v) for k, v in straight.sums.items()}
  got = {k: np.asarray(v) for k, v in restored.sums.items()}
  assert {k: v.dtype for k, v in got.items()} == {"loss": np.float32, "count": np.int32}
  assert all(got[k].tobytes() == want[k].tobytes() for k in want)  # bitwise
  assert straight.means()["count"] == pytest.approx(sum(range(7)) / 7)
  straight.reset()
  assert straight.sums is None and straight.count == 0


def test_epoch_meter_flags_non_finite_steps():
  meter = loop.EpochMeter()
  assert bool(meter.add({"loss": jnp.float32(1.0)}))
  assert not bool(meter.add({"loss": jnp.float32(np.nan)}))


def _bad(guard):
  return guard.check(jnp.asarray(False), {"loss": jnp.float32(np.inf),
                                          "acc": jnp.float32(0.5)}, 7, 2, "/ck/6 (step 6)")


def test_fault_guard_stops_with_one_line_naming_step_and_checkpoint():
  guard = loop.FaultGuard("train", "stop", max_rollbacks=3)
  guard.check(jnp.asarray(True), {"loss": jnp.float32(1.0)}, 1, 1, "none")
  with pytest.raises(loop.NonFiniteError) as error:
    _bad(guard)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith("[train] non-finite loss=inf at step 7 (epoch 2); last good "
                            "checkpoint: /ck/6 (step 6);")
  assert "nan_policy='rollback'" in message


def test_fault_guard_rolls_back_until_max_rollbacks_then_stops():
  guard = loop.FaultGuard("train", "rollback", max_rollbacks=1)
  with pytest.raises(loop.Rollback) as bad:
    _bad(guard)
  assert (bad.value.step, bad.value.nonfinite) == (7, ["loss"])
  guard.skipped[7] = bad.value.nonfinite
  assert guard.skips(7) and not guard.skips(8)
  with pytest.raises(loop.NonFiniteError, match=r"gave up after skipping 1 batches"):
    _bad(guard)
  other = loop.FaultGuard("train", "rollback", max_rollbacks=1)
  other.load(json.loads(json.dumps(guard.to_json())))
  assert other.skipped == {7: ["loss"]}


def test_preemption_catches_sigterm_only_while_catching():
  preemption = loop.Preemption()
  before = signal.getsignal(signal.SIGTERM)
  with preemption.catching():
    assert not preemption.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.requested
  assert signal.getsignal(signal.SIGTERM) is before
  with preemption.catching():  # A new stage starts unrequested.
    assert not preemption.requested


@pytest.mark.parametrize("key, value, message", [
    ("nan_policy", "skip", "checkpoint.nan_policy='skip' is not one of: rollback, stop"),
    ("max_rollbacks", True, "checkpoint.max_rollbacks=True must be an integer >= 0"),
])
def test_checkpoint_config_is_checked_where_it_is_used(key, value, message):
  ckpt = ml_collections.ConfigDict(dict(every_steps=0, keep=2, keep_every_epochs=0,
                                        nan_policy="stop", max_rollbacks=3))
  loop.check_config(ckpt)
  ckpt[key] = value
  with pytest.raises(ConfigError, match=message):
    loop.check_config(ckpt)


def _events(directory):
  """Every event of the TensorBoard files in `directory` (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  events = []
  for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[at + 12:at + 12 + length])
      events.append(event)
      at += 12 + length + 4
  return events


def test_resumed_writer_purges_tensorboard_from_the_resumed_step(tmp_path):
  first = MetricWriter(str(tmp_path), "train")
  for step in (1, 2, 3):
    first.write(step, {"loss": float(step)})
  first.close()
  time.sleep(1.1)  # Event files are named by the second they are opened in.
  resumed = MetricWriter(str(tmp_path), "train", purge_step=2)
  resumed.write(2, {"loss": 20.0})
  resumed.close()
  events = _events(str(tmp_path / "tensorboard" / "train"))
  starts = [e.step for e in events if e.HasField("session_log")
            and e.session_log.status == e.session_log.START]
  assert starts == [2]  # TensorBoard hides the first writer's steps >= 2.
  scalars = [(e.step, v.simple_value) for e in events for v in e.summary.value]
  assert scalars == [(1, 1.0), (2, 2.0), (3, 3.0), (2, 20.0)]
