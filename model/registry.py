"""A saved model's task registry (``ctt.json``), readable without torch: the service reads it at
import, in BentoML's supervisor process, which never runs the model and should start fast."""

from __future__ import annotations

import json
from pathlib import Path

from model.errors import CTTError

CONFIG_FILE = "ctt.json"
FORMAT_VERSION = 1
# The backbones a version may name by name (model/backbone.py loads them); anything else it names
# must be an absolute folder, and an imported version one the operator allowed.
KNOWN_BACKBONES = ("minilm", "micro")


def read_config(folder: Path) -> dict:
    """A saved model's task registry and backbone reference, without loading any weights."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CTTError(f"{folder} is not a readable CTT model: {exc}") from exc
    if config.get("format_version") != FORMAT_VERSION:
        raise CTTError(f"unsupported CTT model format {config.get('format_version')!r}")
    return config
