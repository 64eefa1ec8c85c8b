"""The CAR objective: masked image in, clean image as target, L1 (numpy reference)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import types

from fanas_jax.objectives import box_mask, make_objective


def test_car_feeds_the_masked_image_and_scores_l1_to_the_clean_image():
  objective = make_objective("car", types.SimpleNamespace(
      image_size=8, num_boxes=4, box_size=2))
  rng = np.random.default_rng(0)
  clean = rng.standard_normal((3, 8, 8, 1)).astype(np.float32)
  key = jax.random.key(5)
  inputs, target = objective.make_inputs({"image": jnp.asarray(clean),
                                          "label": jnp.zeros(3, jnp.int32)}, key)
  mask = np.asarray(box_mask(key, 8, 4, 2))
  assert 4 <= (mask == 0).sum() <= 16  # four 2x2 boxes, possibly overlapping
  np.testing.assert_array_equal(np.asarray(inputs), clean * mask[None, :, :, None])
  np.testing.assert_array_equal(np.asarray(target), clean)  # the CLEAN image
  pred = rng.standard_normal((3, 8, 8, 1)).astype(np.float32)
  loss, metrics = objective.loss(jnp.asarray(pred), target)
  assert float(loss) == pytest.approx(np.mean(np.abs(pred - clean)), rel=1e-6)
  assert float(metrics["l1"]) == float(loss)
  # Another key masks other boxes: masks are drawn per batch from the step key.
  other, _ = objective.make_inputs({"image": jnp.asarray(clean)}, jax.random.key(6))
  assert not np.array_equal(np.asarray(other), np.asarray(inputs))
