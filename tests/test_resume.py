"""A stage interrupted mid-epoch resumes from its checkpoint to the same result, bitwise,
and its metrics.jsonl loses the records written after that checkpoint."""
import json
import os

import jax
import numpy as np
import pytest

from fanas_jax.configs import quickstart
from fanas_jax import experiment
from fanas_jax.train import load_final_variables
from tests import small_genotype
from tests.interrupt import builder_dying_after_epoch

WALL_CLOCK = ("time", "epoch_seconds")


def _config(genotype):
  c = quickstart.get_config("tiny")
  c.stages = "train"
  c.train.genotype = genotype
  c.train.epochs = 2            # 25 steps per epoch
  c.checkpoint.every_steps = 10  # checkpoints 10, 20, 25, 30, 40, 50
  return c


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}
            for line in f]


# Dies with epoch 2's record written, its checkpoint 50 not yet.
DyingBuilder = builder_dying_after_epoch(2)


@pytest.mark.slow
def test_interrupted_training_resumes_to_the_uninterrupted_result(tmp_path):
  genotype = small_genotype.write(tmp_path / "genotype")
  straight = str(tmp_path / "straight")
  experiment.run(_config(genotype), straight)

  resumed = str(tmp_path / "resumed")
  with pytest.raises(KeyboardInterrupt):
    experiment.run(_config(genotype), resumed, builder=DyingBuilder)
  assert not os.path.exists(os.path.join(resumed, "train", "result.json"))
  assert sorted(os.listdir(os.path.join(resumed, "train", "checkpoints"))) == ["30", "40"]
  assert [r["epoch"] for r in _metrics(resumed)] == [1, 2]
  experiment.run(_config(genotype), resumed)  # From checkpoint 40: 15 steps into epoch 2.

  # Epoch 2's mean over steps 26-50 sums 15 restored steps and 10 new ones, exactly;
  # its record from before the kill is gone, so each record appears once.
  assert _metrics(resumed) == _metrics(straight)
  assert [r.get("epoch") for r in _metrics(resumed)] == [1, 2, None]
  got, want = load_final_variables(resumed, "train"), load_final_variables(straight, "train")
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  with open(os.path.join(resumed, "train", "result.json")) as f, \
       open(os.path.join(straight, "train", "result.json")) as g:
    assert json.load(f) == json.load(g)
