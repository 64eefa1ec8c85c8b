"""Genotype validation messages, serialisation of every named genotype, the figure.

tests/test_derive.py covers the derive rules and a first pass over validation;
here each error is checked for what a user needs from it: what was wrong, where,
and what would be right.
"""
import json

import numpy as np
import pytest
from PIL import Image

from fanas_jax.genotype import (NAMED_GENOTYPES, DeriveLimits, Genotype, genotype_from_file,
                               named_genotype)
from fanas_jax.plots import op_family, plot_genotype
from fanas_jax.ops.layers import OPS

ORIGINAL = NAMED_GENOTYPES["original"]


def _with_stage(stage: int, ops) -> tuple:
  return ORIGINAL.stages[:stage] + (tuple(ops),) + ORIGINAL.stages[stage + 1:]


def test_unknown_op_is_named_with_every_valid_op():
  with pytest.raises(ValueError) as info:
    Genotype(_with_stage(2, ("local3_h4", "conv3x3", "local3_h4")))
  message = str(info.value)
  assert "'conv3x3'" in message and "config key genotype" in message
  assert all(op in message for op in OPS.names())


@pytest.mark.parametrize("count", [4, 6])
def test_wrong_number_of_stages(count):
  stages = (ORIGINAL.stages * 2)[:count]
  with pytest.raises(ValueError, match=f"A genotype has 5 stages, got {count}."):
    Genotype(stages)


@pytest.mark.parametrize("layers", [0, 2, 4])
def test_wrong_number_of_layers_names_the_stage(layers):
  with pytest.raises(ValueError, match=f"stage4 of the genotype has {layers} layers; "
                                       "every stage needs the same number"):
    Genotype(_with_stage(3, ("local3_h4",) * layers))


def test_a_genotype_of_one_layer_per_stage():
  g = Genotype((("local3_h4",), ("local5_h8",), ("nonlocal",), ("local7_h4",),
                ("local3_h8",)))
  assert g.layers == 1 and g.layer_ops()[1] == (("local5_h8",),)
  assert Genotype.from_json(g.to_json()) == g
  assert g.table().splitlines()[:3] == [
      "| stage | kind | layer 1 |", "|---|---|---|", "| 1 | normal | local3_h4 |"]


@pytest.mark.parametrize("stage, ops, problem", [
    (0, ("local7_h4", "local7_h8", "local3_h4"), "2 7x7 local ops (at most 1)"),
    (4, ("nonlocal", "local3_h4", "nonlocal"), "2 global ops (at most 1)"),
    (2, ("nonlocal", "local7_h4", "nonlocal"), "2 global ops (at most 1)"),
    (1, ("local7_h4", "local7_h4", "local7_h4"), "3 7x7 local ops (at most 1)"),
])
def test_broken_limits_name_the_stage_and_the_problem(stage, ops, problem):
  genotype = Genotype(_with_stage(stage, ops))
  with pytest.raises(ValueError) as info:
    genotype.check_limits(DeriveLimits(1, 1))
  message = str(info.value)
  assert message.startswith(f"Genotype stage{stage + 1} {list(ops)} breaks the derive limits")
  assert problem in message
  assert sum(f"stage{s + 1} " in message for s in range(5)) == 1  # Only that stage.


def test_both_problems_of_a_stage_are_listed_and_limits_can_be_lifted():
  genotype = Genotype(_with_stage(4, ("nonlocal", "local7_h4", "local7_h8")))
  genotype.check_limits(DeriveLimits(2, 1))
  genotype.check_limits(DeriveLimits(None, None))
  twice = Genotype(_with_stage(4, ("nonlocal", "nonlocal", "local7_h8")))
  twice.check_limits(DeriveLimits(1, None))
  plain = (("local3_h4",) * 3,) * 4
  both = Genotype(plain + (("nonlocal", "local7_h4", "nonlocal"),))
  with pytest.raises(ValueError,
                     match=r"stage5 .* 1 7x7 local ops \(at most 0\); 2 global ops"):
    both.check_limits(DeriveLimits(0, 1))


@pytest.mark.parametrize("name", sorted(NAMED_GENOTYPES))
def test_named_genotypes_round_trip(name):
  genotype = NAMED_GENOTYPES[name]
  as_dict = genotype.to_dict()
  assert list(as_dict) == [f"stage{s + 1}" for s in range(5)]
  assert Genotype.from_dict(as_dict) == genotype
  assert Genotype.from_dict(json.loads(json.dumps(as_dict))) == genotype
  text = genotype.to_json()
  assert json.loads(text) == as_dict
  assert Genotype.from_json(text) == genotype
  assert hash(Genotype.from_json(text)) == hash(genotype)


def test_lists_are_frozen_to_tuples():
  genotype = Genotype([list(ops) for ops in ORIGINAL.stages])
  assert genotype == ORIGINAL and isinstance(genotype.stages[0], tuple)


@pytest.mark.parametrize("keys", [
    ["stage1", "stage2", "stage3", "stage4"],
    ["stage1", "stage2", "stage3", "stage4", "stage5", "stage6"],
    ["stage0", "stage1", "stage2", "stage3", "stage4"],
    ["layer1", "layer2", "layer3", "layer4", "layer5"],
])
def test_from_dict_with_wrong_keys_lists_the_expected_ones(keys):
  d = {k: list(ORIGINAL.stages[0]) for k in keys}
  with pytest.raises(ValueError) as info:
    Genotype.from_dict(d)
  message = str(info.value)
  assert "['stage1', 'stage2', 'stage3', 'stage4', 'stage5']" in message
  assert f"got {sorted(keys)}" in message


def test_from_json_checks_ops():
  d = ORIGINAL.to_dict()
  d["stage3"][1] = "local9_h4"
  with pytest.raises(ValueError, match="Unknown attention op 'local9_h4'"):
    Genotype.from_json(json.dumps(d))


def test_op_family():
  assert [op_family(op) for op in ("local3_h8", "local7_h4", "nonlocal")] == [
      "local 3x3", "local 7x7", "global"]
  with pytest.raises(ValueError, match="valid choices"):
    op_family("conv3x3")


def test_plot_genotype_colours_boxes_by_family(tmp_path):
  """The PNG exists and shows the colours of the families it uses, and no other."""
  import matplotlib.pyplot as plt
  path = tmp_path / "genotype.png"
  plot_genotype(ORIGINAL, str(path), title="original")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert path.stat().st_size > 10_000
  pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
  assert pixels.shape[0] > 600 * 200

  def shows(colour) -> bool:
    rgb = np.round(np.asarray(colour[:3]) * 255).astype(int)
    return bool((np.abs(pixels - rgb).max(axis=1) <= 2).sum() > 500)

  tab10 = plt.get_cmap("tab10").colors
  # Families in registry order: local 3x3, 5x5, 7x7, then others, global last.
  assert shows(tab10[0]) and shows(tab10[1]) and shows(tab10[2])  # 3x3, 5x5, 7x7.
  global_colour = tab10[len({op_family(op) for op in OPS.names()}) - 1]
  assert shows(global_colour)  # The nonlocal of stage 5.
  unused = [c for c in tab10[3:] if c != global_colour]
  assert not any(shows(c) for c in unused)


def test_genotype_files_read_as_run_records_or_bare_genotypes(tmp_path):
  original = named_genotype("original")
  (tmp_path / "record.json").write_text(json.dumps(
      {"genotype": original.to_dict(), "rule": "constrained", "alphas": {}}))
  (tmp_path / "bare.json").write_text(original.to_json())
  for name in ("record.json", "bare.json"):
    assert genotype_from_file(str(tmp_path / name), "train.genotype") == original


@pytest.mark.parametrize("content, message", [
    (None, "no such genotype file"),
    ("{not json", "does not read as JSON"),
    ("[1, 2]", "is not a genotype: expected {stage1"),
    ('{"stage1": ["local3_h4"]}', "is not a genotype: A genotype has the keys"),
    ("BAD_OP", "is not a genotype: Unknown attention op 'conv3'"),
])
def test_bad_genotype_files_fail_in_one_line_naming_the_key(tmp_path, content, message):
  path = tmp_path / "g.json"
  if content == "BAD_OP":
    d = named_genotype("original").to_dict()
    d["stage3"] = ["conv3", "local3_h4", "local3_h4"]
    content = json.dumps({"genotype": d})
  if content is not None:
    path.write_text(content)
  with pytest.raises(ValueError) as error:
    genotype_from_file(str(path), "finetune.genotype")
  text = str(error.value)
  assert "\n" not in text and text.startswith(f"finetune.genotype={str(path)!r}")
  assert message in text
