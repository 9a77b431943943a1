"""recis-jax: sparse + dense recommendation training on JAX/XLA.

IDs are int64 end to end, so 64-bit types are enabled on import; every float dtype in
the code is explicit, so nothing silently becomes float64 on the device.
"""

import jax

jax.config.update("jax_enable_x64", True)

from recis_jax.ragged import Ragged, capacity_bucket  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Ragged", "capacity_bucket", "__version__"]
