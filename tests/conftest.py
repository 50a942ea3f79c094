"""Shared test set-up: where the official-output fixtures live, and a quiet, reproducible torch."""
import os
from pathlib import Path

# One thread per process: pytest-xdist runs one worker per core, and several tests start subprocesses
# (torchrun, the CLI); more threads than cores makes small tensor ops many times slower (spinning OpenMP
# workers), not faster. Set before torch is imported so subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]


DEFAULT_FIXTURES = REPO / "tests" / "fixtures"   # the official outputs travel with the repository


def fixtures_root() -> Path:
    """$NEON_FIXTURES (another fixture set made the same way), or tests/fixtures of this repository."""
    return Path(os.environ.get("NEON_FIXTURES") or DEFAULT_FIXTURES).resolve()


@pytest.fixture(scope="session")
def fixtures() -> Path:
    root = fixtures_root()
    if not root.is_dir():
        pytest.fail(f"fixture folder {root} not found: set NEON_FIXTURES")
    return root


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A conditional tinypix θr and a synthetic set of it, outside every test's workspace (the bad-input and
    output-boundary tests build their cases from it)."""
    from neon.family import get_family
    from neon.sampling import class_labels, sample_to_npz
    folder = tmp_path_factory.mktemp("base")
    family = get_family("tinypix")
    bundle = family.tiny(num_classes=3, seed=1)
    family.save(bundle, str(folder / "base.pth"))
    seeds = list(range(8))
    sample_to_npz(family, bundle, seeds, class_labels(seeds, bundle.num_classes, "per_class"),
                  str(folder / "s.npz"), batch=4)
    return {"dir": folder, "ckpt": str(folder / "base.pth"), "data": str(folder / "s.npz"), "bundle": bundle}
