"""The CTT BentoML service: every task of one model version behind one batched endpoint.

`bentoml serve` serves the newest `ctt` version in the local store (or CTT_MODEL_TAG);
`bentoml build` pins the exact version into the bento. Each worker merges the items of
concurrent requests, for any mix of tasks, into shared forward passes (model/batching.py); this
file is glue between BentoML, the settings, the model and those parts.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import bentoml
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.batching import BatchFailed, ContinuousBatcher, ItemFailed, Overloaded
from model.errors import CTTError
from model.lifecycle import Activity, ActivityMiddleware, RetryingLoader, ServerReadiness, drain_then_shut_down
from model.feedback.api import (SINCE_PATTERN, FeedbackAccepted, FeedbackMetrics, feedback_request_model,
                                parse_since)
from model.feedback.database import FeedbackDatabase, FeedbackUnavailable, data_dir_for, database_url
from model.feedback.endpoint import FeedbackEndpoint, check_startup_database
from model.precision import MAX_ACCURACY_LOSS, served_precisions, warm_up_or_fall_back
from model.registry import read_config
from model.serving import (CLASSIFY_PATH, FEEDBACK_PATH, FEEDBACK_STATS_PATH, HEALTH_PATH, INTERNAL_PATHS,
                           JSON_BODY_PATHS, MODEL_PATH, PUBLIC_API_PATHS, TASKS_PATH, AuthMiddleware,
                           BodyLimitMiddleware, Credentials, ErrorBody, JSONOnlyMiddleware, Metrics, Prediction,
                           Problem, RetryAfterMiddleware, bound_request_metric_paths, classify_request_model,
                           configure_json_logging, echo)
from model.settings import SecretSource, Settings, check_startup_credentials

# torch and the model are imported in the workers only (see __init__): BentoML's supervisor
# process imports this file too, and without them it starts in a fraction of the time.

try:
    settings = Settings.from_environ()
    credentials = Credentials(settings, SecretSource("API_KEY", reload_s=settings.credentials_reload_s),
                              SecretSource("JWT_SECRET", reload_s=settings.credentials_reload_s))
    check_startup_credentials(settings, credentials.keys, credentials.jwt_secret)
    database_source = SecretSource("DATABASE_URL")
    check_startup_database(settings.environment, settings.fails_closed, database_source.get())
except CTTError as problem:
    # One readable line and a non-zero exit, before BentoML starts anything (it fails closed).
    print(f"ctt: refusing to start: {problem}", file=sys.stderr)
    raise SystemExit(2) from None

logger = logging.getLogger("ctt")
activity = Activity()  # this worker's public API requests, for the drain on SIGTERM
MODEL_TAG = settings.model_tag or f"{settings.model_name}:latest"


def served_task_labels() -> dict[str, list[str]]:
    """Each task of the version this service will serve, with its labels, for the request
    schemas. Empty when the version cannot be read here (the service then fails at start with
    BentoML's own error)."""
    try:
        return {task["name"]: task["labels"] for task in read_config(Path(bentoml.models.get(MODEL_TAG).path))["tasks"]}
    except Exception:
        return {}


SERVED_TASK_LABELS = served_task_labels()
ClassifyRequest = classify_request_model(list(SERVED_TASK_LABELS), settings.max_items, settings.max_text_chars)
FeedbackRequest = feedback_request_model(SERVED_TASK_LABELS, settings.max_items, settings.max_text_chars)
ERRORS = {status: {"model": ErrorBody, "description": meaning} for status, meaning in (
    (400, "The body is not a valid request: `problems` names each item and field."),
    (401, "Missing or invalid credentials."),
    (413, "The body is larger than CTT_MAX_BODY_BYTES."),
    (415, "The body is not JSON."),
    (422, "An item passed validation but the model could not process it; `problems` names it."),
    (503, "The model is loading or the worker's queue is full: retry after the Retry-After header."))}
routes = FastAPI(title="CTT", description="Every task of one continual-learning model, one batched endpoint.")


def error(status: int, message: str, problems: list[Problem] = (), headers: dict | None = None) -> JSONResponse:
    return JSONResponse(ErrorBody(error=message, problems=list(problems)).model_dump(), status_code=status,
                        headers=headers)


@routes.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own errors (a body that is not JSON at all, 404, 405) in the one error shape."""
    if exc.status_code < 500:
        logger.info(f"{exc.status_code} {request.url.path}: {exc.detail}")
    return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


@routes.exception_handler(RequestValidationError)
async def rejected(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A client's mistake: a 400 naming each item and field, logged as one INFO line."""
    problems = [Problem(loc=[part for part in e["loc"] if part != "body"],
                        message=e["msg"].removeprefix("Value error, ")) for e in exc.errors()]
    first = problems[0] if problems else None
    summary = f"{'.'.join(map(str, first.loc)) or 'body'}: {first.message}" if first else "invalid body"
    logger.info(f"400 {request.url.path}: {echo(summary) if len(summary) > 200 else summary}")
    return error(400, f"{len(problems)} problem(s) in the request body", problems)


@bentoml.service(
    name="ctt",
    workers=settings.workers,
    traffic={"timeout": 30},
    metrics={"enabled": settings.monitoring_enabled},
    labels={"project": "ctt"},
)
@bentoml.asgi_app(routes, path="/")
class CTT:
    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    @bentoml.on_deployment
    def warn_when_open() -> None:
        """Runs once, before the workers start."""
        if credentials.open():
            logging.getLogger("bentoml").warning(
                f"ENVIRONMENT={settings.environment} and neither API_KEY nor JWT_SECRET is set: the API is "
                "open to anyone who can reach it (development and test only)")

    def __init__(self) -> None:
        import torch

        from model.store import read_record, task_summaries

        configure_json_logging(settings)
        torch.set_num_threads(settings.torch_threads)
        # Inside a running service the class attribute is the resolved store entry.
        folder = Path(self.model_ref.path)
        self.tag = str(self.model_ref.tag)
        self.info = self.model_ref.info
        self.registry = read_config(folder)
        self.metrics_summary = read_record(folder)
        self.task_summaries = task_summaries(folder)
        # Each task in CTT_PRECISION where this version measured it close enough to fp32, else fp32.
        self.precisions = served_precisions(settings.precision, [t["name"] for t in self.registry["tasks"]],
                                            self.metrics_summary)
        self.metrics = Metrics(settings.monitoring_enabled)
        # Opened lazily and migrated in the background: a database that is down never delays
        # the model, /classify or readiness; /feedback answers 503 until it is back.
        self.feedback_endpoint = FeedbackEndpoint(
            FeedbackDatabase(database_url(database_source.get(), data_dir_for(settings.data_dir)),
                             timeout_s=settings.database_timeout_s),
            FeedbackMetrics(settings.monitoring_enabled), self.tag, self.metrics_summary.get("accuracy") or {})
        self.feedback_endpoint.migrate_in_background()
        self.readiness = ServerReadiness(settings.workers)
        self.batcher = ContinuousBatcher(self._forward, settings.max_batch_size, settings.max_queued_items,
                                         settings.retry_after_s, healthy=self._warm_up)
        # The backbone loads and warms up in the background; readiness waits for every worker.
        self.loader = RetryingLoader(lambda: self._load(folder), settings.load_attempts,
                                     on_loaded=self._loaded).start()
        global this_worker
        this_worker = self

    def _load(self, folder: Path):
        from model.ctt import ContinualTinyTransformer
        from model.integrity import verify_version

        # Every file against the digests recorded at registration: a tampered or damaged version
        # never serves, and its CTTError (naming the file) is what /health shows.
        verify_version(folder)
        model = ContinualTinyTransformer.load(folder, settings.max_tasks)
        self.precisions = warm_up_or_fall_back(lambda precisions: self._warm_up(model, precisions),
                                               self.precisions, lambda message: logger.error(message, exc_info=True))
        return model

    def _warm_up(self, model=None, precisions: dict[str, str] | None = None) -> bool:
        """Every task once on a known-good text, in the precision it is served in (the first int8
        pass quantises the backbone); also the batcher's health probe."""
        model = model or self.loader.value
        model.predict(["warm-up"] * len(model.tasks), model.task_names, precisions=precisions or self.precisions)
        return True

    def _loaded(self, model) -> None:
        self.metrics.record_model(self.tag, settings.environment, len(model.tasks), self.precisions)
        self.readiness.mark_ready()
        fallback = sorted(task for task, precision in self.precisions.items() if precision != settings.precision)
        if fallback:
            logger.warning(f"CTT_PRECISION={settings.precision}, but {self.tag} did not measure {len(fallback)} "
                           f"task(s) within {100 * MAX_ACCURACY_LOSS:g} point of fp32 in it: serving "
                           f"{', '.join(fallback[:10])}{' …' if len(fallback) > 10 else ''} in fp32")
        logger.info(f"model {self.tag} ready: {len(model.tasks)} tasks, backbone {model.backbone.info.spec}, "
                    f"precision {settings.precision}")

    @bentoml.on_startup
    def drain_on_sigterm(self) -> None:
        drain_then_shut_down(self.readiness, activity, settings.shutdown_drain_s)

    @bentoml.on_shutdown
    def stop_forward_thread(self) -> None:
        self.batcher.shutdown()

    def __is_ready__(self) -> bool:
        return self.loader.value is not None and self.readiness.all_ready()

    def __is_alive__(self) -> bool:
        return not self.loader.gave_up

    def _forward(self, items: list) -> list[Prediction]:
        """One forward pass over items from any number of requests (runs in the forward thread)."""
        model = self.loader.value
        assert model is not None
        tasks = [item.task for item in items]
        started = time.perf_counter()
        predictions = model.predict([item.text for item in items], tasks, batch_size=settings.max_batch_size,
                                    precisions=self.precisions)
        self.metrics.record_batch(tasks, time.perf_counter() - started)
        return [Prediction(task=p.task, label=p.label, score=p.score,
                           probabilities=p.probabilities if item.probabilities else None)
                for item, p in zip(items, predictions)]

    async def classify(self, body) -> list[Prediction] | JSONResponse:
        """The work of POST /classify (the route itself is `classify` below the class)."""
        if self.loader.value is None:
            return error(503, self.loader.public_problem or "the model is still loading")
        try:
            return await self.batcher.submit(body.items)
        except Overloaded as exc:
            self.metrics.record_shed()
            return error(503, str(exc))
        except ItemFailed as exc:
            logger.warning(f"422 {CLASSIFY_PATH}: {exc}")
            return error(422, str(exc), [Problem(loc=["items", exc.index, "text"], message=str(exc))])
        except BatchFailed:
            return error(500, "the forward pass failed; the service log has the reason")
        finally:
            self.metrics.record_queue(self.batcher.queued_items)

    @routes.get(TASKS_PATH)
    def tasks(self) -> dict:
        """Learned tasks with their labels and accuracies."""
        return {"version": self.tag, "tasks": self.task_summaries}

    @routes.get(MODEL_PATH)
    def model_card(self) -> dict:
        """The served version: tag, lineage, backbone, metrics summary."""
        metadata = self.info.metadata
        return {
            "tag": self.tag, "parent": metadata.get("parent"), "created": self.info.creation_time.isoformat(),
            "labels": dict(self.info.labels), "backbone": self.registry["backbone"],
            "max_length": self.registry["max_length"], "task_count": len(self.registry["tasks"]),
            "metrics": {key: self.metrics_summary.get(key) for key in ("mean_accuracy", "bwt", "mean_forgetting", "accuracy")},
            "environment": settings.environment,
            # What CTT_PRECISION asked for, and what each task is served in (fp32 where the version
            # did not measure the requested precision within tolerance).
            "precision": {"setting": settings.precision, "tasks": self.precisions,
                          "max_accuracy_loss": MAX_ACCURACY_LOSS},
        }

    @routes.post(FEEDBACK_PATH, response_model=FeedbackAccepted, responses=ERRORS)
    def feedback(self, body: FeedbackRequest):  # type: ignore[valid-type]
        """Store the right label of served texts: a sampled `review` or a user's `correction`. A 200
        means every row is committed; an `id` already stored is not stored again (retries are safe).
        503 with Retry-After while the database is unreachable."""
        try:
            return self.feedback_endpoint.store([item.to_item() for item in body.items])
        except FeedbackUnavailable as exc:
            logger.warning(f"503 {FEEDBACK_PATH}: {exc}")
            return error(503, str(exc))

    @routes.get(FEEDBACK_STATS_PATH, responses=ERRORS)
    def feedback_stats(self, since: str | None = Query(None, pattern=SINCE_PATTERN, description=(
            "Only rows stored in this last stretch of time: 30m, 12h, 7d or 4w."))):
        """Live accuracy per task: feedback rows by source, how often the served prediction agreed
        with the feedback label (reviews are the unbiased measure), the version's measured accuracy."""
        try:
            return self.feedback_endpoint.stats(parse_since(since, "since") if since else None)
        except FeedbackUnavailable as exc:
            return error(503, str(exc))

    @routes.get(HEALTH_PATH)
    def health(self):
        """This worker: 200 once its model is loaded and warmed up; 503 with the state until then."""
        loaded = self.loader.value is not None
        status = "ok" if loaded else "failed" if self.loader.gave_up else "loading"
        body = {"status": status, "model": self.tag, "environment": settings.environment,
                "ready_workers": self.readiness.ready_workers(), "workers": settings.workers}
        if self.loader.public_problem:
            body["problem"] = self.loader.public_problem
        return JSONResponse(body, status_code=200 if loaded else 503)


this_worker: CTT | None = None  # the one service instance of this worker process (set in __init__)


@routes.post(CLASSIFY_PATH, response_model=list[Prediction], responses=ERRORS)
async def classify(body: ClassifyRequest):  # type: ignore[valid-type]
    """Classify texts, each for its own task; items of concurrent requests share forward passes."""
    # A plain function, not a method like the other routes: BentoML hands a method its `self`
    # through a synchronous FastAPI dependency, which costs every request a round trip through
    # the thread pool (a seventh of the HTTP stack's time in a py-spy profile of /classify).
    if this_worker is None:
        return error(503, "the model is still loading")
    return await this_worker.classify(body)


# Unknown paths share one metrics label instead of adding series (BentoML labels raw paths).
bound_request_metric_paths(frozenset(PUBLIC_API_PATHS + INTERNAL_PATHS), ("/static_content/",))
# Starlette wraps middlewares in the order added, the first outermost: Retry-After on every 503
# (the one place that sets it: routes answer a bare 503),
# then auth (headers only), then the body limit reads a body.
CTT.add_asgi_middleware(RetryAfterMiddleware, retry_after_s=settings.retry_after_s)
CTT.add_asgi_middleware(AuthMiddleware, credentials=credentials)
CTT.add_asgi_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
CTT.add_asgi_middleware(JSONOnlyMiddleware, paths=frozenset(JSON_BODY_PATHS))
CTT.add_asgi_middleware(ActivityMiddleware, activity=activity, paths=frozenset(PUBLIC_API_PATHS))
