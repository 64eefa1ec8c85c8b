"""fanas_jax.notebook, the helpers the colab/ notebooks share."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fanas_jax import notebook


def test_run_shows_the_output_and_raises_on_failure(capsys):
  notebook.run("json.tool", "--help")
  assert "usage:" in capsys.readouterr().out
  # The status json.tool itself exits with: 2 on Python 3.11, 1 on 3.13.
  status = subprocess.run([sys.executable, "-m", "json.tool", "/no/such/file"],
                          capture_output=True).returncode
  assert status != 0
  with pytest.raises(RuntimeError, match=r"python -m json.tool /no/such/file exited with "
                                         rf"status {status}\b"):
    notebook.run("json.tool", "/no/such/file")
  assert "No such file or directory" in capsys.readouterr().out  # stderr, through stdout


def _png(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)


def test_show_genotype_and_heatmaps_print_and_display_the_run(tmp_path, capsys):
  workdir = str(tmp_path)
  record = {"genotype": {"stage1": ["local3_h4", "nonlocal", "local7_h8"]}}
  with open(os.path.join(workdir, "genotype.json"), "w") as f:
    json.dump(record, f)
  for path in ("genotype.png", "search_phase1/alpha_heatmap.png",
               "search_phase2/alpha_heatmap.png"):
    _png(os.path.join(workdir, path))
  assert notebook.show_genotype(workdir) == record
  notebook.show_heatmaps(workdir)
  out = capsys.readouterr().out.splitlines()
  assert out[0] == "stage1: local3_h4, nonlocal, local7_h8"
  assert [line for line in out if line.startswith("search_")] == list(notebook.SEARCH_PHASES)
  with pytest.raises(FileNotFoundError):
    notebook.show_heatmaps(workdir, ["search_phase3"])


def test_read_json_and_jsonl(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write('{"step": 1}\n{"step": 2, "loss": 0.5}\n')
  assert notebook.read_jsonl(str(tmp_path), "metrics.jsonl") == [
      {"step": 1}, {"step": 2, "loss": 0.5}]
  with open(tmp_path / "r.json", "w") as f:
    json.dump({"a": [1]}, f)
  assert notebook.read_json(str(tmp_path), "r.json") == {"a": [1]}
