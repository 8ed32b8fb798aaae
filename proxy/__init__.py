__version__ = "0.1.0"

import os as _os

if _os.environ.get("AUTOCERT_PROXY_PURE_PYTHON"):   # the request path from its sources (_source.py)
    from ._source import use_sources as _use_sources
    _use_sources()
