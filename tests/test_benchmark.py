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
    (["--suite=io"], "--suite takes ops, nets, input, retrieval, seeds"),
    (["--devices=99"], "--devices 99"),
    (["--windows=4"], "--windows takes odd integers"),
    (["--modules=conv3"], "unknown ops ['conv3']"),
    (["--search_modes=third_order"], "--search_modes takes"),
    (["--channels=30", "--heads=8"], "must split into --heads"),
    (["--supernet_impls=fused"], "--supernet_impls takes per_op, stacked"),
    (["--search_sizes=6"], "--search_sizes takes multiples of 4"),
    (["--seeds=1,4"], "--seeds takes seed counts of 2 or more"),
    (["--seeds=four"], "--seeds takes integers, got 'four'"),
    (["--seed_steps=0"], "--seed_steps must be positive"),
    (["--search_layers=0"], "--search_layers must be positive"),
])
def test_bad_arguments_are_refused_before_compute(args, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    benchmark.parse_args(args)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


@pytest.mark.slow
def test_search_rows_time_each_supernet_impl_side_by_side(tmp_path):
  """The weight-step rows only (no --search_modes): one compile per implementation
  (two h4 ops: stacked shares one 5x5 attention, stacked_window runs one each)."""
  result = benchmark.main([
      "--suite=nets", "--nets=search", "--search_ops=local3_h4,local5_h4",
      "--search_modes=", "--search_sizes=8", "--search_batch=2", "--search_layers=1",
      "--dtype=float32", "--iters=2", "--warmup=0", f"--json={tmp_path / 'b.json'}"])
  rows = result["rows"]
  assert [(r["supernet_impl"], r["image_size"]) for r in rows] == [
      ("per_op", 8), ("stacked", 8), ("stacked_window", 8)]
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


@pytest.mark.parametrize("args, message", [
    (["--search_candidates=1,2"], "--search_candidates takes counts from 2 to 7"),
    (["--search_ops=local3_h4,nonlocal", "--search_candidates=3"],
     "--search_candidates takes counts from 2 to 2"),
    (["--search_candidates=two"], "--search_candidates takes integers, got 'two'"),
    (["--nets=cifar", "--single_op_ratio"], "--single_op_ratio times the supernet's"),
    (["--single_op_ratio=yes"], "--single_op_ratio: ignored explicit argument"),
    (["--search_ops=local3_h4,nonlocal,local3_h4"], "--search_ops lists an op twice"),
])
def test_bad_scaling_arguments_are_refused_before_compute(args, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    benchmark.parse_args(args)
  assert exit_info.value.code == 2
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert last.startswith("python -m fanas_jax.benchmark: error:") and message in last


def test_candidate_counts_default_to_all_ops_and_are_sorted():
  assert benchmark.parse_args([]).search_candidates == [7]
  assert benchmark.parse_args(["--search_candidates=7,2,4,2"]).search_candidates == [2, 4, 7]


def test_scaling_table_has_one_line_per_impl_candidates_and_size():
  def row(impl, n, size, step, ms, compile_s, **extra):
    return dict(kind="search", supernet_impl=impl, num_candidates=n, image_size=size,
                step=step, median_ms=ms, compile_s=compile_s, **extra)
  rows = [row("per_op", 2, 8, "weight", 10.0, 1.5, single_op_sum_ms=8.0,
              vs_single_ops=1.25),
          row("per_op", 2, 8, "first_order", 17.0, 2.5),
          row("stacked", 4, 16, "weight", 30.0, 3.5),
          dict(kind="single op", op="nonlocal", median_ms=4.0, compile_s=1.0)]
  lines = benchmark.scaling_table(rows).splitlines()
  assert "weight ms" in lines[0] and "first_order ms" in lines[0]
  assert lines[2].split() == ["per_op", "2", "8", "10.0", "1.5", "17.0", "2.5", "8.0",
                              "1.25"]
  # The stacked point has no search step and no single-op networks: dashes, not zeros.
  assert lines[3].split() == ["stacked", "4", "16", "30.0", "3.5", "-", "-", "-", "-"]
  assert len(lines) == 4


@pytest.mark.slow
def test_candidates_sweep_and_single_op_ratio_in_one_run(tmp_path, capsys):
  """Weight steps only: the single-op networks of 3 ops, then supernets of 2 and 3."""
  from fanas_jax import cost
  from fanas_jax.genotype import Genotype, SearchSpace
  ops = ["local3_h4", "local5_h4", "nonlocal"]
  path = tmp_path / "scaling.json"
  benchmark.main([
      "--suite=nets", "--nets=search", f"--search_ops={','.join(ops)}",
      "--search_candidates=3,2", "--single_op_ratio", "--supernet_impls=per_op",
      "--search_modes=", "--search_sizes=8", "--search_batch=2", "--search_layers=1",
      "--dtype=float32", "--iters=1", "--warmup=0", f"--json={path}"])
  rows = json.loads(path.read_text())["rows"]
  singles, supernets = rows[:3], rows[3:]
  assert [(r["kind"], r["op"]) for r in singles] == [("single op", op) for op in ops]
  for row in singles:
    # The plain network of that op alone, as its own variable tree says.
    assert row["param_ops"] == [row["op"]] and row["image_size"] == 8
    assert row["layers_per_stage"] == 1
    plain = Genotype(((row["op"],),) * 5).layer_ops()   # --search_layers=1
    assert row["backbone_params"] == cost.network_cost(plain, 16, 8).params
  assert [(r["num_candidates"], r["candidates"]) for r in supernets] == [
      (2, ops[:2]), (3, ops)]
  for row in supernets:
    n = row["num_candidates"]
    assert row["kind"] == "search" and row["param_ops"] == sorted(ops[:n])
    assert row["backbone_params"] == cost.network_cost(
        SearchSpace.uniform(ops[:n], layers=1).layer_ops(), 16, 8).params
    total = sum(s["median_ms"] for s in singles[:n])
    assert row["single_op_sum_ms"] == pytest.approx(total)
    assert row["vs_single_ops"] == pytest.approx(row["median_ms"] / total)
  out = capsys.readouterr().out
  scaling = out[out.index("supernet_impl"):].splitlines()
  assert [line.split()[:3] for line in scaling[2:4]] == [["per_op", "2", "8"],
                                                         ["per_op", "3", "8"]]


def test_seed_rows_compare_one_run_of_n_seeds_with_n_separate_runs(monkeypatch):
  """The ratios of the seeds suite, from made-up runs: N separate runs each compile
  and step; the cheapest N separate runs compile once."""
  runs = {1: (60.0, 30.0, 400.0), 4: (90.0, 100.0, 1500.0)}  # compile s, steps s, step ms

  def fake_run(a, mesh, n, ops):
    compile_s, steps_s, median_ms = runs[n]
    return dict(name=f"{n} seed(s)", num_seeds=n, compile_s=compile_s, steps_s=steps_s,
                run_s=compile_s + steps_s, median_ms=median_ms)

  monkeypatch.setattr(benchmark, "_seed_run", fake_run)
  rows = benchmark.seeds_suite(benchmark.parse_args(["--seeds=4"]))
  assert [r["num_seeds"] for r in rows] == [1, 4]
  assert "vs_separate" not in rows[0]
  assert rows[1]["vs_separate"] == pytest.approx(190.0 / (4 * 90.0))
  assert rows[1]["vs_separate_one_compile"] == pytest.approx(190.0 / (60.0 + 4 * 30.0))
  assert rows[1]["step_vs_separate"] == pytest.approx(1500.0 / (4 * 400.0))
  lines = benchmark.seeds_table(rows).splitlines()
  assert len(lines) == 4 and lines[3].split()[-3:] == ["0.53", "1.06", "0.94"]
