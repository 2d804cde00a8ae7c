"""What CTT takes from BentoML's private modules is still there and still means the same: an
upgrade of the pinned bentoml that changes any of it fails here, not in a deployment. Only
model/bentoml_internals.py may import a private BentoML name."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

import bentoml
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model import bentoml_internals
from model.tags import PART_MAX_CHARS, part_problem

ROOT = Path(__file__).resolve().parents[1]
PRIVATE = re.compile(r"^\s*(from|import)\s+(bentoml\._internal|_bentoml_impl|_bentoml_sdk)\b", re.M)
# The store's part of the project: every private BentoML name it uses comes through the adapter.
STORE_CODE = ["model/store", "model/integrity.py", "model/tags.py", "training/backup.py", "training/cli.py",
              "training/learn.py", "deploy/release.py", "deploy/cli.py"]


# ----- the model store -------------------------------------------------------------------------
def test_the_store_folder_is_the_one_bentoml_uses():
    assert bentoml_internals.model_store_dir() == Path(os.environ["BENTOML_HOME"]) / "models"


def test_a_version_written_with_the_adapter_is_read_back_by_bentoml_unchanged(tmp_path):
    name = f"ctt-internals-{uuid.uuid4().hex[:8]}"
    info = bentoml_internals.new_model_info(bentoml.Tag(name).make_new_version(), {"stage": "development"},
                                            {"parent": "x:y", "tasks": ["a", "b"], "accuracy": {"a": 0.5}})
    signed = bentoml_internals.model_info_with_metadata(info, {**info.metadata, "manifest_sha256": "0" * 64})
    assert (signed.tag, signed.creation_time, dict(signed.labels)) == (info.tag, info.creation_time, dict(info.labels))
    folder = bentoml_internals.model_store_dir() / name / info.tag.version
    folder.mkdir(parents=True)
    try:
        with open(folder / "model.yaml", "w", encoding="utf-8") as stream:
            bentoml_internals.write_model_info(stream, signed)
        with open(folder / "model.yaml", encoding="utf-8") as stream:
            read = bentoml_internals.read_model_info(stream)
        seen = bentoml.models.get(str(info.tag))  # BentoML's own public reader
        for model_info in (read, seen.info):
            assert str(model_info.tag) == str(info.tag) and dict(model_info.labels) == {"stage": "development"}
            assert dict(model_info.metadata) == {**info.metadata, "manifest_sha256": "0" * 64}
            assert model_info.creation_time == info.creation_time
            assert model_info.creation_time.tzinfo is not None and model_info.creation_time <= datetime.now(timezone.utc)
            assert (model_info.module, model_info.api_version) == ("", "v1")
    finally:
        shutil.rmtree(folder.parent)


def test_a_malformed_model_yaml_raises_for_the_store_to_report(tmp_path):
    (tmp_path / "model.yaml").write_text("name: [unclosed\n")
    with pytest.raises(Exception):
        with open(tmp_path / "model.yaml", encoding="utf-8") as stream:
            bentoml_internals.read_model_info(stream)


@settings(max_examples=200, deadline=None, database=None)
@given(part=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-ABC/:", max_size=PART_MAX_CHARS + 2))
def test_every_tag_part_ctt_accepts_is_one_bentoml_accepts_unchanged(part):
    if part_problem(part) is not None:
        return
    tag = bentoml.Tag(part, part)
    assert (tag.name, tag.version) == (part, part)


def test_the_store_code_imports_no_private_bentoml_name():
    files = [path for entry in STORE_CODE for path in ([ROOT / entry] if entry.endswith(".py")
                                                        else sorted((ROOT / entry).glob("*.py")))]
    assert len(files) > len(STORE_CODE)
    offenders = [str(path.relative_to(ROOT)) for path in files if PRIVATE.search(path.read_text())]
    assert offenders == []
