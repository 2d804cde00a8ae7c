"""The paths the service answers, declared once.

``service.py`` serves them; the Ingress routes exactly ``PUBLIC_API_PATHS``; the outermost layer of
the service answers any other path 404 before BentoML's request metrics see it, so the metric
series stay bounded; and a test checks that the served OpenAPI document has no path outside these
lists, so a route added later can be exposed (or hidden) only on purpose.
"""

from __future__ import annotations

CLASSIFY_PATH = "/classify"
TASKS_PATH = "/tasks"
MODEL_PATH = "/model"
FEEDBACK_PATH = "/feedback"
FEEDBACK_STATS_PATH = "/feedback/stats"
HEALTH_PATH = "/health"
# The batched forward pass that /classify hands its tickets to through BentoML's dispatcher,
# in-process (model/serving/batching.py). BentoML gives every API a route; nothing calls this one
# over HTTP, so it is not served: the outermost layer answers it 404 like any unknown path, and a
# client can neither reach the dispatcher past admission nor fill its passes.
FORWARD_PASS_PATH = "/internal/forward-pass"

# Every public API: POST (BentoML's APIs, for its clients) and, for the read-only ones, GET.
PUBLIC_API_PATHS = (CLASSIFY_PATH, TASKS_PATH, MODEL_PATH, FEEDBACK_PATH, FEEDBACK_STATS_PATH)
READ_ONLY_PATHS = (TASKS_PATH, MODEL_PATH, FEEDBACK_STATS_PATH)
API_PATHS = PUBLIC_API_PATHS + (FORWARD_PASS_PATH,)  # every BentoML API of the service
# The methods each API path answers (a 405 lists them in Allow).
API_METHODS = {path: ("GET", "POST") if path in READ_ONLY_PATHS else ("POST",) for path in API_PATHS}
# BentoML's probes, metrics, schema and UI, and our /health: reachable inside the cluster only,
# never routed by the Ingress, and open (no credentials).
INTERNAL_PATHS = ("/livez", "/readyz", "/healthz", HEALTH_PATH, "/metrics", "/", "/docs.json", "/schema.json")
# BentoML's UI assets (the page at / loads them).
INTERNAL_PREFIXES = ("/static_content/", "/assets/")
OPEN_PATHS = frozenset(INTERNAL_PATHS)
SERVED_PATHS = frozenset(PUBLIC_API_PATHS + INTERNAL_PATHS)


def is_served(path: str) -> bool:
    return path in SERVED_PATHS or path.startswith(INTERNAL_PREFIXES)


def is_open(path: str) -> bool:
    """Paths that need no credentials (probes, metrics, docs)."""
    return path in OPEN_PATHS or path.startswith(INTERNAL_PREFIXES)
