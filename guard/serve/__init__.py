"""The guard HTTP service: `python -m guard serve PURIFIED` (guard.cli) runs `serve`.

    app.py       the FastAPI application, GuardService (model, pools, batcher), serve()
    batching.py  dynamic batching: concurrent requests' images in one backend call
    metrics.py   the Prometheus metrics at GET /metrics

Needs the serve extra: pip install 'clip-guard[serve]' (FastAPI, uvicorn, prometheus-client).
docs/serving.md describes the endpoints, the flags, the metrics and the Triton path.
"""
from ..errors import MissingDependencyError

try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as error:
    raise MissingDependencyError(f"the guard service needs FastAPI, uvicorn and prometheus-client ({error}): "
                                 "pip install 'clip-guard[serve]'") from error

from .app import GuardService, RequestError, ServeConfig, create_app, serve  # noqa: E402

__all__ = ["GuardService", "RequestError", "ServeConfig", "create_app", "serve"]
