"""The settings of `ctt learn`, defined once: the dataclass the code uses and the source of every
command-line default (training/cli.py reads them from here). Torch-free, so `ctt --help` stays fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from model.errors import CTTError
from model.settings import setting_value

# Tokens read per text, for a model started from the bare backbone (fixed for its whole lineage).
DEFAULT_MAX_LENGTH = 128

SELECT_ON = ("last", "accuracy", "calibrated-loss", "loss")


@dataclass
class LearnSettings:
    # The recipe (training/recipe.py); every `ctt learn` flag takes its default from here.
    epochs: int = 6
    learning_rate: float = 1e-2  # the scaling vectors' peak learning rate
    head_learning_rate: float = 1e-3  # the head's: it starts at the probe's optimum
    warmup: float = 0.1  # share of the planned steps with a linear warm-up, then cosine decay
    vector_pull: float = 0.0  # weight of the L2 pull of the scaling vectors towards one
    batch_size: int = 16
    seed: int = 0
    patience: int = 2  # with a held-out selection: epochs without a better score before stopping
    # "last": the whole schedule, the last epoch kept unless the held-out slice shows it significantly
    # worse than the probe (epoch 0). "accuracy" / "calibrated-loss" / "loss": the best epoch on the
    # held-out slice, with early stopping (training/recipe.py says why "last" is the default).
    select_on: str = "last"
    holdout: float = 0.15  # share of the training file held out for early stopping
    max_eval_examples: int = 1000  # evaluation set kept with the version, stratified
    max_forgetting: float = 0.0
    min_accuracy: float = 0.0
    # The gate on a relearned task (training/gate.py): refused when the parent's module is right on
    # more of the evaluation examples the two classify differently by over this many standard
    # deviations (a sign test, as the recipe's). Honest relearns move by an example or two.
    relearn_z: float = 2.0
    allow_relabel: bool = False  # register a relearned task even when clearly worse (a deliberate relabelling)
    # ctt learn --feedback: the largest share of feedback examples that may give a text another label
    # than the training file or an evaluation set (training/feedback.py vet_feedback), and its override.
    max_feedback_contradictions: float = 0.2
    allow_contradictions: bool = False
    backbone: str | None = None  # only for a model started from the bare backbone
    # Tokens read per text. None: the lineage's (DEFAULT_MAX_LENGTH for a model started from the bare
    # backbone); a value that differs from the parent's is refused (training/learn.py).
    max_length: int | None = None
    stage: str = "development"
    owner: str = field(default_factory=lambda: os.environ.get("USER") or "unknown")
    progress: bool = True
    wait: bool = True  # wait for another writer of the store (False: fail at once)
    # Limits from the settings table (MAX_TASKS, CTT_MAX_LABELS), read when the settings are made.
    max_tasks: int = field(default_factory=lambda: setting_value("MAX_TASKS"))
    max_labels: int = field(default_factory=lambda: setting_value("CTT_MAX_LABELS"))

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise CTTError("--epochs, --batch-size and --patience must be at least 1")
        if not 0.0 < self.holdout < 1.0:
            raise CTTError("--holdout must be between 0 and 1")
        if self.select_on not in SELECT_ON:
            raise CTTError(f"--select-on must be one of {', '.join(SELECT_ON)}")
        if self.learning_rate <= 0 or self.head_learning_rate <= 0:
            raise CTTError("--lr and --head-lr must be positive")
        if not 0.0 <= self.warmup < 1.0 or self.vector_pull < 0:
            raise CTTError("--warmup must be in [0, 1) and --vector-pull at least 0")
        if not 0.0 <= self.max_forgetting <= 1.0 or not 0.0 <= self.min_accuracy <= 1.0:
            raise CTTError("--max-forgetting and --min-accuracy are fractions between 0 and 1")
        if not 0.0 <= self.max_feedback_contradictions <= 1.0:
            raise CTTError("--max-feedback-contradictions is a fraction between 0 and 1")
        if self.relearn_z <= 0:
            raise CTTError("the relearned task's sign-test threshold (relearn_z) must be positive")
        if self.max_length is not None and self.max_length < 8:
            raise CTTError("--max-length must be at least 8 tokens")



def learn_default(name: str):
    """The default of one LearnSettings field (for the command line)."""
    for f in fields(LearnSettings):
        if f.name == name:
            return f.default
    raise KeyError(name)
