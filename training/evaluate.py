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

from model.ctt import ContinualTinyTransformer
from model.precision import REFERENCE_PRECISION
from model.settings import default
from training.data import Example


@torch.inference_mode()
def accuracy(model: ContinualTinyTransformer, task: str, examples: list[Example],
             batch_size: int = 64, progress: bool = False, precision: str = REFERENCE_PRECISION) -> float:
    labels = model.task(task).labels
    label_index = {label: i for i, label in enumerate(labels)}
    correct = 0
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc=f"evaluate {task} ({precision})", disable=not progress, leave=False, unit="batch"):
        batch = examples[start : start + batch_size]
        logits = model.logits([e.text for e in batch], [task] * len(batch), precision=precision)
        predicted = logits.argmax(-1).tolist()
        correct += sum(label_index.get(e.label, -1) == p for e, p in zip(batch, predicted))
    return correct / len(examples) if examples else 0.0


@torch.inference_mode()
def accuracies_as_served(model: ContinualTinyTransformer, eval_sets: dict[str, list[Example]], precision: str,
                         batch_size: int = default("CTT_MAX_BATCH_SIZE")) -> dict[str, float]:
    """Each task's accuracy with its rows served the way the service serves them: every task's
    evaluation rows interleaved into shared passes of ``batch_size`` (by default the service's)
    through ``predict``. In int8 a row moves with the rest of its pass, so this
    measures what mixed traffic gets rather than passes of one task alone."""
    rows: list[tuple[str, Example]] = []
    for index in range(max((len(examples) for examples in eval_sets.values()), default=0)):
        # Round-robin over the tasks, so that every pass mixes them as traffic would.
        rows += [(name, examples[index]) for name, examples in eval_sets.items() if index < len(examples)]
    precisions = dict.fromkeys(eval_sets, precision)
    correct = dict.fromkeys(eval_sets, 0)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        predictions = model.predict([e.text for _, e in chunk], [name for name, _ in chunk], batch_size=batch_size,
                                    precisions=precisions)
        for (name, example), prediction in zip(chunk, predictions):
            correct[name] += prediction.label == example.label
    return {name: correct[name] / len(examples) if examples else 0.0 for name, examples in eval_sets.items()}


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
