"""The gate on a relearned task: ``ctt learn`` refuses to register when the relearned module is
clearly worse than the parent's module for that task on the same evaluation examples.

Old tasks have a floor (``--max-forgetting``: their modules are not touched, so any drop is a
defect). A relearned task gets a new module, which honestly moves by an example or two, so it
gets a paired test instead: on the evaluation examples the two modules classify differently, a
sign test (as the recipe's, training/recipe.py) refuses when the parent's module is right on more
of them by over ``relearn_z`` standard deviations. The examples are the parent's stored
evaluation set of the task and, when given, the new ``--eval`` file, pooled without repeats.

On the tests' micro model (tests/test_relearn_gate.py), a relearn from a file with every label
swapped scored 0.05 against the parent's 1.00 on 20 examples (19 right only with the parent's
module: z = 4.4) and one trained on feedback of 60 near-copies of the evaluation texts with the
other label 0.45 (11 against 0: z = 3.3): both refused; a relearn with more honest data: 0
against 0, registered. One example either way is z = 1.
"""

from __future__ import annotations

import math

import torch

from model.ctt import ContinualTinyTransformer
from training.data import Example
from training.recipe import significantly_worse


def predicted_labels(model: ContinualTinyTransformer, task: str, examples: list[Example]) -> list[str]:
    return [prediction.label for prediction in model.predict([e.text for e in examples], [task] * len(examples))]


def relearned_task_gate(parent: ContinualTinyTransformer, model: ContinualTinyTransformer, task: str,
                        sets: dict[str, list[Example]], relearn_z: float) -> dict:
    """Compare ``task``'s module in ``model`` with the one in ``parent`` on ``sets`` (name →
    examples); the result says whether the new module is clearly worse, and by how much."""
    pooled = list(dict.fromkeys(example for examples in sets.values() for example in examples))
    parent_right = torch.tensor([label == e.label for label, e in zip(predicted_labels(parent, task, pooled), pooled)],
                                dtype=torch.bool)
    new_right = torch.tensor([label == e.label for label, e in zip(predicted_labels(model, task, pooled), pooled)],
                             dtype=torch.bool)
    index = {example: i for i, example in enumerate(pooled)}

    def accuracy(right: torch.Tensor, examples: list[Example]) -> float:
        return round(sum(bool(right[index[e]]) for e in examples) / len(examples), 4) if examples else 0.0

    parent_only = int((parent_right & ~new_right).sum())
    new_only = int((new_right & ~parent_right).sum())
    differing = parent_only + new_only
    return {
        "task": task, "examples": len(pooled),
        "sets": {name: {"examples": len(examples), "parent_accuracy": accuracy(parent_right, examples),
                        "accuracy": accuracy(new_right, examples)} for name, examples in sets.items()},
        "parent_accuracy": accuracy(parent_right, pooled), "accuracy": accuracy(new_right, pooled),
        "right_only_with_parent": parent_only, "right_only_with_new": new_only,
        "z": round((parent_only - new_only) / math.sqrt(differing), 3) if differing else 0.0,
        "max_z": relearn_z,
        "clearly_worse": bool(pooled) and significantly_worse(new_right, parent_right, relearn_z),
    }


def describe_gate(gate: dict) -> str:
    return (f"{gate['accuracy']:.4f} against the parent's {gate['parent_accuracy']:.4f} on {gate['examples']} "
            f"evaluation examples ({gate['right_only_with_parent']} right only with the parent's module, "
            f"{gate['right_only_with_new']} only with the new one; sign test z = {gate['z']:g}, "
            f"refused above {gate['max_z']:g})")


__all__ = ["describe_gate", "relearned_task_gate"]
