"""Test setup: 8 simulated CPU devices (set before jax is imported), the process set-up of an
entry point (flip.process_setup: malloc tuning on the CPU backend, TF kept off any GPU),
`scripts/` importable (the reliability harness runs main.py for the subprocess tests), and the
`slow` marker gated behind FLIP_SLOW_TESTS=1, and torchvision made importable beside the CPU build
of torch (see `make_torchvision_importable`).

A missing prerequisite of a default-suite test (Fashion-MNIST, a tmpfs mount) fails that test
with one line saying what is missing: the suite cannot go green by skipping. Set
FLIP_ALLOW_MISSING_DATA=1 to turn those failures into skips on a machine that cannot have them.
"""

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
import types

import pytest


def make_torchvision_importable() -> None:
  """The parity tests import timm and open_clip, which import torchvision. The torchvision wheel
  the registries serve for torch 2.13 registers meta kernels for its C++ operators at import
  (`torchvision._meta_registrations`), and that fails against the CPU build of torch ("operator
  torchvision::nms does not exist"); nothing the tests use needs those kernels, so that one module
  is an empty module here. This is the only place the tests touch torchvision; flip itself never
  imports torch or torchvision."""
  name = "torchvision._meta_registrations"
  sys.modules.setdefault(name, types.ModuleType(name))


make_torchvision_importable()

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))
SHARED_DIR = REPO_ROOT.parent / "shared"
FASHION_MNIST_DIR = pathlib.Path(
    os.environ.get("FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


# Per-test timeout of slow-marked tests (setup.cfg's `timeout` holds for the others): the slowest
# compile and time whole train steps of the benchmark models.
SLOW_TEST_TIMEOUT = 3600


def pytest_collection_modifyitems(config, items):
  for item in items:
    if "slow" in item.keywords and item.get_closest_marker("timeout") is None:
      item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT))
  if os.environ.get("FLIP_SLOW_TESTS") == "1":
    return
  skip_slow = pytest.mark.skip(reason="slow: set FLIP_SLOW_TESTS=1 (make test-slow)")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def repo_root():
  return REPO_ROOT


ALLOW_MISSING_ENV = "FLIP_ALLOW_MISSING_DATA"


def missing_prerequisite(reason: str):
  """Fails the calling test with `reason`; skips it instead when FLIP_ALLOW_MISSING_DATA=1."""
  if os.environ.get(ALLOW_MISSING_ENV) == "1":
    pytest.skip(f"{reason} ({ALLOW_MISSING_ENV}=1)")
  pytest.fail(f"{reason}; set {ALLOW_MISSING_ENV}=1 to skip the tests that need it",
              pytrace=False)


@pytest.fixture(scope="session")
def fashion_mnist_dir():
  if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
    missing_prerequisite(f"Fashion-MNIST not installed at {FASHION_MNIST_DIR} (make "
                         "fashion-mnist, or apt-get install dataset-fashion-mnist, or set "
                         "FASHION_MNIST=<dir with the idx .gz files>)")
  return FASHION_MNIST_DIR
