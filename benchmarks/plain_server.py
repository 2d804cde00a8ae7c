"""What a user would write instead of the BentoML service: FastAPI + uvicorn, one forward pass per
request, same model version. Used only by benchmarks/serve.py as the comparison line.

    python benchmarks/plain_server.py --port 8000   (reads CTT_MODEL_NAME / BENTOML_HOME)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from model.store import get_version  # noqa: E402


class Item(BaseModel):
    text: str
    task: str


class Request(BaseModel):
    items: list[Item]


def build_app() -> FastAPI:
    torch.set_num_threads(int(os.environ.get("CTT_TORCH_THREADS", "1")))
    model = get_version().load()
    app = FastAPI()

    @app.post("/classify")
    def classify(request: Request) -> list[dict]:
        predictions = model.predict([i.text for i in request.items], [i.task for i in request.items])
        return [{"task": p.task, "label": p.label, "score": p.score} for p in predictions]

    @app.get("/readyz")
    def ready() -> dict:
        return {"ready": True}

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(build_app(), host="127.0.0.1", port=args.port, log_level="warning")
