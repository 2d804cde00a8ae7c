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
