"""The continual tiny transformer: one frozen encoder, one tiny module per task.

Each task owns (IA)^3-style scaling vectors for the attention keys, the attention values and the
feed-forward activations of every layer (initialised to ones, i.e. the bare backbone), plus a
linear head on the masked mean-pooled output. The vectors of all tasks sit stacked in a bank, so
one forward pass serves a batch whose rows belong to different tasks: each row gathers its own
task's vectors. Adding or replacing a task builds a new bank and never writes into the old one,
which is why learning task N cannot change what tasks 1..N-1 predict.
"""

from __future__ import annotations

import json
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.backbone import Backbone, load_verified_backbone
from model.errors import CTTError
from model.precision import REFERENCE_PRECISION, check_precision, int8_encoder
from model.registry import CONFIG_FILE, FORMAT_VERSION, MAX_TEMPERATURE, MIN_TEMPERATURE, ModelConfig, read_config
from model.settings import default

DEFAULT_MAX_TASKS: int = default("MAX_TASKS")
# Padded tokens per forward pass in `predict`: 32 texts of 64 tokens, or 8 of 256. On CPU, batches
# beyond about 8 gain little, so long texts lose almost nothing by running in smaller passes.
BATCH_TOKEN_BUDGET = 2048
TASK_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
WEIGHTS_FILE = "tasks.safetensors"


def check_task_name(name: str) -> str:
    if not TASK_NAME_PATTERN.fullmatch(name or ""):
        raise CTTError(
            f"invalid task name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


# The scaling hooks live on the shared encoder; which vectors they apply is per call and per
# thread, so several models (or serving threads) can share one loaded backbone safely.
_active_scales = threading.local()
SITES = ("key", "value", "ffn")


@contextmanager
def scaling(key: torch.Tensor, value: torch.Tensor, ffn: torch.Tensor) -> Iterator[None]:
    """Apply per-row scales, each shaped (rows or 1, layers, width), inside this block."""
    previous = getattr(_active_scales, "scales", None)
    _active_scales.scales = {"key": key, "value": value, "ffn": ffn}
    try:
        yield
    finally:
        _active_scales.scales = previous


def _scaling_hook(site: str, layer: int):
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        scales = getattr(_active_scales, "scales", None)
        if scales is None:
            return output
        return output * scales[site][:, layer].unsqueeze(1)

    return hook


def install_scaling_hooks(encoder: nn.Module) -> None:
    if getattr(encoder, "_ctt_hooks_installed", False):
        return
    for index, layer in enumerate(encoder.encoder.layer):
        layer.attention.self.key.register_forward_hook(_scaling_hook("key", index))
        layer.attention.self.value.register_forward_hook(_scaling_hook("value", index))
        # BertIntermediate returns act(W1 x): scaling its output is (IA)^3's l_ff.
        layer.intermediate.register_forward_hook(_scaling_hook("ffn", index))
    encoder._ctt_hooks_installed = True


class TaskModule(nn.Module):
    """The only trainable part of a task: kilobytes, not megabytes. Its calibration temperature
    is fitted after training, on examples the module never trained on (training/calibration.py);
    1 means uncalibrated."""

    def __init__(self, num_layers: int, hidden: int, intermediate: int, num_labels: int):
        super().__init__()
        self.key = nn.Parameter(torch.ones(num_layers, hidden))
        self.value = nn.Parameter(torch.ones(num_layers, hidden))
        self.ffn = nn.Parameter(torch.ones(num_layers, intermediate))
        self.head = nn.Linear(hidden, num_labels)
        self.register_buffer("temperature", torch.ones(()))

    @classmethod
    def for_backbone(cls, backbone: Backbone, num_labels: int) -> "TaskModule":
        info = backbone.info
        return cls(info.num_layers, info.hidden_size, info.intermediate_size, num_labels)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass
class Task:
    name: str
    labels: list[str]
    info: dict = field(default_factory=dict)  # sizes, accuracies, the version it was learned in

    def to_dict(self) -> dict:
        return {"name": self.name, "labels": self.labels, "info": self.info}


@dataclass
class Prediction:
    task: str
    label: str
    score: float
    probabilities: dict[str, float]


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class ContinualTinyTransformer(nn.Module):
    def __init__(
        self,
        backbone: Backbone,
        config: ModelConfig,
        max_tasks: int | None = None,
        tasks: Sequence[Task] = (),
        bank: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, not {type(config).__name__}")
        self.backbone = backbone
        self.encoder = backbone.encoder
        self.tokenizer = backbone.tokenizer
        self.config = config
        # A guard, passed in by whoever builds the model (MAX_TASKS in the settings table).
        self.max_tasks = max_tasks if max_tasks is not None else DEFAULT_MAX_TASKS
        self.tasks = list(tasks)
        if len(self.tasks) > self.max_tasks:
            raise CTTError(
                f"model holds {len(self.tasks)} tasks but MAX_TASKS is {self.max_tasks}"
            )
        self._index = {task.name: i for i, task in enumerate(self.tasks)}
        info = backbone.info
        self.bank = dict(bank) if bank else {
            "key": torch.empty(0, info.num_layers, info.hidden_size),
            "value": torch.empty(0, info.num_layers, info.hidden_size),
            "ffn": torch.empty(0, info.num_layers, info.intermediate_size),
            "head_weight": torch.empty(0, 0, info.hidden_size),
            "head_bias": torch.empty(0, 0),
        }
        # A bank without temperatures (format 1, or one built by hand) is uncalibrated: dividing by
        # one leaves every logit bit-identical.
        self.bank.setdefault("temperature", torch.ones(len(self.tasks)))
        temperature = self.bank["temperature"]
        # Only what `ctt learn` can write: a temperature near zero or huge would turn every score
        # into NaN or a uniform guess (and the label with it).
        if (temperature.shape != (len(self.tasks),) or not torch.is_floating_point(temperature)
                or not bool(((temperature >= MIN_TEMPERATURE) & (temperature <= MAX_TEMPERATURE)).all())):
            raise CTTError(f"the task bank's calibration temperatures are damaged (shape "
                           f"{tuple(temperature.shape)} for {len(self.tasks)} tasks, or outside "
                           f"[{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}])")
        max_positions = getattr(backbone.encoder.config, "max_position_embeddings", None)
        if max_positions is not None and self.config.max_length > max_positions:
            raise CTTError(f"max_length {self.config.max_length} is more than the backbone reads "
                           f"({max_positions} tokens)")
        self.label_mask = torch.zeros(len(self.tasks), self.bank["head_bias"].shape[1], dtype=torch.bool)
        for i, task in enumerate(self.tasks):
            self.label_mask[i, : len(task.labels)] = True
        install_scaling_hooks(self.encoder)

    @property
    def max_length(self) -> int:
        return self.config.max_length

    def with_config(self, config: ModelConfig) -> "ContinualTinyTransformer":
        """The same tasks and bank under another configuration (a new version's: ModelConfig.for_child)."""
        if config.max_length != self.config.max_length:
            raise CTTError(f"max_length is fixed for a lineage: {self.config.max_length}, not {config.max_length}")
        return type(self)(self.backbone, config, self.max_tasks, self.tasks, self.bank)

    # ----- tasks -------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def task(self, name: str) -> Task:
        return self.tasks[self.task_index(name)]

    def task_index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            known = ", ".join(self.task_names) or "none"
            raise CTTError(f"unknown task {name!r}; known tasks: {known}") from None

    def with_task(self, task: Task, module: TaskModule) -> "ContinualTinyTransformer":
        """A new model with ``task`` added (or replaced, if the name exists); self is untouched."""
        check_task_name(task.name)
        replacing = task.name in self._index
        if not replacing and len(self.tasks) + 1 > self.max_tasks:
            raise CTTError(
                f"cannot add task {task.name!r}: the model already holds {len(self.tasks)} tasks "
                f"and MAX_TASKS is {self.max_tasks} (raise MAX_TASKS to allow more)"
            )
        num_labels = len(task.labels)
        if module.head.out_features != num_labels:
            raise CTTError(f"task {task.name!r} has {num_labels} labels but its head has "
                           f"{module.head.out_features} outputs")
        width = max(self.bank["head_bias"].shape[1], num_labels)
        old_count = len(self.tasks)
        row = self._index[task.name] if replacing else old_count
        count = old_count if replacing else old_count + 1
        hidden = self.backbone.info.hidden_size

        head_weight = torch.zeros(count, width, hidden)
        head_bias = torch.zeros(count, width)
        head_weight[:old_count, : self.bank["head_weight"].shape[1]] = self.bank["head_weight"]
        head_bias[:old_count, : self.bank["head_bias"].shape[1]] = self.bank["head_bias"]
        head_weight[row] = 0.0
        head_bias[row] = 0.0
        with torch.no_grad():
            head_weight[row, :num_labels] = module.head.weight.detach()
            head_bias[row, :num_labels] = module.head.bias.detach()

        temperature = self.bank["temperature"].clone()
        if replacing:
            temperature[row] = module.temperature.detach()
        else:
            temperature = torch.cat([temperature, module.temperature.detach().reshape(1)])
        bank = {"head_weight": head_weight, "head_bias": head_bias, "temperature": temperature}
        for site in SITES:
            stacked = self.bank[site]
            new_row = getattr(module, site).detach().clone().unsqueeze(0)
            if replacing:
                stacked = torch.cat([stacked[:row], new_row, stacked[row + 1 :]])
            else:
                stacked = torch.cat([stacked, new_row])
            bank[site] = stacked
        tasks = list(self.tasks)
        if replacing:
            tasks[row] = task
        else:
            tasks.append(task)
        return type(self)(self.backbone, self.config, self.max_tasks, tasks, bank)

    def task_module(self, name: str) -> TaskModule:
        """A trainable copy of one task's module (e.g. to fine-tune it further)."""
        row = self.task_index(name)
        num_labels = len(self.tasks[row].labels)
        module = TaskModule.for_backbone(self.backbone, num_labels)
        with torch.no_grad():
            for site in SITES:
                getattr(module, site).copy_(self.bank[site][row])
            module.head.weight.copy_(self.bank["head_weight"][row, :num_labels])
            module.head.bias.copy_(self.bank["head_bias"][row, :num_labels])
            module.temperature.copy_(self.bank["temperature"][row])
        return module

    # ----- forward -----------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def encoder_in(self, precision: str) -> nn.Module:
        """The shared frozen encoder (fp32) or its quantised copy (int8, model/precision.py)."""
        if check_precision(precision) == REFERENCE_PRECISION:
            return self.encoder
        return int8_encoder(self.encoder, self.config.fast_path)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               precision: str = REFERENCE_PRECISION) -> torch.Tensor:
        encoder = self.encoder_in(precision)
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return masked_mean(hidden, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                task_ids: torch.Tensor, precision: str = REFERENCE_PRECISION,
                calibrated: bool = True) -> torch.Tensor:
        """Logits (rows, widest label set); classes a row's task lacks are -inf. Calibrated logits
        are each task's divided by its temperature: the same argmax, probabilities users can
        threshold; ``calibrated=False`` gives the module's raw logits (to measure calibration)."""
        with scaling(self.bank["key"][task_ids], self.bank["value"][task_ids],
                     self.bank["ffn"][task_ids]):
            pooled = self.pooled(input_ids, attention_mask, precision)
        # An elementwise product summed over the hidden axis keeps each row's logits independent
        # of how many classes other tasks have, so adding a task cannot perturb old logits.
        logits = (self.bank["head_weight"][task_ids] * pooled.unsqueeze(1)).sum(-1)
        logits = logits + self.bank["head_bias"][task_ids]
        logits = logits.masked_fill(~self.label_mask[task_ids], float(self.config.padded_logit))
        return self.calibrate(logits, task_ids) if calibrated else logits

    def calibrate(self, logits: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Each row's raw logits divided by its task's temperature (padded classes stay -inf)."""
        return logits / self.bank["temperature"][task_ids].unsqueeze(1)

    def forward_module(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       module: TaskModule) -> torch.Tensor:
        """Training path: every row uses the one task module being learned."""
        with scaling(module.key.unsqueeze(0), module.value.unsqueeze(0), module.ffn.unsqueeze(0)):
            pooled = self.pooled(input_ids, attention_mask)
        return module.head(pooled)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Mean-pooled embeddings of the bare backbone (no task scaling): the probe's features."""
        chunks = [self.pooled(**self.tokenize(texts[i : i + batch_size]))
                  for i in range(0, len(texts), batch_size)]
        return torch.cat(chunks) if chunks else torch.empty(0, self.backbone.info.hidden_size)

    @torch.inference_mode()
    def logits(self, texts: Sequence[str], task_names: Sequence[str],
               precision: str = REFERENCE_PRECISION, calibrated: bool = True) -> torch.Tensor:
        task_ids = torch.tensor([self.task_index(name) for name in task_names], dtype=torch.long)
        return self(**self.tokenize(texts), task_ids=task_ids, precision=precision, calibrated=calibrated)

    @torch.inference_mode()
    def predict(self, texts: Sequence[str], task_names: Sequence[str],
                batch_size: int = 32, max_batch_tokens: int = BATCH_TOKEN_BUDGET,
                precisions: Mapping[str, str] | None = None) -> list[Prediction]:
        """Predictions in the order given. Texts are tokenised once and grouped by precision
        (``precisions`` maps a task to the one it is served in; fp32 by default), then by length
        into passes of at most ``batch_size`` rows and ``max_batch_tokens`` padded tokens, so short
        texts are padded only to other short texts and long ones run in smaller passes (mixed
        traffic would otherwise pay the longest text's length for every row). In fp32 a row's
        result does not depend on its neighbours beyond float rounding; in int8 it moves within
        model/precision.py's stated tolerance."""
        task_ids = [self.task_index(name) for name in task_names]
        row_precision = [(precisions or {}).get(name, REFERENCE_PRECISION) for name in task_names]
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        ids, masks = encoded["input_ids"], encoded["attention_mask"]
        order = sorted(range(len(texts)), key=lambda row: (row_precision[row], len(ids[row])))
        passes: list[list[int]] = [[]]
        for row in order:  # ascending length within a precision: the row added is the pass's longest
            current = passes[-1]
            if current and (len(current) >= batch_size or (len(current) + 1) * len(ids[row]) > max_batch_tokens
                            or row_precision[current[0]] != row_precision[row]):
                passes.append([])
            passes[-1].append(row)
        predictions: list[Prediction | None] = [None] * len(texts)
        for rows in passes:
            if not rows:
                continue
            padded = self.tokenizer.pad({"input_ids": [ids[r] for r in rows], "attention_mask": [masks[r] for r in rows]},
                                        return_tensors="pt")
            pass_task_ids = torch.tensor([task_ids[r] for r in rows])
            raw = self(padded["input_ids"], padded["attention_mask"], pass_task_ids, precision=row_precision[rows[0]],
                       calibrated=False)
            calibrated = torch.softmax(self.calibrate(raw, pass_task_ids), -1)
            # The label is the raw logits' argmax, as the version measured it: dividing by a
            # temperature cannot move it, but rounding in softmax can break a near tie the other way.
            for row, logits, probabilities in zip(rows, raw, calibrated):
                labels = self.tasks[task_ids[row]].labels
                best = int(logits.argmax())
                predictions[row] = Prediction(
                    task=task_names[row], label=labels[best], score=float(probabilities[best]),
                    probabilities={label: float(p) for label, p in zip(labels, probabilities)},
                )
        return predictions  # type: ignore[return-value]

    # ----- persistence -------------------------------------------------------------------
    def bank_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.bank.values())

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({name: tensor.contiguous() for name, tensor in self.bank.items()},
                  str(folder / WEIGHTS_FILE))
        registry = {
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone.info.to_dict(),
            **self.config.to_dict(),
            "tasks": [task.to_dict() for task in self.tasks],
        }
        (folder / CONFIG_FILE).write_text(json.dumps(registry, indent=2))

    @classmethod
    def load(cls, folder: Path, max_tasks: int | None = None) -> "ContinualTinyTransformer":
        registry = read_config(folder)
        try:
            bank = load_file(str(folder / WEIGHTS_FILE))
        except (OSError, ValueError) as exc:
            raise CTTError(f"{folder} is not a readable CTT model: {exc}") from exc
        backbone_info = registry["backbone"]
        backbone = load_verified_backbone(backbone_info["spec"], backbone_info["digest"])
        tasks = [Task(t["name"], t["labels"], t.get("info", {})) for t in registry["tasks"]]
        return cls(backbone, ModelConfig.from_registry(registry), max_tasks, tasks, bank)
