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
    (["--suite=io"], "--suite takes ops, nets, input and/or retrieval"),
    (["--devices=99"], "--devices 99"),
    (["--windows=4"], "--windows takes odd integers"),
    (["--modules=conv3"], "unknown ops ['conv3']"),
    (["--search_modes=third_order"], "--search_modes takes"),
    (["--channels=30", "--heads=8"], "must split into --heads"),
    (["--supernet_impls=fused"], "--supernet_impls takes per_op, stacked"),
    (["--search_sizes=6"], "--search_sizes takes multiples of 4"),
])
def test_bad_arguments_are_refused_before_compute(args, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    benchmark.parse_args(args)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


@pytest.mark.slow
def test_search_rows_time_each_supernet_impl_side_by_side(tmp_path):
  """The weight-step rows only (no --search_modes): one compile per implementation."""
  result = benchmark.main([
      "--suite=nets", "--nets=search", "--search_ops=local3_h4,local5_h4",
      "--search_modes=", "--search_sizes=8", "--search_batch=2",
      "--dtype=float32", "--iters=2", "--warmup=0", f"--json={tmp_path / 'b.json'}"])
  rows = result["rows"]
  assert [(r["supernet_impl"], r["image_size"]) for r in rows] == [
      ("per_op", 8), ("stacked", 8)]
  assert rows[1]["name"] == "supernet weight step (2 ops, stacked, C=16, 8x8)"
  for row in rows:
    assert row["median_ms"] > 0 and row["compile_s"] > 0


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


def test_retrieval_suite_times_the_blockwise_topk_and_its_memory(tmp_path, capsys):
  path = tmp_path / "retrieval.json"
  result = benchmark.main(["--suite=retrieval", "--retrieval_n=601", "--retrieval_dim=16",
                           "--retrieval_k=10", "--retrieval_blocks=16,128", "--iters=2",
                           "--warmup=0", f"--json={path}"])
  small, large = result["rows"]
  assert (small["block"], large["block"]) == (16, 128) and small["kind"] == "retrieval"
  for row in (small, large):
    assert row["median_ms"] > 0 and row["queries_per_s"] == pytest.approx(
        601 / (row["median_ms"] / 1e3))
    # XLA's own account stays below the 601 x 601 matrix the search never builds.
    assert row["memory_mib"] < row["bound_mib"]["full_matrix"] + row["bound_mib"]["inputs"]
  # The working set grows with the query block, linearly.
  assert large["bound_mib"]["block_working"] == pytest.approx(
      8 * small["bound_mib"]["block_working"])
  assert large["memory_mib"] > small["memory_mib"]
  assert json.loads(path.read_text())["rows"][1]["block"] == 128
  assert "top-10 of 601 x 16, block 128" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--retrieval_blocks=0"], "--retrieval_blocks takes positive integers"),
    (["--retrieval_n=100", "--retrieval_k=100"], "--retrieval_k 100 must be 1 to"),
])
def test_bad_retrieval_arguments_are_refused(args, message, capsys):
  with pytest.raises(SystemExit):
    benchmark.parse_args(args)
  assert message in capsys.readouterr().err
