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

from pathlib import Path
from typing import IO

# ----- the model store -----------------------------------------------------------------------
# Used by model/store/ (layout, versions), model/integrity.py and training/backup.py. BentoML's
# public API registers a model only through ``bentoml.models.create``, which copies a temporary
# folder into the store (not atomic under a kill), and reads a model only through its store
# (which cannot look at a staged or scratch folder): so CTT writes and reads ``model.yaml`` itself,
# with BentoML's own ``ModelInfo`` so that BentoML reads exactly what was written.


def model_store_dir() -> Path:
    """The BentoML home's ``models/`` folder, as BentoML's configuration resolves it."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.model_store_dir.get())


def read_model_info(stream: IO[str]):
    """A ``model.yaml`` as BentoML parses it (tag, labels, metadata, creation time)."""
    from bentoml._internal.models.model import ModelInfo

    return ModelInfo.from_yaml_file(stream)


def new_model_info(tag, labels: dict, metadata: dict):
    """The description of a new version with the given tag, no framework, no signatures."""
    from bentoml._internal.models.model import ModelContext, ModelInfo, ModelOptions

    return ModelInfo(tag=tag, module="", labels=labels, options=ModelOptions(), metadata=metadata,
                     context=ModelContext(framework_name="", framework_versions={}), signatures={},
                     api_version="v1")


def model_info_with_metadata(info, metadata: dict):
    """``info`` with other metadata, everything else (creation time included) the same."""
    from bentoml._internal.models.model import ModelInfo

    return ModelInfo(tag=info.tag, module=info.module, labels=dict(info.labels), options=info.options,
                     metadata=metadata, context=info.context, signatures=info.signatures,
                     api_version=info.api_version, creation_time=info.creation_time)


def write_model_info(stream: IO[str], info) -> None:
    """Write ``info`` as BentoML writes ``model.yaml``."""
    info.dump(stream)



# ----- serving -------------------------------------------------------------------------------
# BentoML labels its request metrics with the raw path, in the outermost middleware of the app it
# builds, before anything a service adds (``add_asgi_middleware`` layers run inside it), so every
# distinct unknown path would add series. A layer outside BentoML's app is the one place to answer
# unknown paths first. BentoML's worker builds a service's app by calling ``service.to_asgi()``
# (``_bentoml_impl/worker/service.py``); ``serve_inside`` gives our one service object a subclass
# whose ``to_asgi`` wraps that app. No BentoML class is replaced and no other service is touched.
#
# The same ``to_asgi`` keeps the ``ServiceAppFactory`` that built the app: it holds the dispatcher
# of each batchable API, and its ``batch_infer`` is what BentoML's own route for such an API calls.
# BentoML's public ways to reach a batchable method from another API of the same worker
# (``self.to_async`` and ``bentoml.depends``) send every call through an HTTP request and the
# worker's whole ASGI stack a second time; measured (docs/benchmarks.md), that cost a third of the
# throughput at 32 clients. ``call_batched`` hands the call to the same dispatcher in-process.
def serve_inside(service, layer) -> None:
    """Make ``bentoml serve`` (and ``service.to_asgi()``) run ``layer(app)`` around ``service``'s app,
    and keep the factory of that app for ``call_batched``."""
    base = type(service)
    if getattr(base, "outer_layer", None) is not None:
        return

    class ServiceWithOuterLayer(base):
        __slots__ = ()  # the same layout as BentoML's slotted Service: the class can be swapped
        outer_layer = layer
        app_factory = None

        def to_asgi(self, is_main: bool = True):
            from _bentoml_impl.server.app import ServiceAppFactory

            # ``Service.to_asgi``, step by step (a test pins its source), keeping the factory.
            self.inject_config()
            factory = ServiceAppFactory(self, is_main=is_main)
            type(self).app_factory = factory
            return layer(factory())

    service.__class__ = ServiceWithOuterLayer


def can_call_batched(service, instance) -> bool:
    """Whether ``instance`` is the one BentoML started for the app of ``service`` this process serves
    (``bentoml serve``'s workers), so that its dispatchers are ``instance``'s."""
    factory = getattr(type(service), "app_factory", None)
    return factory is not None and getattr(factory, "_service_instance", None) is instance


async def call_batched(service, api_name: str, batch: list) -> list:
    """``batch`` through the dispatcher of ``service``'s batchable API ``api_name`` in this worker,
    exactly as BentoML's route for that API hands it over (merged with concurrent calls, the
    ``bentoml_service_adaptive_batch_size`` metric recorded, the method run under the service's
    thread limit): its slice of the output, or the dispatcher's ServiceUnavailable when it sheds."""
    return await type(service).app_factory.batch_infer(api_name, (batch,), {})


# BentoML asks each response for its media type, and for an API whose output is a root model (a
# list, as /classify returns) it finds out by generating that model's whole JSON schema again, on
# every response (``IOMixin.mime_type`` in ``_bentoml_sdk/io_models.py``): 14 % of a worker's CPU
# under load in a py-spy profile, twice per /classify (the front API and the forward pass it
# calls). The method answers ``media_type`` first when it is set: setting it to what the method
# itself would answer, once, at import, changes no response.
def fix_output_media_types(service) -> dict[str, str]:
    """Set each API's output media type to what BentoML would compute for it on every response;
    returns them by API name."""
    settled = {}
    for name, method in service.apis.items():
        spec = method.output_spec
        if spec.media_type is None:
            spec.media_type = spec.mime_type()
        settled[name] = spec.media_type
    return settled


# BentoML reports every exception an API raised (a client's invalid body and its batching
# dispatcher's shedding included) at ERROR, with a traceback, on this logger
# (``bentoml._internal.server.http_app.log_exception``); model/serving/logs.py filters it.
API_EXCEPTION_LOGGER = "bentoml._internal.server.http_app"
