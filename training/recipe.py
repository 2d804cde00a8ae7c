"""The training recipe of one task module: probe → scaling vectors and head → the module kept.

1. A logistic-regression probe on the frozen embeddings initialises the head: with every scaling
   vector at one the module *is* the probe (epoch 0).
2. The scaling vectors and the head train with their own learning rates (the head already sits at
   the probe's optimum, the vectors start from nothing), AdamW, a linear warm-up and a cosine
   decay over the planned steps, and a pull of the vectors towards one (an L2 penalty on v − 1).
3. Which module is kept (``select_on``):
   - ``last`` (the default): the whole schedule runs and its last epoch is kept, unless the
     held-out slice shows it *significantly* worse than the probe: a sign test on the held-out
     examples the two classify differently (the probe wins if it is right on more of them by over
     two standard deviations, z > 2). Measured on the continual benchmark's eight tasks at 200
     training examples (benchmarks/recipe_search.py --summary; the six short-text tasks over 3
     seeds, the two long ones over 1), the last epoch beat the probe by 2.96 points on average,
     choosing the epoch by held-out accuracy by 2.44: on a held-out slice of 30 examples one
     example is 3 points, so the choice kept the probe (or an early epoch) where the finished
     schedule was better on the test set about as often as it avoided a worse one. A slice that
     small can only be trusted to catch training that clearly went wrong.
   - ``accuracy``, ``calibrated-loss``, ``loss``: after each epoch the held-out slice scores the
     module; epochs, the probe included, are compared on held-out accuracy (ties broken by the
     temperature-scaled loss, each candidate at its own best temperature, so a confident trained
     module is not penalised against a calibrated probe), or on those losses; training stops after
     ``patience`` epochs without improvement.

Everything is seeded: the same inputs and settings give the same module.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from tqdm import tqdm

from model.ctt import ContinualTinyTransformer, TaskModule
from model.precision import worse_by_sign_test
from training.data import Example
from training.probe import fit_probe

VECTOR_SITES = ("key", "value", "ffn")


def _say(settings, message: str) -> None:
    if settings.progress:
        print(message, file=sys.stderr, flush=True)


def batches(examples: list[Example], batch_size: int, generator: torch.Generator | None):
    order = torch.randperm(len(examples), generator=generator).tolist() if generator else range(len(examples))
    order = list(order)
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start: start + batch_size]]


def calibrated_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Cross-entropy at the best temperature (searched on a fixed log grid), and that temperature."""
    best = (float(F.cross_entropy(logits, targets)), 1.0)
    for step in range(-24, 25):
        temperature = math.exp(step / 8)  # about 0.05 … 20
        loss = float(F.cross_entropy(logits / temperature, targets))
        if loss < best[0] - 1e-12:
            best = (loss, temperature)
    return best


@dataclass
class Score:
    accuracy: float
    loss: float
    calibrated_loss: float

    def key(self, select_on: str) -> tuple:
        """Larger is better."""
        if select_on == "loss":
            return (-self.loss, self.accuracy)
        if select_on == "calibrated-loss":
            return (-self.calibrated_loss, self.accuracy)
        return (self.accuracy, -self.calibrated_loss)


@torch.no_grad()
def held_out_logits(model: ContinualTinyTransformer, module: TaskModule, examples: list[Example],
                    batch_size: int = 64) -> torch.Tensor:
    chunks = [model.forward_module(**model.tokenize([e.text for e in batch]), module=module)
              for batch in batches(examples, batch_size, None)]
    return torch.cat(chunks)


SIGN_TEST_Z = 2.0  # how clearly the probe must beat the last epoch on held-out to be kept instead


def significantly_worse(correct: torch.Tensor, reference_correct: torch.Tensor, z: float = SIGN_TEST_Z) -> bool:
    """A sign test on the examples where two classifiers disagree: True when ``reference`` is
    right on more of them than ``correct`` by over ``z`` standard deviations (ties: 0)."""
    return worse_by_sign_test(int((reference_correct & ~correct).sum()), int((correct & ~reference_correct).sum()), z)


def score(logits: torch.Tensor, targets: torch.Tensor) -> Score:
    return Score(accuracy=int((logits.argmax(-1) == targets).sum()) / len(targets),
                 loss=float(F.cross_entropy(logits, targets)),
                 calibrated_loss=calibrated_loss(logits, targets)[0])


def lr_lambda(total_steps: int, warmup: float):
    warmup_steps = max(1, round(total_steps * warmup))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_task_module(model: ContinualTinyTransformer, labels: list[str], fit: list[Example],
                      held_out: list[Example], settings, on_epoch=None) -> tuple[TaskModule, dict]:
    """Train one task's module; ``on_epoch(epoch, module)`` lets a benchmark look at every epoch."""
    label_index = {label: i for i, label in enumerate(labels)}
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    module = TaskModule.for_backbone(model.backbone, len(labels))
    held_targets = torch.tensor([label_index[e.label] for e in held_out])

    _say(settings, f"probe: logistic regression on frozen embeddings of {len(fit)} examples")
    probe = fit_probe(model.embed([e.text for e in fit]),
                      torch.tensor([label_index[e.label] for e in fit]), len(labels))
    with torch.no_grad():
        module.head.weight.copy_(probe.weight)
        module.head.bias.copy_(probe.bias)

    vectors = [getattr(module, site) for site in VECTOR_SITES]
    optimiser = torch.optim.AdamW([
        {"params": vectors, "lr": settings.learning_rate},
        {"params": list(module.head.parameters()), "lr": settings.head_learning_rate},
    ], weight_decay=0.0)
    steps_per_epoch = math.ceil(len(fit) / settings.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lr_lambda(steps_per_epoch * settings.epochs, settings.warmup))

    probe_logits = held_out_logits(model, module, held_out)
    best = score(probe_logits, held_targets)
    best_state, best_epoch, stale, epochs_run = copy.deepcopy(module.state_dict()), 0, 0, 0
    best_logits = probe_logits
    history = [{"epoch": 0, **best.__dict__}]
    if on_epoch:
        on_epoch(0, module)
    _say(settings, f"epoch 0 (the probe): held-out accuracy {best.accuracy:.4f}, "
                   f"loss {best.loss:.4f} (calibrated {best.calibrated_loss:.4f})")
    keep_last = settings.select_on == "last"
    logits = probe_logits
    for epoch in range(1, settings.epochs + 1):
        _train_one_epoch(model, module, optimiser, scheduler, list(batches(fit, settings.batch_size, generator)),
                         label_index, vectors, f"epoch {epoch}/{settings.epochs}", settings)
        epochs_run = epoch
        logits = held_out_logits(model, module, held_out)
        now = score(logits, held_targets)
        history.append({"epoch": epoch, **now.__dict__})
        if on_epoch:
            on_epoch(epoch, module)
        _say(settings, f"epoch {epoch}: held-out accuracy {now.accuracy:.4f}, loss {now.loss:.4f} "
                       f"(calibrated {now.calibrated_loss:.4f})")
        if keep_last:
            continue
        if now.key(settings.select_on) > best.key(settings.select_on):
            best, best_epoch, stale, best_state = now, epoch, 0, copy.deepcopy(module.state_dict())
            best_logits = logits
        else:
            stale += 1
            if stale >= settings.patience:
                _say(settings, f"early stop: no better held-out score for {stale} epoch(s)")
                break
    if keep_last:
        if significantly_worse(logits.argmax(-1) == held_targets, probe_logits.argmax(-1) == held_targets):
            _say(settings, f"the last epoch is significantly worse than the probe on the held-out slice "
                           f"(sign test, z > {SIGN_TEST_Z:g}): keeping the probe")
        else:
            best_epoch, best_state, best_logits = epochs_run, module.state_dict(), logits
    module.load_state_dict(best_state)
    # The kept module's held-out logits: what its calibration is fitted on (training/calibration.py).
    return module, {"probe": probe, "best_epoch": best_epoch, "epochs_run": epochs_run, "history": history,
                    "held_out_logits": best_logits}


def _train_one_epoch(model, module, optimiser, scheduler, epoch_batches, label_index, vectors, description,
                     settings) -> None:
    # The backbone's weights stay frozen, but its dropout regularises the task vectors as in
    # ordinary fine-tuning; evaluation always runs with dropout off.
    model.encoder.train()
    try:
        steps = tqdm(epoch_batches, desc=description, disable=not settings.progress, unit="batch",
                     file=sys.stderr, mininterval=1.0)
        for batch in steps:
            logits = model.forward_module(**model.tokenize([e.text for e in batch]), module=module)
            loss = F.cross_entropy(logits, torch.tensor([label_index[e.label] for e in batch]))
            if settings.vector_pull:
                loss = loss + settings.vector_pull * sum((v - 1.0).pow(2).mean() for v in vectors)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            scheduler.step()
            steps.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    finally:
        model.encoder.eval()
