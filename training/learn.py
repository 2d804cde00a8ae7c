"""Learn one task on top of a model version, measure every task, register a new version.

Read top to bottom: settings → data → starting point → probe → training with early stopping →
evaluation of every task → quality gate → registration.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from model.backbone import DEFAULT_BACKBONE, load_backbone
from model.ctt import ContinualTinyTransformer, Task, check_task_name
from model.registry import ModelConfig
from model.errors import CTTError
from model.precision import PRECISIONS, REFERENCE_PRECISION
from model.store import METRICS_FILE, Version, get_version, has_versions, model_name, register_version, store_lock
from model.tags import parse_tag
from training.data import Example, cap_stratified, label_set, read_labelled, read_training_file, stratified_split
from training.calibration import calibration_errors, fit_temperature
from training.evaluate import ContinualMetrics, accuracy_of, continual_metrics, predictions_as_served, task_logits
from training.feedback import FeedbackBatch, describe_contradictions, vet_feedback
from training.gate import describe_gate, relearned_task_gate
from training.recipe import train_task_module
from training.settings import (  # noqa: F401  (LearnSettings is defined there, torch-free)
    DEFAULT_MAX_LENGTH, SELECT_ON, LearnSettings,
)
from training.report import write_accuracy_matrix_plot


@dataclass
class LearnReport(ContinualMetrics):
    """The continual metrics of the new version, and what was learned to get there."""

    tag: str = ""
    parent: str | None = None
    task: str = ""
    replaced: bool = False
    tasks: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    probe_accuracy: dict[str, float | None] = field(default_factory=dict)
    calibration: dict[str, dict] = field(default_factory=dict)  # task → temperature, ECE before and after
    precision_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # int8: task → accuracy
    precision_paired: dict[str, dict[str, dict]] = field(default_factory=dict)  # int8: task → paired counts
    accuracy_matrix: dict = field(default_factory=dict)
    epochs_run: int = 0
    best_epoch: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    module_parameters: int = 0
    module_bytes: int = 0
    backbone_parameters: int = 0
    seconds: float = 0.0
    feedback: dict | None = None  # the stored feedback this version learned from (ctt learn --feedback)
    relearn_gate: dict | None = None  # a relearned task against the parent's module (training/gate.py)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict, seconds: float) -> "LearnReport":
        """The report of ``ctt learn``, derived from the version's record."""
        metric_names = ("accuracy", "learned_accuracy", "forgetting", "mean_accuracy", "mean_forgetting", "bwt")
        training = record["training"]
        examples = record["examples"][record["new_task"]]
        return cls(
            **{name: record[name] for name in metric_names},
            tag=record["tag"], parent=record["parent"], task=record["new_task"], replaced=record["replaced"],
            tasks=record["tasks"], labels=record["labels"][record["new_task"]],
            probe_accuracy=record["probe_accuracy"], calibration=record.get("calibration", {}),
            precision_accuracy=record.get("precision_accuracy", {}), precision_paired=record.get("precision_paired", {}),
            accuracy_matrix=record["accuracy_matrix"],
            epochs_run=training["epochs_run"], best_epoch=training["best_epoch"],
            train_examples=examples["train_examples"], eval_examples=examples["eval_examples"],
            module_parameters=training["module_parameters"], module_bytes=training["module_bytes"],
            backbone_parameters=training["backbone_parameters"], seconds=seconds,
            feedback=record.get("feedback"), relearn_gate=record.get("relearn_gate"),
        )


def _say(settings: LearnSettings, message: str) -> None:
    if settings.progress:
        print(message, file=sys.stderr, flush=True)


def starting_point(from_tag: str | None, settings: LearnSettings) -> tuple[ContinualTinyTransformer, Version | None]:
    if from_tag or has_versions():
        parent = get_version(from_tag, "--from")
        model = parent.load(settings.max_tasks)
        if settings.backbone and settings.backbone != model.backbone.info.spec:
            raise CTTError(
                f"--backbone {settings.backbone!r} differs from {parent.tag}'s backbone "
                f"{model.backbone.info.spec!r}; a version cannot change its backbone"
            )
        if settings.max_length is not None and settings.max_length != model.max_length:
            raise CTTError(
                f"--max-length {settings.max_length} differs from {parent.tag}'s max_length {model.max_length}: "
                f"every version of a lineage reads the same number of tokens, so that old tasks keep their "
                f"logits (leave --max-length out to use {model.max_length}, or start a new lineage under "
                f"another CTT_MODEL_NAME)"
            )
        return model.with_config(model.config.for_child()), parent
    backbone = load_backbone(settings.backbone or DEFAULT_BACKBONE)
    config = ModelConfig(max_length=settings.max_length or DEFAULT_MAX_LENGTH)
    return ContinualTinyTransformer(backbone, config, settings.max_tasks), None


def _parent_facts(parent: Version | None, base: ContinualTinyTransformer) -> dict:
    """What the parent's record says about each old task when it was learned (older versions kept
    some of it in the task registry instead)."""
    record = parent.record() if parent else {}
    facts = {}
    for task in base.tasks:
        info = task.info or {}
        facts[task.name] = {
            "learned_accuracy": record.get("learned_accuracy", {}).get(task.name, info.get("learned_accuracy")),
            "probe_accuracy": record.get("probe_accuracy", {}).get(task.name, info.get("probe_accuracy")),
            "examples": record.get("examples", {}).get(task.name) or {
                key: info[key] for key in ("train_examples", "held_out_examples", "eval_examples") if key in info},
        }
    return facts


# What a later recalibration of each task needs: the raw logits of its module on its held-out slice
# (examples it never trained on), with the targets; carried from version to version like the
# evaluation sets. Tasks learned before calibration existed have none.
HELD_OUT_LOGITS_FILE = "held_out_logits.json"
UNCALIBRATED = "learned before calibrated scores existed, with no held-out logits kept: scores as they were"


def _held_out_logits(parent: Version | None, model: ContinualTinyTransformer, task_name: str,
                     logits: torch.Tensor, targets: torch.Tensor) -> dict:
    kept = {}
    if parent is not None:
        try:
            kept = json.loads((parent.path / HELD_OUT_LOGITS_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            kept = {}
        except ValueError:
            raise CTTError(f"{parent.tag}: {HELD_OUT_LOGITS_FILE} is not valid JSON") from None
    kept = {name: kept[name] for name in model.task_names if name in kept and name != task_name}
    kept[task_name] = {"logits": [[round(value, 6) for value in row] for row in logits.tolist()],
                       "targets": targets.tolist()}
    return kept


def _calibration_record(model: ContinualTinyTransformer, raw_logits: dict, parent: Version | None,
                        task_name: str, held_out_examples: int, in_sample: bool) -> dict:
    """Per task: how its scores are calibrated and the ECE of its raw and calibrated scores on its
    evaluation set, measured now. A task of an older version keeps what that version recorded
    (uncalibrated if nothing was)."""
    previous = (parent.record() if parent else {}).get("calibration")
    previous = previous if isinstance(previous, dict) else {}
    record = {}
    for name, (logits, targets) in raw_logits.items():
        temperature = float(model.bank["temperature"][model.task_index(name)])
        if name == task_name:
            how = {"method": "temperature", "fitted_on": "held-out slice", "fitted_examples": held_out_examples,
                   # Without --eval the evaluation set is the held-out slice: ECE after is then in-sample.
                   "ece_in_sample": in_sample}
        elif isinstance(previous.get(name), dict) and previous[name].get("method") == "temperature":
            how = {key: previous[name][key] for key in ("method", "fitted_on", "fitted_examples", "ece_in_sample")
                   if key in previous[name]}
        else:
            how = {"method": "none", "reason": UNCALIBRATED}
        record[name] = {**how, "temperature": temperature, "ece_examples": len(targets),
                        **calibration_errors(logits, targets, temperature)}
    return record


def store_metadata(record: dict) -> dict:
    """The BentoML metadata of a version: a summary derived from its record, for listing."""
    keys = ("parent", "parent_manifest_sha256", "new_task", "replaced", "tasks", "backbone", "backbone_digest",
            "max_length", "accuracy", "mean_accuracy", "bwt")
    metadata = {key: record[key] for key in keys}
    for optional in ("feedback", "relearn_gate"):
        if record.get(optional):
            metadata[optional] = record[optional]
    return metadata


def without_relabelled(examples: list[Example], feedback: list[Example]) -> list[Example]:
    """The file's examples less the texts that feedback labels: feedback is newer than any file
    (and its newest label per text was already chosen)."""
    relabelled = {example.text for example in feedback}
    return [example for example in examples if example.text not in relabelled]


def stored_eval_set(version: Version | None, task_name: str) -> list[Example]:
    """The evaluation set ``version`` keeps for ``task_name`` (empty when it has no such task)."""
    tasks = version.metadata.get("tasks", []) if version else []
    return [Example(**e) for e in version.eval_set(tasks.index(task_name))] if task_name in tasks else []


def learn(task_name: str, train_path: str | Path, eval_path: str | Path | None = None,
          from_tag: str | None = None, settings: LearnSettings | None = None,
          feedback: FeedbackBatch | None = None) -> LearnReport:
    """Learn ``task_name`` from ``train_path``, plus ``feedback`` (stored production feedback of the
    task) when given, on top of ``from_tag`` or the latest version, and register the result."""
    settings = settings or LearnSettings()
    settings.validate()
    started = time.perf_counter()
    check_task_name(task_name)
    if from_tag is not None:  # parsed strictly before the store is touched (its lock file included)
        parse_tag(from_tag, model_name(), "--from")

    # Data: check everything before any expensive step (and before waiting for the store).
    examples = read_training_file(train_path, settings.max_labels)
    evaluation_file = read_labelled(eval_path) if eval_path is not None else None
    vetted_against = None
    if feedback is not None:
        # Feedback is checked against the files it would overrule and the evaluation sets the
        # gate measures on (the version learning starts from keeps one for a relearned task);
        # evaluation texts never train from feedback.
        start = get_version(from_tag) if from_tag or has_versions() else None
        vetted_against = start.tag if start else None
        evaluation_sets = {"parent": stored_eval_set(start, task_name), "eval": evaluation_file or []}
        trained_feedback, feedback_info = vet_feedback(feedback, examples, evaluation_sets,
                                                       settings.max_feedback_contradictions,
                                                       settings.allow_contradictions)
        examples = without_relabelled(examples, trained_feedback)
    labels = label_set(examples + (trained_feedback if feedback else []))
    fit, held_out = stratified_split(examples, settings.holdout, settings.seed)
    if feedback is not None:
        # Feedback only ever trains: corrections lean towards the model's errors, so the held-out
        # slice that picks the epoch (and, without --eval, measures the task) stays the file's.
        fit = fit + trained_feedback
        _say(settings, f"feedback: {describe_feedback(feedback_info)}")
    if evaluation_file is not None:
        unseen = sorted(set(label_set(evaluation_file)) - set(labels))
        if unseen:
            raise CTTError(f"{eval_path}: labels {unseen} never appear in the training file {train_path}")
        evaluation = evaluation_file
    else:
        evaluation = held_out
    evaluation = cap_stratified(evaluation, settings.max_eval_examples, settings.seed)

    # From choosing the parent to registering, no other writer may change the store: two runs
    # that both started from the same latest version would otherwise lose one of the tasks.
    with store_lock(wait=settings.wait):
        record = _learn_locked(task_name, labels, fit, held_out, evaluation, from_tag, settings,
                               feedback_info if feedback is not None else None, vetted_against,
                               gate_on_evaluation=evaluation_file is not None)
    return LearnReport.from_record(record, seconds=time.perf_counter() - started)


def describe_feedback(info: dict) -> str:
    """The feedback a learn used, in one line: rows, what trained, contradictions, by whom."""
    contradictions = info["contradictions"]
    sources = ", ".join(f"{tally['examples']} {source}" for source, tally in info["by_source"].items())
    credentials = ", ".join(f"{tally['examples']} from {name}" for name, tally in info["by_credential"].items())
    line = (f"{info['rows']} stored row(s) up to id {info['up_to_id']}: {info['examples']} text(s), newest label "
            f"each ({sources or 'none'}; {credentials or 'none'}); trained on {info['trained_on']} "
            f"({info['evaluation_texts_not_trained']} evaluation text(s) never train); {contradictions['total']} "
            f"contradict a label of the training file ({contradictions['training_file']}) or of an evaluation set "
            f"({contradictions['evaluation']})")
    return line + (f": {describe_contradictions(info)}" if contradictions["total"] else "")


def _learn_locked(task_name, labels, fit, held_out, evaluation, from_tag, settings, feedback_info=None,
                  vetted_against=None, gate_on_evaluation=False) -> dict:
    base, parent = starting_point(from_tag, settings)
    if feedback_info is not None and (parent.tag if parent else None) != vetted_against:
        raise CTTError(f"another run registered {parent.tag if parent else '-'} while this one waited; the feedback "
                       f"was checked against {vetted_against or 'an empty store'}: run it again")
    replaced = task_name in base.task_names
    if not replaced and len(base.tasks) >= base.max_tasks:
        raise CTTError(f"cannot add task {task_name!r}: the model already holds {len(base.tasks)} "
                       f"tasks and MAX_TASKS is {base.max_tasks} (raise MAX_TASKS to allow more)")
    _say(settings, f"{'re-learning (replacing)' if replaced else 'learning'} task {task_name!r} "
                   f"from {parent.tag if parent else 'the bare backbone ' + base.backbone.info.spec}: "
                   f"{len(labels)} labels, {len(fit)} training / {len(held_out)} held-out / "
                   f"{len(evaluation)} evaluation examples")

    module, training = train_task_module(base, labels, fit, held_out, settings)
    probe = training["probe"]
    label_index = {label: i for i, label in enumerate(labels)}
    probe_accuracy = probe.accuracy(base.embed([e.text for e in evaluation]),
                                    torch.tensor([label_index[e.label] for e in evaluation]))
    # The calibration: one temperature fitted on the held-out slice, which the module never trained on.
    held_out_targets = torch.tensor([label_index[e.label] for e in held_out])
    with torch.no_grad():
        module.temperature.fill_(fit_temperature(training["held_out_logits"], held_out_targets))
    _say(settings, f"calibration: temperature {float(module.temperature):.3f}, fitted on {len(held_out)} "
                   "held-out examples")

    # Evaluate every task on its own stored evaluation set: old numbers are measured, not copied.
    facts = _parent_facts(parent, base)
    # The registry keeps only what loading needs; every measurement lives in the version's record.
    model = base.with_task(Task(task_name, labels, {}), module)
    eval_sets = [
        evaluation if t.name == task_name else [Example(**e) for e in parent.eval_set(base.task_index(t.name))]
        for t in model.tasks
    ]
    raw_logits = {t.name: task_logits(model, t.name, examples_, progress=settings.progress, calibrated=False)
                  for t, examples_ in zip(model.tasks, eval_sets)}
    measured = {name: accuracy_of(*logits) for name, logits in raw_logits.items()}
    calibration = _calibration_record(model, raw_logits, parent, task_name, len(held_out),
                                      in_sample=evaluation is held_out)
    # Every task in every faster precision too, in mixed passes as served, with the examples only
    # fp32 or only the fast precision classifies right: the service serves a task in int8 unless
    # those show int8 worse (model/precision.py).
    _say(settings, f"measuring every task in int8 ({model.config.fast_path}), in mixed passes as the service runs them")
    precision_accuracy, precision_paired = {}, {}
    for precision in PRECISIONS:
        if precision == REFERENCE_PRECISION:
            continue
        served = predictions_as_served(model, {t.name: s for t, s in zip(model.tasks, eval_sets)}, precision)
        precision_accuracy[precision], precision_paired[precision] = {}, {}
        for name, (logits, targets) in raw_logits.items():
            reference_right = (logits.argmax(-1) == targets).tolist()
            labels = model.task(name).labels
            right = [p.label in labels and labels.index(p.label) == t for p, t in zip(served[name], targets.tolist())]
            precision_accuracy[precision][name] = sum(right) / len(right) if right else 0.0
            precision_paired[precision][name] = {
                "examples": len(right),
                "fp32_only_right": sum(r and not f for r, f in zip(reference_right, right)),
                "fast_only_right": sum(f and not r for r, f in zip(reference_right, right))}
    facts[task_name] = {
        "learned_accuracy": measured[task_name], "probe_accuracy": probe_accuracy,
        "examples": {"train_examples": len(fit), "held_out_examples": len(held_out), "eval_examples": len(evaluation)},
    }
    learned = {name: facts[name]["learned_accuracy"] for name in measured}
    metrics = continual_metrics(measured, learned, task_name)

    # Quality gate: compare with what the parent version measured, before anything is written.
    parent_record = parent.record() if parent else {}
    parent_accuracy = parent_record.get("accuracy", {})
    for name, now in measured.items():
        if name == task_name or name not in parent_accuracy:
            continue
        drop = parent_accuracy[name] - now
        if drop > settings.max_forgetting + 1e-12:
            raise CTTError(f"refusing to register: task {name!r} accuracy fell from "
                           f"{parent_accuracy[name]:.4f} to {now:.4f} (--max-forgetting {settings.max_forgetting})")
    if measured[task_name] < settings.min_accuracy:
        raise CTTError(f"refusing to register: task {task_name!r} scored {measured[task_name]:.4f}, "
                       f"below --min-accuracy {settings.min_accuracy}")
    gate = None
    if replaced:
        # The relearned task has a floor too: the parent's module, on the same evaluation examples.
        gate_sets = {"parent": stored_eval_set(parent, task_name)}
        if gate_on_evaluation:  # the new --eval file (the held-out slice already chose the epoch)
            gate_sets["eval"] = evaluation
        gate = {**relearned_task_gate(base, model, task_name, gate_sets, settings.relearn_z),
                "allowed": settings.allow_relabel}
        if gate["clearly_worse"] and not settings.allow_relabel:
            raise CTTError(f"refusing to register: relearned task {task_name!r} is clearly worse than {parent.tag}'s "
                           f"module: {describe_gate(gate)}; --allow-relabel registers a deliberate relabelling")
        if gate["clearly_worse"]:
            _say(settings, f"relearned task {task_name!r} is clearly worse than the parent's module "
                           f"({describe_gate(gate)}); registered anyway: --allow-relabel")

    matrix = copy.deepcopy(parent_record.get("accuracy_matrix", {"tasks": [], "rows": []}))
    matrix["tasks"] = model.task_names
    module_parameters = module.num_parameters()
    # The one record of this version: metrics.json is this document, the store metadata and the
    # report are derived from it.
    record = {
        "tag": None, "parent": parent.tag if parent else None,
        "parent_manifest_sha256": parent.digest if parent else None,
        "new_task": task_name, "replaced": replaced, "tasks": model.task_names,
        "labels": {t.name: t.labels for t in model.tasks},
        "backbone": model.backbone.info.spec, "backbone_digest": model.backbone.info.digest,
        "max_length": model.max_length,
        **asdict(metrics),
        "precision_accuracy": precision_accuracy,
        "precision_paired": precision_paired,
        "probe_accuracy": {name: facts[name]["probe_accuracy"] for name in model.task_names},
        "calibration": calibration,
        "examples": {name: facts[name]["examples"] for name in model.task_names},
        "accuracy_matrix": matrix,
        "training": {"epochs_run": training["epochs_run"], "best_epoch": training["best_epoch"],
                     "module_parameters": module_parameters, "module_bytes": module_parameters * 4,
                     "backbone_parameters": model.backbone.info.parameters,
                     # What this version used: the lineage's length and backbone, whatever was asked.
                     "settings": {k: v for k, v in asdict(replace(
                         settings, max_length=model.max_length, backbone=model.backbone.info.spec)).items()
                         if k not in ("progress", "wait")}},
    }
    if feedback_info is not None:
        record["feedback"] = feedback_info  # which stored rows (up to which id) this version learned
    if gate is not None:
        record["relearn_gate"] = gate  # the relearned task against the parent's module, and any override

    held_out_logits = _held_out_logits(parent, model, task_name, training["held_out_logits"], held_out_targets)

    def write_record(folder: Path, tag: str) -> None:
        record["tag"] = tag
        matrix["rows"].append({"version": tag, "learned": task_name, "accuracy": measured})
        (folder / METRICS_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
        (folder / HELD_OUT_LOGITS_FILE).write_text(json.dumps(held_out_logits), encoding="utf-8")
        write_accuracy_matrix_plot(matrix, record["probe_accuracy"], folder / "accuracy_matrix.png")

    register_version(
        model,
        eval_sets=[[e.to_dict() for e in s] for s in eval_sets],
        metadata=store_metadata(record),
        labels={"stage": settings.stage, "owner": settings.owner, "task": task_name},
        write_extra=write_record,
    )
    return record
