"""Test setup: CPU, x64, 8 fake devices for sharding tests, real-data location."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
# Many tests compile the same train step; XLA:CPU compiles take seconds on 2 cores, so
# reuse them through JAX's persistent cache (keyed on program, flags and versions).
# Subprocess tests inherit it through the environment.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/recis-jax-test-xla-cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

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
