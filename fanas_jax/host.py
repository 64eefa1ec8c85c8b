"""Settings of the Python process a command runs in (the CLI, the benchmark, the tests'
processes), never made by the library itself: a notebook's kernel keeps its own."""
import gc

# Gen-0 collections every this many net allocations, against CPython's 700 (3.11) or
# 2000 (3.13).
GC_GEN0_THRESHOLD = 50_000


def collect_garbage_less_often() -> None:
  """Fewer, shorter passes of Python's cyclic garbage collector.

  Tracing a step allocates millions of short-lived objects (tracers, jaxpr equations),
  so with CPython's defaults the collector ran about 2,100 times in one tiny command-line
  search, and each older-generation pass walked everything importing jax, flax and
  tensorflow_datasets had left. Those are frozen (gc.freeze: never collected, never
  walked again) and gen 0 is collected less often (README, "Where the time goes"). Only
  when Python collects changes; what is computed does not.
  """
  gc.freeze()
  gen0, gen1, gen2 = gc.get_threshold()
  gc.set_threshold(max(gen0, GC_GEN0_THRESHOLD), gen1, gen2)
