"""A saved model's task registry (``ctt.json``) and the configuration that belongs to its version,
readable without torch: the service reads it at import, in BentoML's supervisor process, which
never runs the model and should start fast."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from model.errors import CTTError
from model.precision import FAST_PATH, FAST_PATHS, LEGACY_FAST_PATH

CONFIG_FILE = "ctt.json"
# The backbones a version may name by name (model/backbone.py loads them); anything else it names
# must be an absolute folder, and an imported version one the operator allowed.
KNOWN_BACKBONES = ("minilm", "micro")
# 2: the task bank holds a calibration temperature per task and ctt.json the model's configuration.
# A version of format 1 (no calibration) loads with every temperature at one: the same logits.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
# How calibrated scores are made: each task's logits divided by its own temperature (fitted when
# the task is learned; 1 for a task that was never calibrated). Dividing by a positive number never
# changes which label is largest.
CALIBRATION_FORMAT = "temperature"
# The temperatures a version may hold. Calibration only ever softens a module's scores: a held-out
# slice the module gets entirely right pulls the likelihood's optimum towards T = 0 (certainty),
# which a few dozen examples cannot justify. Beyond MAX_TEMPERATURE scores carry nothing. A bank
# outside these bounds was not written by `ctt learn` and is refused when it is loaded.
MIN_TEMPERATURE = 1.0
MAX_TEMPERATURE = 100.0
# Tokens a version may read per text at most: BERT-family position tables end at 512, and the
# backbone's own limit is checked when a model is built on it.
MAX_LENGTH_LIMIT = 512
# Classes a row's task lacks (every head is padded to the widest label set in the version) get
# this logit, so their probability is exactly zero.
PADDED_LOGIT = "-inf"


@dataclass(frozen=True)
class ModelConfig:
    """What belongs to a version and is saved with it, beside the tasks: one object, no defaults
    that could disagree with the settings (a new lineage's ``max_length`` comes from
    ``LearnSettings``; a child version takes its parent's). MAX_TASKS is not here: it is a runtime
    setting, passed to the model when it is built."""

    max_length: int  # tokens read per text, fixed for a whole lineage
    # How the int8 copy of the encoder is made (model/precision.py): the version's int8
    # measurements hold for this path only.
    fast_path: str = FAST_PATH
    calibration: str = CALIBRATION_FORMAT
    padded_logit: str = PADDED_LOGIT

    def __post_init__(self) -> None:
        if (not isinstance(self.max_length, int) or isinstance(self.max_length, bool)
                or not 1 <= self.max_length <= MAX_LENGTH_LIMIT):
            raise CTTError(f"max_length must be a whole number of tokens from 1 to {MAX_LENGTH_LIMIT}, "
                           f"not {self.max_length!r}")
        if self.fast_path not in FAST_PATHS:
            raise CTTError(f"unsupported fast path {self.fast_path!r} (this code serves {', '.join(FAST_PATHS)})")
        if self.calibration != CALIBRATION_FORMAT:
            raise CTTError(f"unsupported calibration format {self.calibration!r} (this code reads "
                           f"{CALIBRATION_FORMAT!r})")
        if self.padded_logit != PADDED_LOGIT:
            raise CTTError(f"unsupported padded logit {self.padded_logit!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def for_child(self) -> "ModelConfig":
        """A new version's configuration on top of this one: the lineage's ``max_length``, this
        code's formats (every task is measured again in the new version, int8 included)."""
        return replace(self, fast_path=FAST_PATH, calibration=CALIBRATION_FORMAT)

    @classmethod
    def from_registry(cls, registry: dict) -> "ModelConfig":
        """The configuration a ``ctt.json`` holds. Format 1 held only ``max_length`` and was
        measured on the plain dynamic int8 path, whatever else the file says; format 2 must name
        every field (a field left out would silently take this code's default)."""
        fields = ("max_length", "fast_path", "calibration", "padded_logit")
        if registry.get("format_version") == 1:
            values = {"max_length": registry.get("max_length"), "fast_path": LEGACY_FAST_PATH}
        else:
            missing = [name for name in fields if name not in registry]
            if missing:
                raise CTTError(f"{CONFIG_FILE} of format {registry.get('format_version')} lacks "
                               f"{', '.join(missing)}: the version is damaged")
            values = {name: registry[name] for name in fields}
        return cls(**values)


def read_config(folder: Path) -> dict:
    """A saved model's task registry, configuration and backbone reference, without loading any
    weights."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CTTError(f"{folder} is not a readable CTT model: {exc}") from exc
    if not isinstance(config, dict) or config.get("format_version") not in READABLE_FORMATS:
        found = config.get("format_version") if isinstance(config, dict) else None
        raise CTTError(f"unsupported CTT model format {found!r}")
    return config
