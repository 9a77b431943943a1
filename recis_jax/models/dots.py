"""The Dense layers' dot and bias add (`layers.Dense`), for XLA:CPU's bfloat16 gradients.

`add_bias`: a bias add whose gradient is summed in float32 (see its docstring).
`dense_dot_general`: the `dot_general` of layers whose bfloat16 weight gradient XLA:CPU
runs slowly:

XLA:CPU (jax 0.11.2) runs bfloat16 dots on AMX / AVX512-BF16 through its YNN fusions at
1.1-1.7 TFLOP/s on a 2-core Xeon, but not a dot that contracts the lhs's leading
dimension, which is what autodiff emits for a Dense layer's weight gradient
(x^T dy over the batch): 0.24 TFLOP/s, below float32's 0.27. Transposing x first does not
help when XLA folds the transpose into the dot's layout; a transpose routed through a
3-D reshape stays a real copy, and the dot on it runs at 0.8 TFLOP/s, copy included
(benchmarks/results/e2e_cpu.md). `dense_dot_general` is that, and plain `lax.dot_general`
everywhere else (other platforms, other dtypes, other dimension numbers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """Drop-in `lax.dot_general` for `nn.Dense(dot_general=...)`: inputs [..., K] @
    kernel [K, N] -> [..., N]; on the CPU with bfloat16 inputs the weight gradient runs
    on a physically transposed copy of the inputs (same math, another summation layout)."""
    standard = dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ()))
    if (jax.default_backend() != "cpu" or not standard or rhs.ndim != 2
            or lhs.dtype != jnp.bfloat16 or rhs.dtype != jnp.bfloat16):
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
    return _cpu_dense(lhs, rhs, precision, preferred_element_type)


def _matmul(x, w, precision, preferred_element_type):
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cpu_dense(x, w, precision, preferred_element_type):
    return _matmul(x, w, precision, preferred_element_type)


def _fwd(x, w, precision, preferred_element_type):
    return _matmul(x, w, precision, preferred_element_type), (x, w)


def _bwd(precision, preferred_element_type, res, g):
    x, w = res
    k, n = w.shape
    x2 = x.reshape(-1, k)
    g2 = g.reshape(-1, n).astype(x.dtype)
    dx = lax.dot_general(g2, w, (((1,), (1,)), ((), ())), precision=precision).reshape(x.shape)
    # x^T through a 3-D reshape: a real transpose that XLA does not fold into the dot.
    xt = jnp.transpose(x2.reshape(x2.shape[0], k, 1), (1, 0, 2)).reshape(k, x2.shape[0])
    dw = lax.dot_general(xt, g2, (((1,), (0,)), ((), ())), precision=precision)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_cpu_dense.defvjp(_fwd, _bwd)


@jax.custom_vjp
def add_bias(y: jax.Array, b: jax.Array) -> jax.Array:
    """y [..., N] + b [N], whose bias gradient is summed in float32.

    Autodiff of the plain add sums the output gradient over the batch in y's dtype: for
    bfloat16 XLA:CPU accumulates in bfloat16, and a sum of 8192 gradients near 1 stalls
    at 2048 (8 mantissa bits), a wrong bias gradient; it also ran that sum as a slow
    reduce-window (55 ms for [8192, 1024] in a sequence model's step). Here the sum is a
    float32-accumulated dot with a ones vector on the CPU (the YNN GEMV), a float32
    reduction elsewhere, rounded to b's dtype at the end."""
    return y + b


def _add_bias_fwd(y, b):
    return y + b, b


def _add_bias_bwd(b, g):
    g2 = g.reshape(-1, g.shape[-1])
    if jax.default_backend() == "cpu":
        db = lax.dot_general(jnp.ones((g2.shape[0],), g2.dtype), g2, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    else:
        db = jnp.sum(g2, axis=0, dtype=jnp.float32)
    return g, db.astype(b.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)
