"""Pallas GPU kernels, each beside a pure-jnp reference with the same signature.

Every op module exposes one public function that dispatches through
`pallas_kernels.dispatch.resolve`: the Pallas-Triton kernel on a GPU, the reference
elsewhere, with one override (argument `impl=` or env var RECIS_KERNELS).
"""
