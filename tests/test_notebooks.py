"""The Colab notebooks (colab/*.ipynb): each in sync with its jupytext .py, and each run
top to bottom at tiny sizes, install cell left out, showing its figures and numbers.

In tiny mode each notebook runs the programs of an existing tiny test (quickstart:
test_end_to_end's command; paper_cifar10 and search_your_images: the :tiny configs of
test_paper_configs), so the session's compilation cache serves them.
"""
from __future__ import annotations

import json
import os
import re

import jupytext
import nbformat
from nbclient import NotebookClient
import pytest

from fanas_jax.data import imagenet
from tests import fake_archives
from tests.conftest import ROOT

COLAB = os.path.join(ROOT, "colab")
NOTEBOOKS = ("quickstart", "search_your_images", "paper_cifar10")
SHAPES = ("circle", "square", "triangle", "cross", "ring", "hstripes", "vstripes",
          "diamond", "dots", "checker")


def _tags(cell) -> tuple[str, ...]:
  return tuple(cell.metadata.get("tags", ()))


def _cells(notebook) -> list[tuple[str, str, tuple[str, ...]]]:
  return [(c.cell_type, c.source, _tags(c)) for c in notebook.cells]


# The notebooks as files.


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_and_its_py_read_to_the_same_cells(name):
  ipynb = jupytext.read(os.path.join(COLAB, f"{name}.ipynb"))
  py = jupytext.read(os.path.join(COLAB, f"{name}.py"))
  assert _cells(ipynb) == _cells(py)
  assert ipynb.metadata["kernelspec"] == py.metadata["kernelspec"]
  assert ipynb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_states_its_needs_and_tags_its_install_and_parameters(name):
  notebook = nbformat.read(os.path.join(COLAB, f"{name}.ipynb"), as_version=4)
  first = notebook.cells[0]
  assert first.cell_type == "markdown"
  assert "**Runtime:**" in first.source and "**Time:**" in first.source
  install = [c for c in notebook.cells if "install" in _tags(c)]
  assert len(install) == 1 and "%pip install" in install[0].source
  assert "OWNER/fanas_jax" in install[0].source
  parameters = [c for c in notebook.cells if "parameters" in _tags(c)]
  assert len(parameters) == 1 and "FANAS_NOTEBOOK_TINY" in parameters[0].source
  assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code")


# The notebooks run.


def _execute(name: str, workdir: str, monkeypatch, **env: str):
  """The notebook run in a fresh kernel from the repository root, install cell left
  out, at tiny sizes; a cell that raises fails here."""
  notebook = nbformat.read(os.path.join(COLAB, f"{name}.ipynb"), as_version=4)
  notebook.cells = [c for c in notebook.cells if "install" not in _tags(c)]
  monkeypatch.setenv("FANAS_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("FANAS_NOTEBOOK_WORKDIR", workdir)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  monkeypatch.delenv("MPLBACKEND", raising=False)  # Figures inline, as in Colab.
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  NotebookClient(notebook, timeout=2700, kernel_name="python3",
                 resources={"metadata": {"path": ROOT}}).execute()
  return notebook


def _outputs(notebook) -> list[dict]:
  return [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]


def _figures(notebook) -> int:
  return sum("image/png" in o.get("data", {}) for o in _outputs(notebook))


def _text(notebook) -> str:
  parts = []
  for o in _outputs(notebook):
    parts.append(o.get("text", ""))
    for kind in ("text/plain", "text/markdown"):
      parts.append(o.get("data", {}).get(kind, ""))
  return "\n".join(parts)


def _result(workdir: str, stage: str) -> dict:
  with open(os.path.join(workdir, stage, "result.json")) as f:
    return json.load(f)


@pytest.mark.slow
def test_quickstart_notebook(tmp_path, monkeypatch):
  workdir = str(tmp_path / "quickstart")
  notebook = _execute("quickstart", workdir, monkeypatch)
  text = _text(notebook)
  assert "[search_phase2] epoch 1: mean entropy" in text  # the run's own progress
  assert _figures(notebook) >= 4  # two alpha heatmaps, the genotype, the scalars
  train, retrieval = _result(workdir, "train"), _result(workdir, "retrieval")
  assert f"| train | test top-1 {train['test_top1']:.4f} on 359 images |" in text
  assert (f"test top-1 {train['test_top1']:.4f}; Recall@1 "
          f"{retrieval['recall']['1']:.3f}") in text
  with open(os.path.join(workdir, "genotype.json")) as f:
    genotype = json.load(f)["genotype"]
  for stage, ops in genotype.items():
    assert f"{stage}: {', '.join(ops)}" in text


@pytest.mark.slow
def test_search_your_images_notebook(tmp_path, monkeypatch):
  workdir = str(tmp_path / "mine")
  notebook = _execute("search_your_images", workdir, monkeypatch)
  text = _text(notebook)
  # 32 training images, the classes in turn, as many as the tests' tiny datasets hold
  # (the compiled steps depend on the steps per epoch); 20 test images.
  for split, counts in (("train", [4, 4] + [3] * 8), ("test", [2] * 10)):
    assert [len(os.listdir(os.path.join(workdir, "images", split, shape)))
            for shape in SHAPES] == counts
  # The generated samples, the genotype, the alpha heatmap and the predictions.
  assert _figures(notebook) >= 4
  train = _result(os.path.join(workdir, "run"), "train")
  assert f"test top-1 {train['test_top1']:.4f} on 20 test images" in text
  predictions = re.findall(r"test image (\d+): predicted (\w+), true (\w+)", text)
  # The first test image of each class, in the folder's order: by class name.
  assert [(int(i), true) for i, _, true in predictions] == [
      (2 * k, shape) for k, shape in enumerate(sorted(SHAPES))]
  assert all(predicted in SHAPES for _, predicted, _ in predictions)


@pytest.fixture
def paper_archives(tmp_path) -> str:
  """cifar-10-python.tar.gz and the two ImageNet tars, tiny, in the real layout.

  35 CIFAR training images and 32 of ImageNet-100 give the steps per epoch of
  test_paper_configs' fakes (32 each), which the compiled steps depend on.
  """
  manual = str(tmp_path / "archives")
  os.makedirs(manual)
  fake_archives.cifar(manual, hundred=False, per_file=7)
  truth = imagenet.validation_synsets()
  cmc = set(imagenet.CMC_IMAGENET100)
  val = [n for n in range(1, len(truth) + 1) if truth[n - 1] in cmc][:2]
  fake_archives.imagenet(manual, list(imagenet.CMC_IMAGENET100[:16]), val)
  return manual


@pytest.mark.slow
def test_paper_cifar10_notebook(tmp_path, monkeypatch, paper_archives):
  drive = str(tmp_path / "drive")
  notebook = _execute("paper_cifar10", drive, monkeypatch,
                      FANAS_NOTEBOOK_ARCHIVES=paper_archives)
  text = _text(notebook)
  data = os.path.join(drive, "tensorflow_datasets")
  assert f"[data] cifar10 3.0.2 is in {data}/cifar10/3.0.2 (test 7, train 35)" in text
  assert f"[data] imagenet100_32 1.0.0 is in {data}/imagenet100_32/1.0.0" in text
  # The genotype, both alpha heatmaps, the training loss.
  assert _figures(notebook) >= 4
  runs = os.path.join(drive, "runs")
  with open(os.path.join(runs, "cifar_search", "genotype.json")) as f:
    for stage, ops in json.load(f)["genotype"].items():
      assert f"{stage}: {', '.join(ops)}" in text
  train = _result(os.path.join(runs, "cifar_original"), "train")
  assert train["width"] == 16 and train["epochs"] == 1
  assert f"original: test top-1 {train['test_top1']:.4f} on 7 test images" in text
