"""--config=configs/NAME.py reads the packaged config when the working directory has
no such file, and a file of the working directory when it has one."""
import os
import pkgutil

import pytest

import fanas_jax.configs
from fanas_jax import config_files
from fanas_jax.configs import quickstart
from fanas_jax.configs.paper import cifar_search


def test_a_missing_local_file_reads_the_packaged_config(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert config_files.config_path("configs/quickstart.py") == quickstart.__file__
  assert (config_files.config_path("configs/paper/cifar_search.py")
          == cifar_search.__file__)


def test_a_local_file_wins_over_the_packaged_one(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "quickstart.py").write_text("def get_config():\n  return {}\n")
  assert config_files.config_path("configs/quickstart.py") == "configs/quickstart.py"
  mine = tmp_path / "mine.py"
  mine.write_text("def get_config():\n  return {}\n")
  assert config_files.config_path(str(mine)) == str(mine)


def test_the_packaged_configs_are_the_public_modules_of_the_package():
  prefix = "fanas_jax.configs."
  names = {f"configs/{m.name[len(prefix):].replace('.', '/')}.py"
           for m in pkgutil.walk_packages(fanas_jax.configs.__path__, prefix)
           if not m.ispkg and not m.name.split(".")[-1].startswith("_")}
  assert config_files.packaged_configs() == sorted(names)
  assert "configs/quickstart.py" in names and "configs/paper/retrieval.py" in names


def test_an_unknown_config_names_the_choices(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError) as error:
    config_files.config_path("configs/quikstart.py")
  message = str(error.value)
  assert message.startswith(f"--config=configs/quikstart.py: no such file in {tmp_path}")
  assert "valid choices: configs/default.py, " in message
  assert "configs/quickstart.py" in message and "\n" not in message
  with pytest.raises(FileNotFoundError):
    config_files.config_path("elsewhere/quickstart.py")


def test_the_flag_keeps_its_variant_and_says_which_file(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  argv = ["main", "--config=configs/quickstart.py:tiny", "--workdir=w",
          "--config.seed=1"]
  out = config_files.resolve_config_flag(argv, "fanas_jax")
  assert out == ["main", f"--config={quickstart.__file__}:tiny", "--workdir=w",
                 "--config.seed=1"]
  assert capsys.readouterr().out == (
      f"fanas_jax: config configs/quickstart.py is the packaged {quickstart.__file__}\n")
  spaced = config_files.resolve_config_flag(["main", "--config", "configs/default.py"], "x")
  assert spaced == ["main", "--config",
                    os.path.join(os.path.dirname(quickstart.__file__), "default.py")]
