"""Test setup: CPU, x64, 8 fake devices for sharding tests, real-data location."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)

REAL_DATA_ENV = "RECIS_REAL_DATA"


@pytest.fixture(scope="session")
def real_data() -> pathlib.Path:
    """../shared/data, found through $RECIS_REAL_DATA (set by .ci/run).

    Unset: the test is skipped with a visible reason (a user's fresh clone). Set but
    missing: the test fails, so CI cannot silently stop testing on real data.
    """
    root = os.environ.get(REAL_DATA_ENV)
    if not root:
        pytest.skip(f"{REAL_DATA_ENV} is not set: real-data tests skipped (make test sets nothing; .ci/run sets it)")
    path = pathlib.Path(root).resolve()
    if not (path / "recis_deepfm").is_dir() or not (path / "deepctr_samples").is_dir():
        pytest.fail(f"{REAL_DATA_ENV}={root} does not hold recis_deepfm/ and deepctr_samples/")
    return path
