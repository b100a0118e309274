"""Test setup: 8 simulated CPU devices (set before jax is imported), the process set-up of an
entry point (flip.process_setup: malloc tuning on the CPU backend, TF kept off any GPU),
`scripts/` importable (the reliability harness runs main.py for the subprocess tests), and the
`slow` marker gated behind FLIP_SLOW_TESTS=1."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from flip import process_setup  # pylint: disable=wrong-import-position

process_setup.configure_process()  # as an entry point does: malloc on CPU, TF off GPUs

import pathlib
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))
SHARED_DIR = REPO_ROOT.parent / "shared"
FASHION_MNIST_DIR = pathlib.Path(
    os.environ.get("FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


def pytest_collection_modifyitems(config, items):
  if os.environ.get("FLIP_SLOW_TESTS") == "1":
    return
  skip_slow = pytest.mark.skip(reason="slow: set FLIP_SLOW_TESTS=1 (make test-slow)")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def repo_root():
  return REPO_ROOT


@pytest.fixture(scope="session")
def fashion_mnist_dir():
  if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
    pytest.skip(f"Fashion-MNIST not installed at {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")
  return FASHION_MNIST_DIR
