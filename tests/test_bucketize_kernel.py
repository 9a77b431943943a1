"""bucketize: the reference and the Pallas kernel (interpret mode on CPU) vs NumPy.

The compiled kernel is checked on the H100 by `benchmarks/ops.py --device gpu`
(results in benchmarks/results/ops_bucketize_h100.json).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import bucketize as bk
from pallas_kernels import dispatch


def numpy_bucketize(x: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.searchsorted(b, x, side="right").astype(np.int32)
    out[np.isnan(x)] = len(b)
    return out


def make_boundaries(rng, n: int) -> np.ndarray:
    # Sorted, finite, with repeated boundaries when n is large enough.
    b = np.sort(rng.standard_normal(n).astype(np.float32))
    if n >= 8:
        b[n // 2] = b[n // 2 - 1]
    return b


def make_x(rng, size: int, b: np.ndarray) -> np.ndarray:
    """Random x with duplicates, exact boundary values, NaN, +-inf, +-0."""
    x = (rng.standard_normal(size) * 1.5).astype(np.float32)
    if size == 0:
        return x
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, np.nan], np.float32)
    k = min(size, len(specials))
    x[:k] = specials[:k]
    pick = rng.integers(0, size, size // 4)
    x[pick] = rng.choice(b, size=pick.size)                       # equal to a boundary
    dup = rng.integers(0, size, size // 8)
    x[dup] = x[rng.integers(0, size, dup.size)]                   # duplicates
    return rng.permutation(x)


# Block of the interpret-mode runs kept small so that sizes below exercise several
# programs and a partial last block without slow interpretation.
SMALL = bk.Config(block=256)


@pytest.mark.parametrize("impl", ["reference", "interpret"])
class TestBucketize:

    def run(self, impl, x, b, config=None):
        if impl == "interpret":
            # The GPU default layout for this n, with a small block (see SMALL).
            config = config or bk.default_config(len(b))._replace(block=SMALL.block)
            return bk.bucketize_pallas(jnp.asarray(x), jnp.asarray(b), interpret=True,
                                       config=config)
        return bk.bucketize(jnp.asarray(x), jnp.asarray(b), impl=impl)

    def test_pinned_example(self, impl):
        b = np.array([1, 2, 3, 4, 5], np.float32)
        x = np.array([-1, 1, 1.5, 5, 5.5, 0.999], np.float32)
        out = self.run(impl, x, b)
        assert out.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(out), [0, 1, 1, 5, 5, 0])

    @pytest.mark.parametrize("n", [1, 3, 64, 1000, 1024, 4096])
    def test_random(self, impl, n):
        rng = np.random.default_rng(n)
        b = make_boundaries(rng, n)
        x = make_x(rng, 1000, b)   # 1000 = 3 full blocks of 256 + a partial one
        np.testing.assert_array_equal(np.asarray(self.run(impl, x, b)), numpy_bucketize(x, b))

    @pytest.mark.parametrize("shape", [(0,), (1,), (255,), (256,), (257,), (3, 5, 7), (4, 0)])
    def test_shapes(self, impl, shape):
        rng = np.random.default_rng(sum(shape) + len(shape))
        b = make_boundaries(rng, 37)
        x = make_x(rng, int(np.prod(shape)), b).reshape(shape)
        out = self.run(impl, x, b)
        assert out.shape == shape and out.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(out), numpy_bucketize(x.ravel(), b).reshape(shape))

    def test_no_boundaries(self, impl):
        x = np.array([np.nan, -np.inf, 0.0, 3.0], np.float32)
        out = self.run(impl, x, np.zeros((0,), np.float32))
        np.testing.assert_array_equal(np.asarray(out), [0, 0, 0, 0])

    def test_infinities_and_zero(self, impl):
        b = np.array([-1.0, 0.0, 2.0], np.float32)
        x = np.array([np.inf, -np.inf, -0.0, 0.0, np.nan, 2.0, 1e30, -1e30], np.float32)
        np.testing.assert_array_equal(np.asarray(self.run(impl, x, b)),
                                      [3, 0, 2, 2, 3, 3, 3, 0])

    def test_under_jit(self, impl):
        rng = np.random.default_rng(7)
        b = make_boundaries(rng, 10)
        x = make_x(rng, 300, b)
        f = jax.jit(lambda x, b: self.run(impl, x, b))
        np.testing.assert_array_equal(np.asarray(f(x, b)), numpy_bucketize(x, b))


@pytest.mark.parametrize("layout", ["sorted", "eytzinger", "compare"])
@pytest.mark.parametrize("n", [1, 31, 100])
def test_kernel_layouts_interpret(layout, n):
    rng = np.random.default_rng(100 + n)
    b = make_boundaries(rng, n)
    x = make_x(rng, 700, b)
    out = bk.bucketize_pallas(jnp.asarray(x), jnp.asarray(b), interpret=True,
                              config=bk.Config(block=128, layout=layout))
    np.testing.assert_array_equal(np.asarray(out), numpy_bucketize(x, b))


def test_default_config_layouts():
    assert bk.default_config(64).layout == "sorted"
    assert bk.default_config(65).layout == "eytzinger"
    for n in (1, 64, 65, 4096):
        c = bk.default_config(n)
        assert c.block & (c.block - 1) == 0


def test_eytzinger_order_is_inorder():
    for p in (2, 4, 32, 1024):
        perm = bk._eytzinger_order(p)
        assert sorted(perm[1:].tolist()) == list(range(p - 1))


def test_bf16_input_matches_reference():
    rng = np.random.default_rng(3)
    b = jnp.asarray(make_boundaries(rng, 20))
    x = jnp.asarray(make_x(rng, 300, np.asarray(b))).astype(jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(bk.bucketize_pallas(x, b, interpret=True, config=SMALL)),
        np.asarray(bk.bucketize_reference(x, b)))


def test_dispatch_defaults_to_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert jax.default_backend() == "cpu"
    assert dispatch.resolve(None) == "reference"
    b = jnp.array([1.0, 2.0], jnp.float32)
    x = jnp.array([0.5, 1.0, 2.5], jnp.float32)
    np.testing.assert_array_equal(np.asarray(bk.bucketize(x, b)), [0, 1, 2])


def test_pallas_raises_on_cpu():
    with pytest.raises(ValueError, match="needs a GPU"):
        bk.bucketize(jnp.zeros((4,), jnp.float32), jnp.ones((2,), jnp.float32), impl="pallas")


def test_env_var_selects_interpret(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "interpret")
    b = jnp.array([1.0, 2.0, 3.0], jnp.float32)
    x = jnp.array([np.nan, 3.0, 0.0], jnp.float32)
    np.testing.assert_array_equal(np.asarray(bk.bucketize(x, b)), [3, 3, 0])
