"""Serving precisions: fp32, the reference, and int8, the fast path.

int8 is PyTorch's dynamic quantisation of the backbone's linear layers (weights int8 per output
channel, activations quantised per call to 7 bits with one scale for the whole input). The linear
layers are three quarters of MiniLM's time and run about twice as fast in int8 here; a whole
forward pass, 1.35-1.55× (batches of 32 texts of about 40 tokens, one or two threads, on this
2-core machine; `benchmarks/peers.py` measures the service). It runs on a quantised *copy* of the
shared frozen encoder, so fp32 users of the same loaded backbone (training, evaluation, an fp32
task) never see it. The module swap keeps each linear layer's forward hooks, so the per-row
(IA)^3 scaling of `model/ctt.py` applies unchanged.

How the copy is made is the version's ``fast_path`` (model/registry.py ModelConfig), because a
version's int8 measurements hold only for the path they were made on:

- ``int8-rows`` (versions from format 2 on): before each quantised linear layer every row (token) is
  divided by its own largest magnitude, and its output multiplied back. One scale per call was
  set by the few rows with the largest activations: the [CLS] token's are 2.5-4× any other token's
  in MiniLM, and a neighbour's task vectors or a longer text in the same pass moved it too, so the
  other rows were quantised in steps of a quarter of their range. With every row in [-1, 1] the
  step is the same for each: on the continual benchmark's tasks the texts fp32 and int8 classify
  differently fell from 8.9 to about 2 per 200 (benchmarks/fast_path.py compares the candidates).
  It needs no calibration data, so it holds on tasks nobody has seen. Q, K and V read the same
  input, so it is scaled once for the three.
- ``int8-dynamic``: the plain dynamic quantisation, for versions measured on it before.

What int8 does not keep is exact independence from neighbours: the rows of a call still share one
quantisation scale (in ``int8-rows`` only over values already scaled to [-1, 1]), so a row's
probabilities move slightly with the other rows of its pass. The stated tolerance below is what
tests hold a mixed pass to, against fp32 and against the same rows served alone. Because of it accuracy is measured,
never assumed: `ctt learn` measures every task in fp32 and in int8 on its evaluation set (int8 in
passes that mix every task's evaluation rows, as the service's passes do) and records, besides
both accuracies, how many examples only fp32 and only int8 classify right. A task is served in int8
unless those examples show int8 worse: a sign test, refused when int8 loses by more than
``FAST_PATH_Z`` standard deviations (``fast_path_verdicts``). The previous rule, a loss of at most
``MAX_ACCURACY_LOSS``, decided on one example of a 200-example set; it remains for versions that
recorded accuracies only. Anything else (an older version that never measured int8, a damaged
record, a machine where the int8 path fails to warm up) is served in fp32.
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
FAST_PATHS = ("int8-rows", "int8-dynamic")
FAST_PATH = "int8-rows"  # what new versions are measured and served on
LEGACY_FAST_PATH = "int8-dynamic"  # versions of format 1
# The gate for versions that recorded only accuracies: half a point against fp32.
MAX_ACCURACY_LOSS = 0.005
# The gate for versions that recorded the paired outcome: int8 is refused when the examples only
# fp32 classifies right outnumber those only int8 does by more than this many standard deviations.
FAST_PATH_Z = 2.0
# The stated tolerance of the fast path, for a mixed-task, mixed-length int8 pass against the same
# rows in fp32 and against the same rows served one by one in int8: the median row's largest
# probability change, and the share of rows whose label must agree.
MIXED_BATCH_MEDIAN_DRIFT = 0.01
MIXED_BATCH_LABEL_AGREEMENT = 0.95
# A row whose largest magnitude is below this is scaled as if it were this (all-zero rows).
_SMALLEST_ROW_SCALE = 1e-12

# Keyed by the encoder itself, weakly: a backbone dropped from load_backbone's cache takes its copies along.
_quantised: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_quantise_lock = threading.Lock()


def _row_scaled_linear_class():
    """The int8 linear layer of ``int8-rows``, a subclass of PyTorch's dynamic quantised Linear
    (made on first use: torch is imported lazily by this module)."""
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    class RowScaledDynamicLinear(DynamicLinear):
        """Dynamic int8 linear layer whose input rows are each scaled to [-1, 1] first.

        Its own weights carry no bias (the bias is added after the rows are scaled back:
        ``row_bias``); ``shared_input``, when set, is a per-thread memo shared with the layers
        that read the same input (Q, K and V), so the scaled input is made once."""

        row_bias = None
        shared_input = None

        def forward(self, x):
            memo = self.shared_input
            if memo is not None and getattr(memo, "source", None) is x:
                scaled, scale = memo.scaled, memo.scale
            else:
                # Two plain reductions: about 14× faster here than vector_norm(ord=inf) or aminmax.
                scale = torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg_())
                scale.clamp_(min=_SMALLEST_ROW_SCALE)
                scaled = x * scale.reciprocal()
                if memo is not None:
                    memo.source, memo.scaled, memo.scale = x, scaled, scale
            y = super().forward(scaled)
            if self.row_bias is None:
                return y.mul_(scale)
            return torch.addcmul(self.row_bias, y, scale, out=y)

    return RowScaledDynamicLinear


def int8_encoder(encoder, fast_path: str = FAST_PATH):
    """A dynamically quantised copy of ``encoder`` made as ``fast_path`` says, once per process
    and shared."""
    if fast_path not in FAST_PATHS:
        raise CTTError(f"unknown fast path {fast_path!r}: this code serves {', '.join(FAST_PATHS)}")
    if not getattr(encoder, "_ctt_hooks_installed", False):
        # A copy made before the hooks exist would serve every task as the bare backbone.
        raise CTTError("the encoder has no task scaling hooks yet: build the model before its int8 copy")
    with _quantise_lock:
        copies = _quantised.setdefault(encoder, {})
        found = copies.get(fast_path)
        if found is not None:
            return found
        if fast_path == "int8-rows":
            quantised = quantised_copy(encoder, _row_scaled_linear_class())
            for layer in quantised.encoder.layer:
                memo = threading.local()  # per thread: two threads' passes never share a memo
                for name in ("query", "key", "value"):
                    getattr(layer.attention.self, name).shared_input = memo
        else:
            quantised = quantised_copy(encoder)
        _check_hooks_kept(encoder, quantised)
        copies[fast_path] = quantised
        return quantised


def quantised_copy(encoder, linear_class=None):
    """A copy of ``encoder`` whose linear layers are PyTorch's dynamic int8 ones (or
    ``linear_class``, a subclass of them; one with a ``row_bias`` attribute gets each layer's bias
    there, out of its quantised weights).

    The copy shares the embedding tables (most of MiniLM's weights; quantisation leaves them in
    fp32 anyway) instead of duplicating them: they are frozen and only read."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    # The memo maps the embedding tables to themselves: the copy shares the tensors but has
    # modules of its own, so nothing done to the copy (eval(), quantisation's bookkeeping) or to
    # the original (train() while learning) reaches the other.
    embeddings = encoder.embeddings
    shared = {id(tensor): tensor for tensor in itertools.chain(embeddings.parameters(), embeddings.buffers())}
    body = copy.deepcopy(encoder, memo=shared)
    biases = {}
    if linear_class is not None and hasattr(linear_class, "row_bias"):
        for name, module in body.named_modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                biases[name], module.bias = module.bias.detach().clone(), None
    with warnings.catch_warnings():
        # torch.ao's eager quantisation is deprecated in favour of torchao, but it is what the
        # pinned torch ships and runs fastest here; the pin keeps it available.
        warnings.simplefilter("ignore")
        quantised = quantize_dynamic(body, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                                     inplace=True, **({"mapping": {torch.nn.Linear: linear_class}} if linear_class else {}))
    modules = dict(quantised.named_modules())
    for name, bias in biases.items():
        modules[name].row_bias = bias
    return quantised.eval()


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


def worse_by_sign_test(only_reference_right: int, only_candidate_right: int, z: float) -> bool:
    """A sign test on the examples two classifiers classify differently: True when the reference
    is right on more of them than the candidate by over ``z`` standard deviations (none: False)."""
    disagreements = only_reference_right + only_candidate_right
    return disagreements > 0 and only_reference_right - only_candidate_right > z * math.sqrt(disagreements)


# More evaluation examples than any version holds: counts beyond it are a damaged record.
MAX_RECORDED_EXAMPLES = 10 ** 9


def _paired(record: Mapping, precision: str, task: str) -> tuple[int, int, int] | None:
    """(examples only fp32 classified right, examples only ``precision`` did, examples measured),
    as the version recorded them; None where it did not (an older version, or a damaged record)."""
    counts = _mapping(_mapping(_mapping(record.get("precision_paired")).get(precision)).get(task))
    values = (counts.get("fp32_only_right"), counts.get("fast_only_right"), counts.get("examples"))
    if (all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_RECORDED_EXAMPLES for v in values)
            and values[0] + values[1] <= values[2]):
        return values  # type: ignore[return-value]
    return None


def fast_path_verdicts(record: Mapping, precision: str, tasks: list[str]) -> dict[str, dict]:
    """Per task, whether ``precision`` is kept and on what evidence: the paired counts and the sign
    test where the version recorded them, else the accuracy loss against ``MAX_ACCURACY_LOSS``."""
    record = _mapping(record)
    losses = accuracy_loss(record, precision)
    verdicts = {}
    for task in tasks:
        paired = _paired(record, precision, task)
        loss = losses.get(task)
        if paired is not None:
            only_reference, only_fast, examples = paired
            # The counts and the two accuracies are one measurement: a record where they disagree
            # (or the fast accuracy is missing) was not written by `ctt learn`, and keeps fp32.
            consistent = loss is not None and examples > 0 and abs(loss - (only_reference - only_fast) / examples) < 1e-6
            kept = consistent and not worse_by_sign_test(only_reference, only_fast, FAST_PATH_Z)
            verdicts[task] = {"kept": kept, "loss": loss, "fp32_only_right": only_reference,
                              "fast_only_right": only_fast,
                              "rule": f"sign test, z > {FAST_PATH_Z:g} refuses" if consistent else
                              "the record's counts disagree with its accuracies: fp32"}
        else:
            kept = loss is not None and loss <= MAX_ACCURACY_LOSS + 1e-12
            verdicts[task] = {"kept": kept, "loss": loss,
                              "rule": f"loss at most {100 * MAX_ACCURACY_LOSS:g} point (a version without paired counts)"}
    return verdicts


def served_precisions(requested: str, tasks: list[str], record: Mapping) -> dict[str, str]:
    """The precision each task is served in: ``requested`` where the version's measurements keep it
    (``fast_path_verdicts``), otherwise fp32 (also for whatever a damaged record holds)."""
    check_precision(requested)
    if requested == REFERENCE_PRECISION:
        return {task: REFERENCE_PRECISION for task in tasks}
    verdicts = fast_path_verdicts(record, requested, tasks)
    return {task: requested if verdicts[task]["kept"] else REFERENCE_PRECISION for task in tasks}


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
