"""The benchmark command: its table, its JSON and its argument checks (tiny shapes)."""
import json

import pytest

from fanas_jax import benchmark


def test_ops_suite_writes_rows_with_ratios_to_global(tmp_path, capsys):
  path = tmp_path / "bench.json"
  result = benchmark.main([
      "--suite=ops", "--batch=1", "--size=6", "--channels=16", "--heads=2",
      "--windows=3", "--modules=local3_h4,axial_h4", "--dtype=float32", "--iters=2",
      "--warmup=0", f"--json={path}"])
  names = [r["name"] for r in result["rows"]]
  assert names == ["global attention (xla)", "local 3x3 (blocked)", "local 3x3 (scan)",
                   "local3_h4 module", "axial_h4 module"]
  assert result["rows"][0]["vs_global"] == 1.0
  for row in result["rows"]:
    assert row["median_ms"] > 0 and row["macs"] > 0 and row["tflops"] > 0
  assert json.loads(path.read_text())["rows"][1]["name"] == "local 3x3 (blocked)"
  assert "local 3x3 (scan)" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--impls=gather"], "--impls takes blocked, scan"),
    (["--suite=io"], "--suite takes ops, nets and/or input"),
    (["--devices=99"], "--devices 99"),
    (["--windows=4"], "--windows takes odd integers"),
    (["--modules=conv3"], "unknown ops ['conv3']"),
    (["--search_modes=third_order"], "--search_modes takes"),
    (["--channels=30", "--heads=8"], "must split into --heads"),
])
def test_bad_arguments_are_refused_before_compute(args, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    benchmark.parse_args(args)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def test_input_suite_times_the_real_pipeline(tmp_path):
  result = benchmark.main(["--suite=input", "--input_sizes=8,16", "--net_batch=16",
                           "--iters=3", "--warmup=1", f"--json={tmp_path / 'in.json'}"])
  rows = result["rows"]
  assert [r["image_size"] for r in rows] == [8, 16]
  for row in rows:
    assert row["kind"] == "input" and row["batch"] == 16 * result["devices"]
    assert row["median_ms"] > 0 and row["img_per_s"] == pytest.approx(
        row["batch"] / (row["median_ms"] / 1e3))


def test_each_step_gets_the_input_rate_at_its_resolution():
  rows = [dict(name="step", kind="train step", batch=64, devices=2, image_size=32,
               macs=1, median_ms=100.0),
          dict(name="input", kind="input", batch=64, devices=2, image_size=32, macs=0,
               median_ms=400.0),
          dict(name="other", kind="train step", batch=64, devices=2, image_size=224,
               macs=1, median_ms=100.0)]
  benchmark._finish(rows, "float32")
  assert rows[0]["img_per_s"] == 640 and rows[0]["img_per_s_per_device"] == 320
  assert rows[0]["input_img_per_s"] == 160 and rows[0]["input_vs_step"] == 0.25
  assert "input_vs_step" not in rows[2]     # no pipeline row at 224x224
