"""The CTT BentoML service: every task of one model version behind one batched endpoint.

`bentoml serve` serves the newest `ctt` version in the local store (or CTT_MODEL_TAG);
`bentoml build` pins the exact version into the bento. Requests from many clients, for many
tasks, are merged by BentoML's adaptive batching into one forward pass of the shared backbone.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import bentoml
import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from model.ctt import ContinualTinyTransformer, read_config
from model.errors import CTTError
from model.serving import (CLASSIFY_PATH, HEALTH_PATH, MODEL_PATH, TASKS_PATH, AuthMiddleware, BodyLimitMiddleware,
                           Credentials, Metrics, Prediction, configure_json_logging, items_field, set_known_tasks)
from model.settings import SecretSource, Settings, check_startup_credentials
from model.store import read_metrics

try:
    settings = Settings.from_environ()
    credentials = Credentials(settings, SecretSource("API_KEY", reload_s=settings.credentials_reload_s),
                              SecretSource("JWT_SECRET", reload_s=settings.credentials_reload_s))
    check_startup_credentials(settings, credentials.keys, credentials.jwt_secret)
except CTTError as problem:
    # One readable line and a non-zero exit, before BentoML starts anything (it fails closed).
    print(f"ctt: refusing to start: {problem}", file=sys.stderr)
    raise SystemExit(2) from None

logger = logging.getLogger("ctt")
routes = FastAPI(title="CTT read-only routes")
Items = items_field(settings.max_items, settings.max_text_chars)


@bentoml.service(
    name="ctt",
    workers=settings.workers,
    traffic={"timeout": 30},
    metrics={"enabled": settings.monitoring_enabled},
    labels={"project": "ctt"},
)
@bentoml.asgi_app(routes, path="/")
class CTT:
    model_ref = bentoml.models.BentoModel(settings.model_tag or f"{settings.model_name}:latest")

    @bentoml.on_deployment
    def warn_when_open() -> None:
        """Runs once, before the workers start."""
        if credentials.open():
            logging.getLogger("bentoml").warning(
                f"ENVIRONMENT={settings.environment} and neither API_KEY nor JWT_SECRET is set: the API is "
                "open to anyone who can reach it (development and test only)")

    def __init__(self) -> None:
        configure_json_logging(settings)
        torch.set_num_threads(settings.torch_threads)
        # Inside a running service the class attribute is the resolved store entry.
        folder = Path(self.model_ref.path)
        self.tag = str(self.model_ref.tag)
        self.info = self.model_ref.info
        # The task registry is a small JSON file: read it now so requests can be validated at
        # once, while the backbone loads and warms up in the background (readiness waits).
        self.registry = read_config(folder)
        self.metrics_summary = read_metrics(folder)
        self.labels = {t["name"]: t["labels"] for t in self.registry["tasks"]}
        set_known_tasks(self.labels, settings.max_text_chars)
        self.metrics = Metrics(settings.monitoring_enabled)
        self.model: ContinualTinyTransformer | None = None
        self.load_error: str | None = None
        self._loader = threading.Thread(target=self._load, args=(folder,), name="ctt-model-loader", daemon=True)
        self._loader.start()

    def _load(self, folder: Path) -> None:
        try:
            started = time.perf_counter()
            model = ContinualTinyTransformer.load(folder, settings.max_tasks)
            model.logits(["warm-up"] * len(model.tasks), model.task_names)  # every task once
            self.model = model
            self.metrics.record_model(self.tag, settings.environment, len(model.tasks))
            logger.info(f"model {self.tag} ready: {len(model.tasks)} tasks, backbone "
                        f"{model.backbone.info.spec}, loaded and warmed up in {time.perf_counter() - started:.1f} s")
        except Exception:  # surfaced through readiness and /health, not a crash loop
            # The exception (paths, internals) goes to the log only; /health says what happened.
            self.load_error = "the model failed to load; the service log has the reason"
            logger.exception(f"model {self.tag} failed to load")

    def __is_ready__(self) -> bool:
        return self.model is not None

    @bentoml.api(route=CLASSIFY_PATH, batchable=True, max_batch_size=settings.max_batch_size,
                 max_latency_ms=settings.max_latency_ms)
    def classify(self, items: Items) -> list[Prediction]:
        """Classify texts, each for its own task. Every item's task must be a learned task."""
        if self.model is None:
            raise bentoml.exceptions.ServiceUnavailable(self.load_error or "model is still loading")
        tasks = [item.task for item in items]
        started = time.perf_counter()
        predictions = self.model.predict([item.text for item in items], tasks, batch_size=len(items))
        self.metrics.record_batch(tasks, time.perf_counter() - started)
        return [Prediction(task=p.task, label=p.label, score=p.score,
                           probabilities=p.probabilities if item.probabilities else None)
                for item, p in zip(items, predictions)]

    @routes.get(TASKS_PATH)
    def tasks(self) -> dict:
        """Learned tasks with their labels and accuracies."""
        accuracy = self.metrics_summary.get("accuracy", {})
        return {"version": self.tag, "tasks": [
            {"name": t["name"], "labels": t["labels"], "accuracy": accuracy.get(t["name"]),
             "learned_accuracy": t["info"].get("learned_accuracy"),
             "probe_accuracy": t["info"].get("probe_accuracy")}
            for t in self.registry["tasks"]]}

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
        }

    @routes.get(HEALTH_PATH)
    def health(self):
        """Ready (200) once the model is loaded and warmed up; 503 with the reason until then."""
        body = {"status": "ok" if self.model else "loading" if not self.load_error else "failed",
                "model": self.tag, "environment": settings.environment}
        if self.load_error:
            body["error"] = self.load_error
        return JSONResponse(body, status_code=200 if self.model else 503)


# Starlette wraps middlewares in the order added, the first outermost: auth (headers only) runs
# before the body limit reads a body.
CTT.add_asgi_middleware(AuthMiddleware, credentials=credentials)
CTT.add_asgi_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)

