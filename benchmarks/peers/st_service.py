"""BentoML's sentence-transformers example, as a user would run it instead of CTT.

Shaped like BentoML's BentoSentenceTransformers example: one ``@bentoml.service`` class whose
batchable ``encode`` API takes a list of sentences and returns their embeddings, with BentoML's
default adaptive batching. Two changes, both forced by this benchmark, not tuning:
  - the model loads from a local folder (``PEER_MODEL_PATH``) instead of the Hub: nothing may
    download at run time;
  - no ``resources={"gpu": 1}``: it runs on CPU here.

``benchmarks/peers.py`` runs it "as written" (one worker, torch's default threads, BentoML's
per-request access log) and "tuned" (``PEER_WORKERS=2``, ``PEER_TORCH_THREADS=1``: one
single-threaded worker per core, the layout that serves best on 2 cores; ``PEER_ACCESS_LOG=false``:
no access log, as CTT runs at LOG_LEVEL=WARNING). It runs in its own virtual environment (``.venv-peers/st``), never in
CTT's, so its package versions are the ones a user of the example would get.
"""

from __future__ import annotations

import os

import bentoml
import numpy as np

MODEL_PATH = os.environ["PEER_MODEL_PATH"]
SAMPLE_SENTENCES = ["The sun dips below the horizon, painting the sky orange."]


@bentoml.service(
    traffic={"timeout": 60},
    workers=int(os.environ.get("PEER_WORKERS", "1")),
    logging={"access": {"enabled": os.environ.get("PEER_ACCESS_LOG", "true") == "true"}},
)
class SentenceTransformers:
    def __init__(self) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        threads = os.environ.get("PEER_TORCH_THREADS")
        if threads:  # unset "as written": torch picks its own thread count
            torch.set_num_threads(int(threads))
        self.model = SentenceTransformer(MODEL_PATH, device="cpu")

    @bentoml.api(batchable=True)
    def encode(self, sentences: list[str] = SAMPLE_SENTENCES) -> np.ndarray:
        return self.model.encode(sentences)
