"""A wheel of the repository, installed into a fresh virtual environment and run from a
directory outside the source tree: python -m fanas_jax.main finds its configs."""
import glob
import os
import shutil
import site
import subprocess
import sys
import zipfile

import pytest

from fanas_jax.cost import load_genotype, network_cost
from tests.conftest import ROOT

# What `pip wheel .` reads: the build files and the package.
BUILD_FILES = ("setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md")


def _run(cmd, **kwargs):
  return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)


def _build_wheel(tmp_path) -> str:
  """`pip wheel --no-deps .` of a copy of the sources, so no build/ is left in the tree."""
  src = tmp_path / "src"
  shutil.copytree(os.path.join(ROOT, "fanas_jax"), src / "fanas_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in BUILD_FILES:
    if os.path.exists(os.path.join(ROOT, name)):
      shutil.copy(os.path.join(ROOT, name), src / name)
  proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
               "-w", str(tmp_path / "dist"), str(src)])
  assert proc.returncode == 0, proc.stderr
  (wheel,) = glob.glob(str(tmp_path / "dist" / "fanas_jax-*.whl"))
  return wheel


def _fresh_venv(tmp_path) -> str:
  """A venv whose only fanas_jax is the wheel's; its dependencies are this test's.

  --system-site-packages reaches the base interpreter's packages only, so a .pth file
  adds the site-packages of the interpreter running this test (a venv, as in CI).
  """
  venv = tmp_path / "venv"
  proc = _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
               str(venv)])
  assert proc.returncode == 0, proc.stderr
  python = str(venv / "bin" / "python")
  venv_site = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                   check=True).stdout.strip()
  with open(os.path.join(venv_site, "test_parent_site.pth"), "w") as f:
    f.write("\n".join(site.getsitepackages()) + "\n")
  return python


@pytest.mark.slow
def test_the_installed_wheel_runs_its_configs_outside_the_source_tree(tmp_path):
  wheel = _build_wheel(tmp_path)
  with zipfile.ZipFile(wheel) as archive:
    packaged = {n for n in archive.namelist() if n.startswith("fanas_jax/configs/")}
  in_tree = {os.path.relpath(p, ROOT).replace(os.sep, "/")
             for p in glob.glob(os.path.join(ROOT, "fanas_jax", "configs", "**", "*.py"),
                                recursive=True)}
  assert in_tree and in_tree <= packaged
  python = _fresh_venv(tmp_path)
  proc = _run([python, "-m", "pip", "install", "--no-deps", "--force-reinstall", "-q",
               wheel])
  assert proc.returncode == 0, proc.stderr

  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

  def fanas(module, *args):
    return _run([python, "-m", module, "--config=configs/quickstart.py:tiny", *args],
                cwd=elsewhere, env=env)

  installed = _run([python, "-c", "import fanas_jax; print(fanas_jax.__file__)"],
                   cwd=elsewhere, env=env, check=True).stdout.strip()
  config = os.path.join(os.path.dirname(installed), "configs", "quickstart.py")
  assert installed.startswith(str(tmp_path / "venv")), installed
  said = f"config configs/quickstart.py is the packaged {config}"

  # The config loads, the override applies and the pipeline's checks run, before compute.
  workdir = elsewhere / "run"
  proc = fanas("fanas_jax.main", f"--workdir={workdir}", "--config.train.width=8",
               "--config.stages=train", "--config.train.genotype=original")
  assert proc.returncode == 2, proc.stderr
  assert f"fanas_jax: {said}" in proc.stdout
  assert [l for l in proc.stderr.splitlines() if l.strip()] == [
      "fanas_jax: error: train.width=8 cannot hold op local3_h8: its 4 op channels must "
      "be even and divisible by 8 heads; use a multiple of 16."]
  assert not workdir.exists()

  # A real computation from the packaged config: the cost of its train network.
  proc = fanas("fanas_jax.cost", "--genotype=original")
  assert proc.returncode == 0, proc.stderr
  expected = network_cost(load_genotype("original").layer_ops(), 16, 8, in_channels=1,
                          stem="attention", num_classes=10)
  assert proc.stdout == f"fanas_jax.cost: {said}\n{expected.table()}\n"
