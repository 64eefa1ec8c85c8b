"""The stage registry: a `stages` list whose needs nothing meets fails in one line
before compute; a need met by an earlier stage, a finished one in the workdir or a
named genotype runs; search objectives without a search head are refused."""
import json
import os
import subprocess
import sys

import pytest

from fanas_jax.configs import quickstart
from fanas_jax.config_checks import ConfigError, validate
from fanas_jax.stage import Need, provider
from fanas_jax.stages import STAGES
from tests.conftest import ROOT


def _config(stages, **train):
  c = quickstart.get_config("tiny")
  c.stages = stages
  c.train.update(train)
  return c


def _finish(workdir, stage, result):
  os.makedirs(os.path.join(workdir, stage), exist_ok=True)
  with open(os.path.join(workdir, stage, "result.json"), "w") as f:
    json.dump(result, f)


def test_every_pipeline_stage_is_registered():
  assert STAGES.names() == ["baseline", "derive", "finetune", "retrieval", "search_phase1",
                           "search_phase2", "train"]
  with pytest.raises(ConfigError, match="Unknown stage 'trian' in config key stages; valid "
                     "choices: baseline, derive, finetune, retrieval, search_phase1, "
                     "search_phase2, train"):
    validate(_config("trian"))


def test_train_before_anything_that_derives_is_refused_in_one_line(tmp_path):
  with pytest.raises(ConfigError) as error:
    validate(_config("train,search_phase1"), str(tmp_path))
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith("stage train needs a derived genotype from derive "
                            "(train.genotype='searched')")
  assert ("put derive before train, or name a genotype (train.genotype: original or a "
          "genotype.json)") in message
  validate(_config("train,search_phase1"))  # Without a workdir only the keys are checked.


@pytest.mark.parametrize("stages, genotype, on_disk", [
    ("search_phase1,derive,train", "searched", ()),   # an earlier stage derives it
    ("train,search_phase1", "searched", ("derive",)),  # a finished derive is in the workdir
    ("train,retrieval", "original", ()),              # a named genotype needs nothing
    ("derive", "searched", ("search_phase1",)),       # derive finds a finished search
])
def test_needs_met_earlier_on_disk_or_by_name_pass(tmp_path, stages, genotype, on_disk):
  for stage in on_disk:
    _finish(str(tmp_path), stage, {})
  validate(_config(stages, genotype=genotype), str(tmp_path))


def test_alpha_source_must_come_first():
  config = _config("search_phase2,search_phase1")
  with pytest.raises(ConfigError, match=r"stage search_phase2 needs alphas from "
                     r"search_phase1 \(search_phase2.init_alpha_from='search_phase1'\)"):
    validate(config, "/nonexistent")
  config.search_phase2.init_alpha_from = ""
  validate(config, "/nonexistent")


def test_provider_prefers_the_nearest_earlier_stage_then_the_workdir_order(tmp_path):
  need = Need("searched alphas", ("search_phase2", "search_phase1"), "derive")
  assert provider(need, ["search_phase2", "search_phase1"], None) == "search_phase1"
  assert provider(need, ["train"], str(tmp_path)) is None
  _finish(str(tmp_path), "search_phase1", {})
  assert provider(need, [], str(tmp_path)) == "search_phase1"
  _finish(str(tmp_path), "search_phase2", {})
  assert provider(need, [], str(tmp_path)) == "search_phase2"


def test_search_objective_without_a_search_head_is_refused():
  config = _config("search_phase1")
  config.search_phase1.objective = "proxy_anchor"
  with pytest.raises(ConfigError) as error:
    validate(config)
  assert str(error.value) == (
      "search_phase1.objective='proxy_anchor' trains the embedding head, which a search "
      "supernet does not carry; valid choices: car, cpc, supervised.")


def test_bad_stage_order_fails_on_the_command_line_before_compute(tmp_path):
  workdir = tmp_path / "w"
  proc = subprocess.run(
      [sys.executable, "-m", "fanas_jax.main", "--config=configs/quickstart.py:tiny",
       f"--workdir={workdir}", "--config.stages=train,search_phase1"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("fanas_jax: error: stage train needs")
  assert not os.path.exists(workdir / "config.json")


def test_a_later_run_may_add_stages_to_a_workdir_but_not_change_the_rest(tmp_path):
  """config.json pins every key but `stages`, which records every stage run there, in
  the order first run; the summary keeps the earlier stages' sections."""
  from fanas_jax.experiment import pin_config as pin_names
  from fanas_jax.stages import stage_names
  pin_config = lambda c, w: pin_names(c, w, stage_names(c))
  workdir = str(tmp_path)
  assert pin_config(_config("search_phase1,search_phase2,derive"), workdir) == [
      "search_phase1", "search_phase2", "derive"]
  assert pin_config(_config("derive,train,baseline"), workdir) == [
      "search_phase1", "search_phase2", "derive", "train", "baseline"]
  with open(tmp_path / "config.json") as f:
    recorded = json.load(f)
  assert recorded["stages"] == "search_phase1,search_phase2,derive,train,baseline"
  assert "compile_cache" not in recorded
  assert pin_config(_config("train"), workdir)[-2:] == ["train", "baseline"]
  with pytest.raises(ConfigError, match=r"different config \(train.epochs: 1 -> 2\)"):
    pin_config(_config("train", epochs=2), workdir)
