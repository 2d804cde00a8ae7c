"""Our Prometheus series, beside BentoML's own request metrics and
``bentoml_service_adaptive_batch_size`` (requests per batch, which BentoML's dispatcher records)."""

from __future__ import annotations

from model.precision import PRECISIONS


class Metrics:
    """The series of one worker (multiprocess mode: /metrics sums or takes the max over workers)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        # Imported here: BentoML sets PROMETHEUS_MULTIPROC_DIR in the worker before __init__.
        import prometheus_client as prometheus

        self.predictions = prometheus.Counter(
            "ctt_predictions", "Predictions served, by task.", ["task"])
        self.batch_items = prometheus.Histogram(
            "ctt_forward_batch_items", "Items in one forward pass of the shared backbone.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.forward_seconds = prometheus.Histogram(
            "ctt_forward_seconds", "Seconds per batched forward pass (tokenisation included).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
        self.model_info = prometheus.Gauge(
            "ctt_model_info", "The served model version (value is its task count).",
            ["tag", "environment"], multiprocess_mode="livemax")
        self.served_tasks = prometheus.Gauge(
            "ctt_served_tasks", "Tasks served in each precision (CTT_PRECISION, with fp32 where a task's "
            "version did not measure it within tolerance).", ["precision"], multiprocess_mode="livemax")
        self.shed = prometheus.Counter(
            "ctt_shed_requests", "Requests refused with 503 because the wait they would see was above CTT_MAX_WAIT_S.")
        self.queued_items = prometheus.Gauge(
            "ctt_queued_items", "Items admitted and not yet answered, summed over workers.", multiprocess_mode="livesum")

    def record_shed(self) -> None:
        if self.enabled:
            self.shed.inc()

    def record_queue(self, items: int) -> None:
        if self.enabled:
            self.queued_items.set(items)

    def record_model(self, tag: str, environment: str, task_count: int, precisions: dict[str, str]) -> None:
        if self.enabled:
            self.model_info.labels(tag=tag, environment=environment).set(task_count)
            for precision in PRECISIONS:
                self.served_tasks.labels(precision=precision).set(list(precisions.values()).count(precision))

    def record_batch(self, tasks: list[str], seconds: float) -> None:
        if not self.enabled:
            return
        self.batch_items.observe(len(tasks))
        self.forward_seconds.observe(seconds)
        for task in set(tasks):
            self.predictions.labels(task=task).inc(tasks.count(task))


