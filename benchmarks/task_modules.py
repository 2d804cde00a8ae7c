"""The continual benchmark's task modules, trained once as `ctt learn` trains them and kept on disk,
for the benchmarks that compare what is done with a trained module (calibration, fast paths).

Each (task, seed) module is trained by training/recipe.py with `LearnSettings` defaults on the
training pool of benchmarks/continual.py (the same examples, the same fit/held-out split), so it is
the module `ctt learn` would register for that task. Modules are cached in a folder
(``CTT_MODULE_CACHE``, default: ctt-task-modules under the temporary directory) under a digest of
the examples, the settings, the backbone and the torch version.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from model.backbone import load_backbone
from model.ctt import ContinualTinyTransformer, Task, TaskModule
from model.registry import ModelConfig
from training.corpora import SUITE, TASKS, ensure_corpus_packages, make_tasks
from training.data import Example, label_set, stratified_split
from training.recipe import train_task_module
from training.settings import DEFAULT_MAX_LENGTH, LearnSettings


@dataclass
class TrainedTask:
    name: str
    seed: int
    labels: list[str]
    module: TaskModule
    held_out: list[Example]
    test: list[Example]

    def targets(self, examples: list[Example]) -> torch.Tensor:
        index = {label: i for i, label in enumerate(self.labels)}
        return torch.tensor([index[e.label] for e in examples])


# What training a module depends on (the rest of LearnSettings is about registering it).
RECIPE_FIELDS = ("epochs", "learning_rate", "head_learning_rate", "warmup", "vector_pull", "batch_size", "seed",
                 "patience", "select_on", "holdout", "max_length")


def cache_folder() -> Path:
    return Path(os.environ.get("CTT_MODULE_CACHE") or Path(tempfile.gettempdir()) / "ctt-task-modules")


def _key(name: str, seed: int, train: list[Example], settings: LearnSettings, backbone) -> str:
    digest = hashlib.sha256()
    recipe = {key: value for key, value in asdict(settings).items() if key in RECIPE_FIELDS}
    digest.update(json.dumps({"task": name, "seed": seed, "settings": recipe, "torch": torch.__version__,
                              "backbone": backbone.info.digest, "train": [e.to_dict() for e in train]},
                             default=str).encode())
    return digest.hexdigest()[:16]


def suite(quick: bool, seeds: int) -> tuple[tuple[str, ...], list[int], int, int]:
    """What the module benchmarks run, as benchmarks/continual.py does: its quick suite (one seed)
    or its eight tasks over ``seeds`` seeds; then the training and test examples per task."""
    from benchmarks.continual import QUICK_TASKS, QUICK_TEST_LIMIT, QUICK_TRAIN_LIMIT, TEST_LIMIT, TRAIN_LIMIT

    if quick:
        return QUICK_TASKS, [0], QUICK_TRAIN_LIMIT, QUICK_TEST_LIMIT
    return tuple(SUITE), list(range(seeds)), TRAIN_LIMIT, TEST_LIMIT


def trained_tasks(names, seeds, train_limit: int, test_limit: int, retrain: bool = False) -> dict[int, list[TrainedTask]]:
    """Per seed, every task's trained module with its held-out slice and test set (trained or read
    from the cache)."""
    missing = ensure_corpus_packages({TASKS[name][0] for name in names}, say=lambda line: print(line, file=sys.stderr))
    if missing:
        raise SystemExit(f"cannot get the corpora's packages: {', '.join(missing)}")
    backbone = load_backbone("minilm")
    model = ContinualTinyTransformer(backbone, ModelConfig(max_length=DEFAULT_MAX_LENGTH))
    tasks = make_tasks(tuple(names), train_limit, test_limit)
    folder = cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[int, list[TrainedTask]] = {}
    for seed in seeds:
        for name, (train, test) in tasks.items():
            settings = LearnSettings(backbone="minilm", seed=seed, progress=False)
            labels = label_set(train)
            fit, held_out = stratified_split(train, settings.holdout, seed)
            path = folder / f"{name}-{seed}-{_key(name, seed, train, settings, backbone)}.pt"
            module = TaskModule.for_backbone(backbone, len(labels))
            if path.is_file() and not retrain:
                module.load_state_dict(torch.load(path), strict=False)  # older caches hold no temperature
            else:
                started = time.perf_counter()
                module, _ = train_task_module(model, labels, fit, held_out, settings)
                torch.save(module.state_dict(), path)
                print(f"  trained {name} seed {seed} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
            out.setdefault(seed, []).append(TrainedTask(name, seed, labels, module, held_out, test))
    return out


def model_of(trained: list[TrainedTask], config: ModelConfig | None = None,
             cls=ContinualTinyTransformer) -> ContinualTinyTransformer:
    """One model holding every task of a seed, as the benchmark's last version holds them."""
    model = cls(load_backbone("minilm"), config or ModelConfig(max_length=DEFAULT_MAX_LENGTH))
    for task in trained:
        model = model.with_task(Task(task.name, task.labels), task.module)
    return model
