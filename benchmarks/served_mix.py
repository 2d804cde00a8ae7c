"""A multi-task version to serve, with requests spread over its tasks: the continual benchmark's tasks as users meet them.

    python benchmarks/served_mix.py --home /tmp/ctt-mix            (learns 8 tasks, about 20 min on 2 cores)
    BENTOML_HOME=/tmp/ctt-mix CTT_MODEL_NAME=ctt-mix bentoml serve service:CTT

Learns the eight tasks of benchmarks/continual.py (training/corpora.py SUITE; 200 training
examples each, one seed) with `ctt learn`'s defaults, one version per task, into the BentoML home
``--home`` under the model name ``--model-name`` (a fresh lineage: nothing else in that store is
touched). Each task is then served in the precision its version measured it in: int8 where the
version's gate keeps it (model/precision.py), fp32 otherwise. It prints the tag and each task's
precision, and writes ``requests.jsonl`` into the home: one ``{"task", "text"}`` per line from
the tasks' test sets, interleaved task by task, so that a load generator that cycles through the
file spreads its requests over every task (``--max-words`` cuts each text to its first words, so
whole articles and posts arrive as short texts like the peers benchmark's).

For benchmarks/peers.py: serve that home and model name, and send the file's items.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(home: Path, name: str, seed: int = 0, train_limit: int = 200, test_limit: int = 200,
          max_words: int | None = 45) -> dict:
    """Learn the suite into ``home`` under ``name``; the version's tag, each task's served
    precision and the request mix (also written to ``home/requests.jsonl``)."""
    home.mkdir(parents=True, exist_ok=True)
    os.environ["BENTOML_HOME"] = str(home)
    os.environ["CTT_MODEL_NAME"] = name
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    from model.precision import served_precisions
    from model.store import get_version, has_versions
    from training.corpora import SUITE, TASKS, ensure_corpus_packages, make_tasks
    from training.learn import LearnSettings, learn

    if has_versions():
        raise SystemExit(f"{home} already holds a {name!r} model: give an empty home or another --model-name")
    missing = ensure_corpus_packages({TASKS[task][0] for task in SUITE})
    if missing:
        raise SystemExit(f"served_mix.py: could not download {', '.join(missing)}")
    tasks = make_tasks(tuple(SUITE), train_limit, test_limit)
    with tempfile.TemporaryDirectory(prefix="ctt-mix-") as folder:
        for step, (task, (train, test)) in enumerate(tasks.items(), start=1):
            paths = []
            for kind, examples in (("train", train), ("test", test)):
                path = Path(folder) / f"{task}.{kind}.jsonl"
                path.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in examples), encoding="utf-8")
                paths.append(path)
            report = learn(task, *paths, settings=LearnSettings(backbone="minilm", seed=seed, progress=False))
            print(f"[{step}/{len(tasks)}] {task}: accuracy {report.accuracy[task]:.3f}, {report.seconds:.0f} s",
                  file=sys.stderr, flush=True)
    version = get_version()
    precisions = served_precisions("int8", list(tasks), version.record())
    texts = {task: [" ".join(e.text.split()[:max_words]) if max_words else e.text for e in test]
             for task, (_, test) in tasks.items()}
    requests = [{"task": task, "text": texts[task][i]}
                for i in range(max(len(v) for v in texts.values())) for task in tasks if i < len(texts[task])]
    (home / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests), encoding="utf-8")
    return {"tag": version.tag, "precisions": precisions, "requests": requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", required=True, help="the BentoML home to learn into (created if missing)")
    parser.add_argument("--model-name", default="ctt-mix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=200)
    parser.add_argument("--max-words", type=int, default=45, help="cut each request text to this many words (0: whole)")
    args = parser.parse_args()
    built = build(Path(args.home).resolve(), args.model_name, args.seed, args.train_limit,
                  max_words=args.max_words or None)
    for task, precision in built["precisions"].items():
        print(f"{task}\t{precision}")
    print(f"{built['tag']}: {list(built['precisions'].values()).count('int8')} of {len(built['precisions'])} tasks "
          f"in int8; {len(built['requests'])} requests in {Path(args.home) / 'requests.jsonl'}")


if __name__ == "__main__":
    main()
