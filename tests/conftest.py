"""Test-session setup: repo root importable (for configs/), data in a temp dir."""
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Never touch the user's ~/tensorflow_datasets; each session builds its own copy.
os.environ.setdefault("TFDS_DATA_DIR", tempfile.mkdtemp(prefix="fanas_tfds_"))


def pytest_configure(config):
  """`-m "not slow"` leaves out what runs whole stages or fresh processes of JAX."""
  config.addinivalue_line(
      "markers", "slow: runs pipeline stages or subprocesses (minutes on a CPU)")
