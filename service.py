"""The CTT BentoML service: every task of one model version behind one batched endpoint.

`bentoml serve` serves the newest `ctt` version in the local store (or CTT_MODEL_TAG); `bentoml
build` pins the exact version into the bento. Every public operation is a BentoML API, so BentoML's
clients (`bentoml.SyncHTTPClient(url).classify(items=[...])`) and other services
(`bentoml.depends(CTT)`) call it like any BentoML service; the read-only ones are also GET routes
for plain HTTP. `/classify` hands its items to a batchable forward pass, so BentoML's adaptive
batching merges concurrent requests of any mix of tasks into shared passes. This file is glue
between BentoML, the settings, the model and the HTTP runtime in model/serving/.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from typing import Annotated

import anyio
import bentoml
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.bentoml_internals import (API_EXCEPTION_LOGGER, call_batched, can_call_batched, fix_output_media_types,
                                     serve_inside)
from model.errors import CTTError
from model.feedback.ages import SINCE_PATTERN, parse_since
from model.feedback.database import FeedbackDatabase, data_dir_for, database_url
from model.precision import REFERENCE_PRECISION, fast_path_verdicts, served_precisions, warm_up_or_fall_back
from model.registry import read_config
from model.serving.auth import INTERNAL, Credentials, check_startup_credentials
from model.serving.batching import Admission, DispatcherGate, ForwardPass, Overloaded, Tickets, through_the_gate
from model.serving.edges import (AuthMiddleware, BodyLimitMiddleware, ErrorShapeMiddleware, JSONOnlyMiddleware,
                                 KnownPathsOnly, OpenAPIDocumentMiddleware, RetryAfterMiddleware, complete_openapi)
from model.serving.feedback import (FeedbackAccepted, FeedbackConflict, FeedbackEndpoint, FeedbackForbidden,
                                    FeedbackInvalid, FeedbackMetrics, FeedbackUnavailable, check_startup_database,
                                    feedback_request_model)
from model.serving.lifecycle import (Activity, ActivityMiddleware, RetryingLoader, ServerReadiness, drain_then_shut_down,
                                     raise_open_file_limit)
from model.serving.logs import OncePer, configure_json_logging, quiet_client_errors
from model.serving.metrics import Metrics
from model.serving.routes import (API_METHODS, API_PATHS, CLASSIFY_PATH, FEEDBACK_PATH, FEEDBACK_STATS_PATH,
                                  FORWARD_PASS_PATH, HEALTH_PATH, MODEL_PATH, PUBLIC_API_PATHS, TASKS_PATH)
from model.serving.schemas import (ErrorBody, FeedbackStats, Health, ModelCard, NoInput, PassOutcome, Prediction,
                                   Problem, TasksDocument, TaskSummary, classify_request_model,
                                   feedback_stats_request_model)
from model.settings import REQUEST_TIMEOUT_S, SecretSource, Settings

# torch and the model are imported in the workers only (see __init__): BentoML's supervisor
# process imports this file too, and without them it starts in a fraction of the time.

try:
    settings = Settings.from_environ()
    credentials = Credentials(settings, SecretSource("API_KEY", reload_s=settings.credentials_reload_s),
                              SecretSource("JWT_SECRET", reload_s=settings.credentials_reload_s))
    check_startup_credentials(settings, credentials)
    database_source = SecretSource("DATABASE_URL")
    check_startup_database(settings.environment, settings.fails_closed, database_source.get())
except CTTError as problem:
    # One readable line and a non-zero exit, before BentoML starts anything (it fails closed).
    print(f"ctt: refusing to start: {problem}", file=sys.stderr)
    raise SystemExit(2) from None

logger = logging.getLogger("ctt")
MODEL_TAG = settings.model_tag or f"{settings.model_name}:latest"
# Every 503 the service answers says when to retry; a request admitted is answered within about
# CTT_MAX_WAIT_S; BentoML's dispatcher cancels what its own estimate puts beyond twice that.
BATCH_LATENCY_BACKSTOP_MS = int(2000 * settings.max_wait_s)
# A line of ~40 tokens: a warm-up pass of these, full width, measures what a pass of real texts costs.
WARM_UP_TEXT = ("The quarterly report shows that revenue from the new product line grew faster than "
                "expected, while costs in the older divisions stayed roughly where they were last year.")
# Per path, the errors it answers (the OpenAPI document lists exactly these, each with ErrorBody).
ERROR_STATUSES = {CLASSIFY_PATH: (400, 401, 403, 413, 415, 422, 500, 503),
                  TASKS_PATH: (400, 401, 403, 413, 415, 503), MODEL_PATH: (400, 401, 403, 413, 415, 503),
                  FEEDBACK_PATH: (400, 401, 403, 409, 413, 415, 503),
                  FEEDBACK_STATS_PATH: (400, 401, 403, 413, 415, 503)}


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


def error(status: int, message: str, problems: list[Problem] = (), ctx: bentoml.Context | None = None) -> JSONResponse:
    """An error in the one shape. An API that takes ``ctx`` answers with ``ctx``'s status, so it is set too."""
    if ctx is not None:
        ctx.response.status_code = status
    return JSONResponse(ErrorBody(error=message, problems=list(problems)).model_dump(), status_code=status)


# ----- GET routes for plain HTTP: each calls the one implementation its BentoML API calls -----
http_routes = FastAPI(title="CTT", docs_url=None, redoc_url=None, openapi_url=None)


def this_service() -> "CTT":
    return bentoml.get_current_service()


def this_service_if_started() -> "CTT | None":
    try:
        return bentoml.get_current_service()
    except BentoMLException:
        return None


@http_routes.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(ErrorBody(error=str(exc.detail)).model_dump(), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


@http_routes.exception_handler(RequestValidationError)
async def rejected(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A client's mistake in a query: 400 naming the parameter (model/serving/edges.py logs it)."""
    problems = [Problem(loc=list(e["loc"]), message=e["msg"].removeprefix("Value error, ")) for e in exc.errors()]
    return JSONResponse(ErrorBody(error=f"{len(problems)} problem(s) in the request", problems=problems).model_dump(),
                        status_code=400)


@http_routes.get(TASKS_PATH, response_model=TasksDocument)
async def get_tasks():
    """Learned tasks with their labels and accuracies (also `POST /tasks`, BentoML's `client.tasks()`)."""
    return this_service().tasks_document()


@http_routes.get(MODEL_PATH, response_model=ModelCard)
async def get_model_card():
    """The served version: tag, lineage, backbone, metrics summary, precision of each task (also
    `POST /model`, BentoML's `client.model_card()`)."""
    return this_service().model_card_document()


@http_routes.get(FEEDBACK_STATS_PATH, response_model=FeedbackStats)
async def get_feedback_stats(since: str | None = Query(None, pattern=SINCE_PATTERN, description=(
        "Only rows stored in this last stretch of time: 30m, 12h, 7d or 4w."))):
    """Live accuracy per task (also `POST /feedback/stats`, BentoML's `client.feedback_stats()`)."""
    return await this_service().feedback_stats_document(since)


@http_routes.get(HEALTH_PATH, response_model=Health, responses={503: {"model": Health}})
async def get_health():
    """This worker: 200 once its model is loaded and warmed up; 503 with the state until then."""
    document = this_service().health_document()
    return JSONResponse(document.model_dump(exclude_none=True), status_code=200 if document.status == "ok" else 503)


@bentoml.service(
    name="ctt",
    workers=settings.workers,
    traffic={"timeout": REQUEST_TIMEOUT_S, "max_concurrency": settings.max_concurrency * settings.workers},
    metrics={"enabled": settings.monitoring_enabled},
    logging={"access": {"skip_paths": ["/metrics", "/healthz", "/livez", "/readyz"]}},
    labels={"project": "ctt"},
)
@bentoml.asgi_app(http_routes, path="/")
class CTT:
    """Every task of one continual-learning model version, one batched endpoint."""

    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    @bentoml.on_deployment
    def warn_when_open() -> None:
        """Runs once, before the workers start."""
        warn = logging.getLogger("bentoml").warning
        if credentials.open():
            warn(f"ENVIRONMENT={settings.environment} and neither API_KEY nor JWT_SECRET is set: the API is "
                 "open to anyone who can reach it (development and test only)")
        for line in credentials.startup_warnings():
            warn(line)

    def __init__(self) -> None:
        import torch

        configure_json_logging(settings)
        quiet_client_errors(API_EXCEPTION_LOGGER, frozenset(API_PATHS))
        torch.set_num_threads(settings.torch_threads)
        before, after = raise_open_file_limit()
        if after > before:
            logger.info(f"open files: soft limit raised from {before} to {after} (one per connection)")
        # Inside a running service the class attribute is the resolved store entry.
        folder = Path(self.model_ref.path)
        self.tag = str(self.model_ref.tag)
        self.info = self.model_ref.info
        self.registry = read_config(folder)
        self.record, self.tasks_summary = self._describe(folder)
        # Each task in CTT_PRECISION unless this version's measurements show it worse there than in
        # fp32 (model/precision.py says how), else fp32.
        task_names = [t["name"] for t in self.registry["tasks"]]
        self.precisions = served_precisions(settings.precision, task_names, self.record)
        self.fast_path_evidence = ({} if settings.precision == REFERENCE_PRECISION else
                                   fast_path_verdicts(self.record, settings.precision, task_names))
        self.metrics = Metrics(settings.monitoring_enabled)
        self.activity = Activity()  # this worker's public API requests, for the drain on SIGTERM
        self.readiness = ServerReadiness(settings.workers)
        self.tickets = Tickets()
        self.gate = DispatcherGate(settings.max_batch_size)
        self.admission = Admission(settings.max_wait_s, settings.retry_after_s)
        self.forward = ForwardPass(self._predict, healthy=self._warm_up, on_pass=self._measured)
        # Opened lazily and migrated in the background: a database that is down never delays
        # the model, /classify or readiness; /feedback answers 503 until it is back.
        self.feedback_endpoint = FeedbackEndpoint(
            FeedbackDatabase(database_url(database_source.get(), data_dir_for(settings.data_dir)),
                             timeout_s=settings.database_timeout_s),
            FeedbackMetrics(settings.monitoring_enabled), self.tag, self.record.get("accuracy") or {})
        self.feedback_endpoint.migrate_in_background()
        self._database_threads: anyio.CapacityLimiter | None = None
        # The backbone loads and warms up in the background; readiness waits for every worker.
        self.loader = RetryingLoader(lambda: self._load(folder), settings.load_attempts,
                                     on_loaded=self._loaded).start()

    def _describe(self, folder: Path) -> tuple[dict, TasksDocument]:
        """The version's record and what /tasks says about each task. A damaged record must not
        stop the worker here: it serves what it can read, and the digest check of the load (whose
        error /health shows) refuses a version whose files changed after registration."""
        from model.store import read_record, task_summaries

        names_and_labels = [{"name": t["name"], "labels": t["labels"]} for t in self.registry["tasks"]]
        try:
            record = read_record(folder)
            summaries = task_summaries(folder, record, self.registry)
        except CTTError as exc:
            logger.error(f"{self.tag}: its record cannot be read ({exc}); /tasks gives names and labels only")
            return {}, TasksDocument(version=self.tag, tasks=names_and_labels)
        tasks = []
        for summary, minimal in zip(summaries, names_and_labels):
            try:
                tasks.append(TaskSummary.model_validate(summary))
            except ValidationError:
                logger.error(f"{self.tag}: the record's entry for task {minimal['name']!r} is damaged; "
                             "/tasks gives its name and labels only")
                tasks.append(TaskSummary.model_validate(minimal))
        return record, TasksDocument(version=self.tag, tasks=tasks)

    # ----- model life ---------------------------------------------------------------------
    def _load(self, folder: Path):
        from model.ctt import ContinualTinyTransformer
        from model.integrity import verify_version

        # Every file against the digests recorded at registration: a tampered or damaged version
        # never serves, and its CTTError (naming the file) is what /health shows.
        verify_version(folder)
        model = ContinualTinyTransformer.load(folder, settings.max_tasks)
        self.precisions = warm_up_or_fall_back(lambda precisions: self._warm_up(model, precisions),
                                               self.precisions, lambda message: logger.error(message, exc_info=True))
        for task, verdict in self.fast_path_evidence.items():
            if verdict.get("kept") and self.precisions.get(task) == REFERENCE_PRECISION:
                self.fast_path_evidence[task] = {**verdict, "kept": False,
                                                 "rule": "the fast precision failed to warm up on this machine: fp32"}
        # One full pass of realistic texts: what a pass costs, before any request is measured.
        width = min(settings.max_batch_size, 32)
        started = time.perf_counter()
        model.predict([WARM_UP_TEXT] * width, [model.task_names[i % len(model.tasks)] for i in range(width)],
                      batch_size=width, precisions=self.precisions)
        self.admission.seconds_per_item = (time.perf_counter() - started) / width
        return model

    def _warm_up(self, model=None, precisions: dict[str, str] | None = None) -> bool:
        """Every task once on a known-good text, in the precision it is served in (the first int8
        pass quantises the backbone); also the forward pass's health probe."""
        model = model or self.loader.value
        model.predict(["warm-up"] * len(model.tasks), model.task_names, precisions=precisions or self.precisions)
        return True

    def _loaded(self, model) -> None:
        self.metrics.record_model(self.tag, settings.environment, len(model.tasks), self.precisions)
        self.readiness.mark_ready()
        fallback = sorted(task for task, precision in self.precisions.items() if precision != settings.precision)
        if fallback:
            logger.warning(f"CTT_PRECISION={settings.precision}, but {self.tag}'s measurements show "
                           f"{len(fallback)} task(s) worse in it than in fp32: serving "
                           f"{', '.join(fallback[:10])}{' …' if len(fallback) > 10 else ''} in fp32 "
                           "(GET /model gives each task's evidence)")
        logger.info(f"model {self.tag} ready: {len(model.tasks)} tasks, backbone {model.backbone.info.spec}, "
                    f"precision {settings.precision}")

    @bentoml.on_startup
    def drain_on_sigterm(self) -> None:
        drain_then_shut_down(self.readiness, self.activity, settings.shutdown_drain_s)

    def __is_ready__(self) -> bool:
        return self.loader.value is not None and self.readiness.all_ready() and credentials.usable()

    def __is_alive__(self) -> bool:
        return not self.loader.gave_up

    # ----- /classify and its forward pass -------------------------------------------------
    @bentoml.api(route=CLASSIFY_PATH, input_spec=ClassifyRequest)
    async def classify(self, items: list) -> list[Prediction]:
        """Classify texts, each for its own task; items of concurrent requests share forward passes.
        A request whose own item cannot be processed gets 422 naming it; 503 with Retry-After while
        the model loads or when this worker would not answer within CTT_MAX_WAIT_S."""
        if self.loader.value is None:
            return error(503, self.loader.public_problem or "the model is still loading")
        try:
            self.admission.admit(len(items))
        except Overloaded as exc:
            self.metrics.record_shed()
            return error(503, str(exc))
        tickets = self.tickets.issue(items)
        self.metrics.record_queue(self.admission.held_items)
        try:
            outcomes = await through_the_gate(self.gate, self._through_dispatcher, tickets)
        except BentoMLException as exc:
            if int(exc.error_code) != 503:
                logger.error(f"the forward pass call failed: {type(exc).__name__} {int(exc.error_code)}")
                return error(500, "the forward pass failed; the service log has the reason")
            # BentoML's dispatcher put this request beyond max_latency_ms (the backstop): shed like
            # an admission refusal.
            self.metrics.record_shed()
            return error(503, "overloaded: the forward pass was refused; retry later")
        except Exception:
            logger.error("the forward pass call failed", exc_info=True)
            return error(500, "the forward pass failed; the service log has the reason")
        finally:
            self.tickets.release(tickets)
            self.admission.done(len(items))
            self.metrics.record_queue(self.admission.held_items)
        return self._answer(outcomes)

    async def _through_dispatcher(self, tickets: list[str]) -> list[PassOutcome]:
        """The forward pass for these tickets, merged with concurrent calls by BentoML's dispatcher
        of this worker. An instance BentoML's server did not start (a local `bentoml.depends(CTT)`)
        has no dispatcher: BentoML's `to_async` runs the method directly, one call per pass."""
        if can_call_batched(CTT, self):
            return await call_batched(CTT, "forward_pass", tickets)
        return await self.to_async.forward_pass(tickets=tickets)

    @staticmethod
    def _answer(outcomes: list[PassOutcome]) -> list[Prediction] | JSONResponse:
        failures = [outcome.failure for outcome in outcomes]
        if "service" in failures or "unknown" in failures:
            return error(500, "the forward pass failed; the service log has the reason")
        if "item" in failures:
            index = failures.index("item")
            message = f"item {index} could not be classified: the model could not process this text"
            logger.warning(f"422 {CLASSIFY_PATH}: {message}")
            return error(422, message, [Problem(loc=["items", index, "text"], message=message)])
        return [outcome.prediction for outcome in outcomes]

    @bentoml.api(route=FORWARD_PASS_PATH, batchable=True, max_batch_size=settings.max_batch_size,
                 max_latency_ms=BATCH_LATENCY_BACKSTOP_MS)
    def forward_pass(self, tickets: Annotated[list[Annotated[str, Field(max_length=64)]],
                                              Field(max_length=settings.max_items)]) -> list[PassOutcome]:
        """Internal: one forward pass over items of concurrent /classify requests, by the tickets
        /classify issued (any other ticket gets nothing); BentoML's dispatcher merges the calls."""
        return self.forward(self.tickets.redeem(tickets))

    def _predict(self, items: list) -> list[Prediction]:
        model = self.loader.value
        predictions = model.predict([item.text for item in items], [item.task for item in items],
                                    batch_size=settings.max_batch_size, precisions=self.precisions)
        return [Prediction(task=p.task, label=p.label, score=p.score,
                           probabilities=p.probabilities if item.probabilities else None)
                for item, p in zip(items, predictions)]

    def _measured(self, items: list, seconds: float) -> None:
        self.admission.measured(len(items), seconds)
        self.metrics.record_batch([item.task for item in items], seconds)

    # ----- read-only APIs (POST, for BentoML's clients; GET routes above for HTTP) ----------
    @bentoml.api(route=TASKS_PATH, input_spec=NoInput)
    async def tasks(self) -> TasksDocument:
        """Learned tasks with their labels and accuracies."""
        return self.tasks_document()

    def tasks_document(self) -> TasksDocument:
        return self.tasks_summary

    @bentoml.api(route=MODEL_PATH, input_spec=NoInput)
    async def model_card(self) -> ModelCard:
        """The served version: tag, lineage, backbone, metrics summary, precision of each task."""
        return self.model_card_document()

    def model_card_document(self) -> ModelCard:
        metadata = self.info.metadata
        return ModelCard(
            tag=self.tag, parent=metadata.get("parent"), created=self.info.creation_time.isoformat(),
            labels=dict(self.info.labels), backbone=self.registry["backbone"],
            max_length=self.registry["max_length"], task_count=len(self.registry["tasks"]),
            metrics={key: self.record.get(key) for key in ("mean_accuracy", "bwt", "mean_forgetting", "accuracy")},
            environment=settings.environment,
            # What CTT_PRECISION asked for, what each task is served in, and the measurements that
            # decided it.
            precision={"setting": settings.precision, "tasks": self.precisions, "evidence": self.fast_path_evidence})

    def health_document(self) -> Health:
        loaded = self.loader.value is not None
        return Health(status="ok" if loaded else "failed" if self.loader.gave_up else "loading", model=self.tag,
                      environment=settings.environment, ready_workers=self.readiness.ready_workers(),
                      workers=settings.workers, problem=self.loader.public_problem)

    # ----- feedback -------------------------------------------------------------------------
    async def _in_database_thread(self, call, *args):
        """Database calls run in threads of their own (never in BentoML's one thread for sync APIs,
        where the forward passes run), as many at once as the connection pool has connections."""
        if self._database_threads is None:
            self._database_threads = anyio.CapacityLimiter(self.feedback_endpoint.database.max_connections)
        return await anyio.to_thread.run_sync(call, *args, limiter=self._database_threads)

    @bentoml.api(route=FEEDBACK_PATH, input_spec=FeedbackRequest)
    async def feedback(self, items: list, ctx: bentoml.Context) -> FeedbackAccepted:
        """Store the right label of served texts: a sampled `review` or a user's `correction`. A 200
        means every row is committed; an `id` already stored is not stored again (retries are safe).
        503 with Retry-After while the database is unreachable."""
        principal = ctx.request.scope.get("auth", INTERNAL)
        rows = [item.to_item() for item in items]
        try:
            return await self._in_database_thread(self.feedback_endpoint.store, rows, principal)
        except FeedbackForbidden as exc:
            return error(403, str(exc), [Problem(loc=["items", i, "source"], message=f"needs the {exc.permission!r} "
                                                 "permission") for i in exc.items], ctx=ctx)
        except FeedbackConflict as exc:
            return error(409, str(exc), [Problem(loc=["items", i, "id"], message="already stored with different "
                                                 "content") for i in exc.items], ctx=ctx)
        except FeedbackInvalid as exc:
            return error(400, str(exc), [Problem(loc=loc, message=message) for loc, message in exc.problems], ctx=ctx)
        except FeedbackUnavailable as exc:  # the database layer logged it, as one line without users' text
            return error(503, str(exc), ctx=ctx)

    @bentoml.api(route=FEEDBACK_STATS_PATH, input_spec=feedback_stats_request_model(SINCE_PATTERN))
    async def feedback_stats(self, since: str | None = None) -> FeedbackStats:
        """Live accuracy per task: feedback rows by source, how often the served prediction agreed
        with the feedback label (reviews are the unbiased measure), the version's measured accuracy."""
        return await self.feedback_stats_document(since)

    async def feedback_stats_document(self, since: str | None) -> FeedbackStats | JSONResponse:
        try:
            document = await self._in_database_thread(self.feedback_endpoint.stats,
                                                      parse_since(since, "since") if since else None)
            return FeedbackStats.model_validate(document)
        except FeedbackUnavailable as exc:
            return error(503, str(exc))


# The outermost layer: unknown paths are a 404 before BentoML's request metrics see them.
serve_inside(CTT, KnownPathsOnly)
# BentoML would otherwise regenerate each output's JSON schema on every response to learn its media type.
fix_output_media_types(CTT)
# Starlette wraps middlewares in the order added, the first outermost (all inside BentoML's own).
CTT.add_asgi_middleware(RetryAfterMiddleware, retry_after_s=settings.retry_after_s)
CTT.add_asgi_middleware(OpenAPIDocumentMiddleware,
                        complete=lambda document: complete_openapi(document, CTT.apis, ERROR_STATUSES))
CTT.add_asgi_middleware(ErrorShapeMiddleware, methods=API_METHODS)
CTT.add_asgi_middleware(AuthMiddleware, credentials=credentials,
                        on_unavailable=OncePer(60.0, lambda reason: logger.error(f"credentials unreadable: {reason}")))
CTT.add_asgi_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
CTT.add_asgi_middleware(JSONOnlyMiddleware, paths=frozenset(API_PATHS))
CTT.add_asgi_middleware(ActivityMiddleware, paths=frozenset(PUBLIC_API_PATHS),
                        activity=lambda: getattr(this_service_if_started(), "activity", None))
