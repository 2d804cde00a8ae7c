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
