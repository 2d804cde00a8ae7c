"""Every use of a private BentoML API in the project, in one place.

BentoML's public API does not cover everything CTT needs (writing a model folder the store will
list, the store's location, ...). Whatever this project takes from ``bentoml._internal``,
``_bentoml_impl`` or ``_bentoml_sdk`` is imported here and nowhere else, each with the reason it
is needed; ``tests/test_bentoml_internals.py`` checks that BentoML still provides exactly what is
relied on, so an upgrade of the pinned ``bentoml`` that changes any of it fails a test instead of
a deployment. A test also checks that no other module of the project imports a private BentoML
name.
"""

from __future__ import annotations

# ----- the model store -----------------------------------------------------------------------

# ----- serving -------------------------------------------------------------------------------
# BentoML labels its request metrics with the raw path, in the outermost middleware of the app it
# builds, before anything a service adds (``add_asgi_middleware`` layers run inside it), so every
# distinct unknown path would add series. A layer outside BentoML's app is the one place to answer
# unknown paths first. BentoML's worker builds a service's app by calling ``service.to_asgi()``
# (``_bentoml_impl/worker/service.py``); ``serve_inside`` gives our one service object a subclass
# whose ``to_asgi`` wraps that app. No BentoML class is replaced and no other service is touched.
def serve_inside(service, layer) -> None:
    """Make ``bentoml serve`` (and ``service.to_asgi()``) run ``layer(app)`` around ``service``'s app."""
    base = type(service)
    if getattr(base, "outer_layer", None) is not None:
        return

    class ServiceWithOuterLayer(base):
        __slots__ = ()  # the same layout as BentoML's slotted Service: the class can be swapped
        outer_layer = layer

        def to_asgi(self, is_main: bool = True):
            return layer(base.to_asgi(self, is_main=is_main))

    service.__class__ = ServiceWithOuterLayer


# BentoML reports every exception an API raised (a client's invalid body and its batching
# dispatcher's shedding included) at ERROR, with a traceback, on this logger
# (``bentoml._internal.server.http_app.log_exception``); model/serving/logs.py filters it.
API_EXCEPTION_LOGGER = "bentoml._internal.server.http_app"
