"""The HTTP runtime of the CTT service: what ``service.py`` wires to BentoML besides the model and
the store.

routes     the paths the service answers, public and internal, declared once
schemas    request and response bodies, the text rule, the one error shape
auth       credentials, permissions, who is calling
edges      ASGI layers at the edge: unknown paths, Retry-After, error shape, auth, body limit,
           JSON only, the OpenAPI document
batching   forward passes through BentoML's adaptive batching: tickets, per-item isolation,
           admission by predicted wait
lifecycle  loading with retries, readiness of every worker, drain on SIGTERM
logs       JSON lines; clients' mistakes kept out of the error log
metrics    our Prometheus series
"""
