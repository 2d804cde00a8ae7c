"""Serving precisions: fp32, the reference, and int8, the fast path.

int8 is PyTorch's dynamic quantisation of the backbone's linear layers (weights int8 per output
channel, activations quantised per pass). The linear layers are three quarters of MiniLM's time
and run about twice as fast in int8 here; a whole forward pass, 1.35-1.55× (batches of 32 texts of
about 40 tokens, one or two threads, on this 2-core machine; `benchmarks/peers.py` measures the
service). It runs on a quantised *copy* of the shared frozen encoder,
so fp32 users of the same loaded backbone (training, evaluation, an fp32 task) never see it. The
module swap keeps each linear layer's forward hooks, so the per-row (IA)^3 scaling of
`model/ctt.py` applies unchanged: mixed-task batches stay exact per task.

What int8 does not keep is independence from neighbours: an activation's quantisation scale is
taken over the whole pass, so a row's probabilities move slightly with the other rows of its pass
(fp32 rows differ only by float rounding). On MiniLM and real tasks the move is the size of int8's
own error against fp32: a median of 0.0004 in probability, 0.03 at the 90th percentile, and a
label change only for rows already near a decision boundary (2 of 80 rows of a mixed pass; 1 of
80 between fp32 and int8). The stated tolerance below is what tests hold a mixed pass to against
the same rows served alone. Because of it accuracy is measured,
never assumed: `ctt learn` records every task's accuracy in every precision (int8 in passes that
mix every task's evaluation rows, as the service's passes do), and a task is served in int8 only
when its version measured it there within `MAX_ACCURACY_LOSS` of fp32. Anything else (a larger
loss, an older version that never measured int8, a damaged record, a machine where the int8 path
fails to warm up) is served in fp32.
"""

from __future__ import annotations

import copy
import itertools
import math
import threading
import warnings
import weakref
from typing import Mapping

from model.errors import CTTError

PRECISIONS = ("fp32", "int8")
REFERENCE_PRECISION = "fp32"
# Half a point of accuracy against fp32 on the task's evaluation set.
MAX_ACCURACY_LOSS = 0.005
# A mixed-task, mixed-length int8 pass against the same rows served one by one: the median row's
# largest probability change, and the share of rows whose label must agree.
MIXED_BATCH_MEDIAN_DRIFT = 0.01
MIXED_BATCH_LABEL_AGREEMENT = 0.95

# Keyed by the encoder itself, weakly: a backbone dropped from load_backbone's cache takes its copy along.
_quantised: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_quantise_lock = threading.Lock()


def int8_encoder(encoder):
    """A dynamically quantised copy of ``encoder``, made once per process and shared.

    The copy shares the embedding tables (most of MiniLM's weights; quantisation leaves them in
    fp32 anyway) instead of duplicating them: they are frozen and only read."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with _quantise_lock:
        found = _quantised.get(encoder)
        if found is not None:
            return found
        # The memo maps the embedding tables to themselves: the copy shares the tensors but has
        # modules of its own, so nothing done to the copy (eval(), quantisation's bookkeeping) or
        # to the original (train() while learning) reaches the other.
        embeddings = encoder.embeddings
        shared = {id(tensor): tensor for tensor in itertools.chain(embeddings.parameters(), embeddings.buffers())}
        body = copy.deepcopy(encoder, memo=shared)
        with warnings.catch_warnings():
            # torch.ao's eager quantisation is deprecated in favour of torchao, but it is what the
            # pinned torch ships and runs fastest here; the pin keeps it available.
            warnings.simplefilter("ignore")
            quantised = quantize_dynamic(body, {torch.nn.Linear: per_channel_dynamic_qconfig},
                                         dtype=torch.qint8, inplace=True)
        quantised.eval()
        _check_hooks_kept(encoder, quantised)
        _quantised[encoder] = quantised
        return quantised


def _check_hooks_kept(original, quantised) -> None:
    """The scaling hooks must survive the module swap, or int8 would silently serve every task as
    the bare backbone."""
    for before, after in zip(original.encoder.layer, quantised.encoder.layer):
        for name in ("key", "value"):
            if len(getattr(after.attention.self, name)._forward_hooks) != len(
                    getattr(before.attention.self, name)._forward_hooks):
                raise CTTError("int8 quantisation dropped the task scaling hooks; serve CTT_PRECISION=fp32")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise CTTError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return precision


def accuracy_loss(record: Mapping, precision: str) -> dict[str, float | None]:
    """Per task, fp32 accuracy minus ``precision`` accuracy as the version measured them (None
    where the version did not measure that precision)."""
    reference = _mapping(record.get("accuracy"))
    measured = _mapping(_mapping(record.get("precision_accuracy")).get(precision))
    return {task: reference[task] - measured[task] if _is_accuracy(reference[task]) and _is_accuracy(measured.get(task))
            else None for task in reference}


def _mapping(value) -> Mapping:
    return value if isinstance(value, Mapping) else {}


def _is_accuracy(value) -> bool:
    """A number a version could have measured (a damaged record's null, text or NaN is none)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def served_precisions(requested: str, tasks: list[str], record: Mapping) -> dict[str, str]:
    """The precision each task is served in: ``requested`` where the version measured it within
    ``MAX_ACCURACY_LOSS`` of fp32, otherwise fp32 (also for whatever a damaged record holds)."""
    check_precision(requested)
    record = _mapping(record)
    if requested == REFERENCE_PRECISION:
        return {task: REFERENCE_PRECISION for task in tasks}
    losses = accuracy_loss(record, requested)
    return {task: requested if losses.get(task) is not None and losses[task] <= MAX_ACCURACY_LOSS + 1e-12
            else REFERENCE_PRECISION for task in tasks}


def warm_up_or_fall_back(warm_up, precisions: dict[str, str], log) -> dict[str, str]:
    """Run ``warm_up(precisions)``; if it fails while some task uses a faster precision (quantising
    the backbone, or its kernels on this CPU), serve every task in fp32 instead of not at all.
    Returns the precisions in effect; a failure in fp32 itself is the model's and is raised."""
    try:
        warm_up(precisions)
        return precisions
    except Exception:
        if all(precision == REFERENCE_PRECISION for precision in precisions.values()):
            raise
        log("the fast precision failed to warm up on this machine: serving every task in fp32")
    reference = dict.fromkeys(precisions, REFERENCE_PRECISION)
    warm_up(reference)
    return reference
