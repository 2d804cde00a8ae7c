"""Services that call CTT the way a user's own BentoML service would (served by tests/test_clients.py)."""

from __future__ import annotations

import os

import bentoml

from service import CTT


def first_label(predictions) -> str:
    first = predictions[0]
    return first["label"] if isinstance(first, dict) else first.label


@bentoml.service(name="caller")
class Caller:
    """CTT as a dependency in the same bento: BentoML runs it beside this service."""

    ctt = bentoml.depends(CTT)

    @bentoml.api
    async def label(self, text: str, task: str) -> str:
        return first_label(await self.ctt.to_async.classify(items=[{"text": text, "task": task}]))


@bentoml.service(name="remote-caller")
class RemoteCaller:
    """CTT served elsewhere, by URL; BentoML's client sends BENTO_CLOUD_API_KEY as its Bearer token."""

    ctt = bentoml.depends(url=os.environ.get("CTT_URL", "http://127.0.0.1:9"))

    @bentoml.api
    async def label(self, text: str, task: str) -> str:
        return first_label(await self.ctt.to_async.classify(items=[{"text": text, "task": task}]))
