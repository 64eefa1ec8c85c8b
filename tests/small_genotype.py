"""A genotype of one layer per stage, the first layer of each of the paper's stages, for
tests that train a network without needing its size: a third of the original's
bottlenecks, every stage and both bottleneck shapes (stride 1 and 2) still there."""
import json
import os

from fanas_jax.genotype import Genotype, named_genotype

SMALL = Genotype(tuple(ops[:1] for ops in named_genotype("original").stages))


def write(directory) -> str:
  """SMALL as a genotype.json in directory (as `train.genotype` takes it); its path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(str(directory), "small_genotype.json")
  with open(path, "w") as f:
    json.dump({"genotype": SMALL.to_dict(), "rule": "tests"}, f)
  return path
