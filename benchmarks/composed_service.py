"""The other shape issue 18 asked to measure (not served by the project): /classify in a front
service that reaches a model service through `bentoml.depends`, BentoML's usual composition.

`benchmarks/peers.py --composed` serves it beside service.py (where /classify hands tickets to the
dispatcher of a batchable method of the same worker, in-process) so the two can be compared in one
run. The model service has its own processes; the items travel to it pickled over a Unix socket,
and its batchable API answers one outcome per item with the same per-item isolation
(model/serving/batching.py). It has no auth, admission or feedback: only the path a request takes.
"""

from __future__ import annotations

from pathlib import Path

import bentoml
from starlette.responses import JSONResponse

from model.bentoml_internals import fix_output_media_types
from model.registry import read_config
from model.serving.batching import ForwardPass
from model.serving.schemas import ErrorBody, PassOutcome, Prediction, classify_request_model, item_model
from model.settings import Settings

settings = Settings.from_environ()
MODEL_TAG = settings.model_tag or f"{settings.model_name}:latest"
TASKS = [task["name"] for task in read_config(Path(bentoml.models.get(MODEL_TAG).path))["tasks"]]
Item = item_model(TASKS, settings.max_text_chars)
ClassifyRequest = classify_request_model(TASKS, settings.max_items, settings.max_text_chars)


# As service.py: BentoML's client replaces its session every 100 calls, closing it under calls still
# in flight, unless told otherwise.
@bentoml.service(name="ctt-model", workers=settings.workers,
                 runner_connection={"max_requests": 2**62, "max_age": 10.0**12})
class CTTModel:
    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        import torch

        from model.ctt import ContinualTinyTransformer
        from model.precision import served_precisions
        from model.store import read_record

        torch.set_num_threads(settings.torch_threads)
        folder = Path(self.model_ref.path)
        self.model = ContinualTinyTransformer.load(folder, settings.max_tasks)
        self.precisions = served_precisions(settings.precision, self.model.task_names, read_record(folder))
        self.model.predict(["warm-up"] * len(TASKS), TASKS, precisions=self.precisions)
        self.forward = ForwardPass(self._predict, healthy=lambda: True)

    def _predict(self, items: list) -> list[Prediction]:
        predictions = self.model.predict([item.text for item in items], [item.task for item in items],
                                         batch_size=settings.max_batch_size, precisions=self.precisions)
        return [Prediction(task=p.task, label=p.label, score=p.score,
                           probabilities=p.probabilities if item.probabilities else None)
                for item, p in zip(items, predictions)]

    @bentoml.api(batchable=True, max_batch_size=settings.max_batch_size, max_latency_ms=int(2000 * settings.max_wait_s))
    def forward_pass(self, items: list[Item]) -> list[PassOutcome]:  # type: ignore[valid-type]
        return self.forward(items)


@bentoml.service(name="ctt-composed", workers=1)
class CTTComposed:
    model = bentoml.depends(CTTModel)

    @bentoml.api(route="/classify", input_spec=ClassifyRequest)
    async def classify(self, items: list) -> list[Prediction]:
        outcomes = await self.model.to_async.forward_pass(items=[item.model_dump() for item in items])
        if any(outcome.failure for outcome in outcomes):
            return JSONResponse(ErrorBody(error="an item could not be classified").model_dump(), status_code=422)
        return [outcome.prediction for outcome in outcomes]


# As service.py: BentoML would otherwise regenerate each output's JSON schema on every response.
fix_output_media_types(CTTModel)
fix_output_media_types(CTTComposed)
