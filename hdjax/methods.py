"""Imports every decoding method so that it registers itself in `hdjax.api.METHODS`."""
from hdjax.decoding import speculative  # noqa: F401  pld, rest, hd, hd_context, hd_model, hd_stats
from hdjax.adadecode import decode as _adadecode  # noqa: F401  adadecode
from hdjax import lazy as _lazy  # noqa: F401  lazy, lazy_static, lazy_random, lazy_single, full
# lazy+pld, lazy+rest, lazy+hd, lazy+adadecode, hd+adadecode, lazy+hd+adadecode
from hdjax import compose as _compose  # noqa: F401
