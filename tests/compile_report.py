"""FANAS_TEST_COMPILE_REPORT=FILE: the seconds each test spends tracing, lowering and
compiling with XLA, in this process (a test's subprocesses are not counted; their time
is in --durations). Module fixtures count for the test that first needs them.

FILE starts empty each session; every process of it (each xdist worker) appends one
JSON line per test; the session's summary prints the tests that spend most, and the totals.
"""
import collections
import json
import os

import jax
import pytest

PHASES = {"jaxpr_trace_duration": "trace_s", "jaxpr_to_mlir_module_duration": "lower_s",
          "backend_compile_duration": "compile_s"}


def _union_seconds(spans: list[tuple[float, float]]) -> float:
  """Length of the union of [start, end] spans: nested jits are counted once."""
  total, reach = 0.0, float("-inf")
  for start, end in sorted(spans):
    if end > reach:
      total += end - max(start, reach)
      reach = end
  return total


class Report:
  """A pytest plugin: jax's compile spans, grouped by the test that ran them."""

  def __init__(self, path: str, first: bool):
    """first: the session's first process (before xdist's workers) empties FILE."""
    if first:
      open(path, "w").close()
    self.path, self.test = path, "(collection)"
    self.spans: dict[tuple[str, str], list] = collections.defaultdict(list)
    jax.monitoring.register_event_time_span_listener(self._span)

  def _span(self, event: str, start: float, end: float, **_) -> None:
    phase = PHASES.get(event.rsplit("/", 1)[-1])
    if phase and event.startswith("/jax/core/compile/"):
      self.spans[self.test, phase].append((start, end))

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(self, item):
    self.test = item.nodeid
    yield

  def pytest_sessionfinish(self):
    rows = collections.defaultdict(dict)
    for (test, phase), spans in self.spans.items():
      rows[test][phase] = round(_union_seconds(spans), 2)
    with open(self.path, "a") as f:
      for test, row in rows.items():
        f.write(json.dumps({"test": test, "pid": os.getpid(), **row}) + "\n")

  def pytest_terminal_summary(self, terminalreporter, config):
    if hasattr(config, "workerinput") or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [json.loads(line) for line in f]
    total = lambda r: sum(r.get(p, 0.0) for p in PHASES.values())
    write = terminalreporter.write_line
    write(f"compile report ({self.path}): trace / lower / XLA compile seconds, in-process")
    for row in sorted(rows, key=total, reverse=True)[:30]:
      write(f"{row.get('trace_s', 0):7.1f} {row.get('lower_s', 0):6.1f} "
            f"{row.get('compile_s', 0):7.1f}  {row['test']}")
    sums = [sum(r.get(p, 0.0) for r in rows) for p in PHASES.values()]
    write(f"all tests: trace {sums[0]:.0f} s, lower {sums[1]:.0f} s, XLA compile "
          f"{sums[2]:.0f} s")
