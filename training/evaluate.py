"""Measuring tasks, and the continual-learning metrics in Avalanche's vocabulary.

accuracy matrix  R[i][j]: accuracy on task j measured right after learning experience i
forgetting       for an old task: its accuracy when it was (last) learned minus its accuracy now
BWT              backward transfer, the mean over old tasks of (accuracy now - accuracy when
                 learned), i.e. minus the mean forgetting (Lopez-Paz & Ranzato, 2017)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from model.ctt import ContinualTinyTransformer, Prediction
from model.precision import REFERENCE_PRECISION
from model.settings import default
from training.data import Example


@torch.inference_mode()
def task_logits(model: ContinualTinyTransformer, task: str, examples: list[Example], batch_size: int = 64,
                progress: bool = False, precision: str = REFERENCE_PRECISION,
                calibrated: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's logits over its own labels for ``examples``, and the targets (-1 for a label the
    task does not have: never right)."""
    labels = model.task(task).labels
    label_index = {label: i for i, label in enumerate(labels)}
    chunks = []
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc=f"evaluate {task} ({precision})", disable=not progress, leave=False, unit="batch"):
        batch = examples[start : start + batch_size]
        chunks.append(model.logits([e.text for e in batch], [task] * len(batch), precision=precision,
                                   calibrated=calibrated)[:, : len(labels)])
    logits = torch.cat(chunks) if chunks else torch.empty(0, len(labels))
    return logits, torch.tensor([label_index.get(e.label, -1) for e in examples], dtype=torch.long)


def accuracy_of(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return int((logits.argmax(-1) == targets).sum()) / len(targets) if len(targets) else 0.0


def accuracy(model: ContinualTinyTransformer, task: str, examples: list[Example],
             batch_size: int = 64, progress: bool = False, precision: str = REFERENCE_PRECISION) -> float:
    return accuracy_of(*task_logits(model, task, examples, batch_size, progress, precision))


@torch.inference_mode()
def predictions_as_served(model: ContinualTinyTransformer, eval_sets: dict[str, list[Example]], precision: str,
                          batch_size: int = default("CTT_MAX_BATCH_SIZE")) -> dict[str, list[Prediction]]:
    """Each task's predictions with its rows served the way the service serves them: every task's
    evaluation rows interleaved into shared passes of ``batch_size`` (by default the service's)
    through ``predict``. In int8 a row moves with the rest of its pass, so this
    measures what mixed traffic gets rather than passes of one task alone."""
    rows: list[tuple[str, Example]] = []
    for index in range(max((len(examples) for examples in eval_sets.values()), default=0)):
        # Round-robin over the tasks, so that every pass mixes them as traffic would.
        rows += [(name, examples[index]) for name, examples in eval_sets.items() if index < len(examples)]
    precisions = dict.fromkeys(eval_sets, precision)
    served: dict[str, list[Prediction]] = {name: [] for name in eval_sets}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        predictions = model.predict([e.text for _, e in chunk], [name for name, _ in chunk], batch_size=batch_size,
                                    precisions=precisions)
        for (name, _), prediction in zip(chunk, predictions):
            served[name].append(prediction)
    return served


def accuracies_as_served(model: ContinualTinyTransformer, eval_sets: dict[str, list[Example]], precision: str,
                         batch_size: int = default("CTT_MAX_BATCH_SIZE")) -> dict[str, float]:
    """Each task's accuracy as served (``predictions_as_served``)."""
    served = predictions_as_served(model, eval_sets, precision, batch_size)
    return {name: sum(p.label == e.label for p, e in zip(served[name], examples)) / len(examples) if examples else 0.0
            for name, examples in eval_sets.items()}


@dataclass
class ContinualMetrics:
    accuracy: dict[str, float]
    learned_accuracy: dict[str, float]
    forgetting: dict[str, float]
    mean_accuracy: float
    mean_forgetting: float | None
    bwt: float | None


def continual_metrics(accuracy_now: dict[str, float], learned_accuracy: dict[str, float],
                      new_task: str) -> ContinualMetrics:
    old_tasks = [name for name in accuracy_now if name != new_task]
    forgetting = {name: learned_accuracy[name] - accuracy_now[name] for name in old_tasks}
    mean_forgetting = sum(forgetting.values()) / len(old_tasks) if old_tasks else None
    # Summed as (now - learned) rather than negated forgetting, so no change reads 0.0, not -0.0.
    bwt = sum(accuracy_now[n] - learned_accuracy[n] for n in old_tasks) / len(old_tasks) if old_tasks else None
    return ContinualMetrics(
        accuracy=accuracy_now,
        learned_accuracy=learned_accuracy,
        forgetting=forgetting,
        mean_accuracy=sum(accuracy_now.values()) / len(accuracy_now),
        mean_forgetting=mean_forgetting,
        bwt=bwt,
    )
