"""How many tokens to read per text: probe accuracy and speed at several max_length values (not a test).

    python benchmarks/max_length.py

For tasks with long texts (whole BBC articles) and short ones (tweets), it embeds the training and
test texts with the frozen backbone at each length, fits the probe, and times the forward pass
(serving) and a forward+backward pass of the task vectors (training). Writes
benchmarks/results/continual-max-length.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import isolated_bentoml_home, machine, print_table, save  # noqa: E402

isolated_bentoml_home()

import torch  # noqa: E402

from model.backbone import load_backbone  # noqa: E402
from model.ctt import ContinualTinyTransformer, TaskModule  # noqa: E402
from model.registry import ModelConfig  # noqa: E402
from training.corpora import make_tasks  # noqa: E402
from training.data import label_set  # noqa: E402
from training.probe import fit_probe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["bbc-topic", "bbc-hard-soft", "tweet-sentiment"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 128, 256])
    parser.add_argument("--train-limit", type=int, default=400)
    parser.add_argument("--test-limit", type=int, default=300)
    args = parser.parse_args()

    backbone = load_backbone("minilm")
    tasks = make_tasks(tuple(args.tasks), args.train_limit, args.test_limit)
    rows, results = [], []
    for name, (train, test) in tasks.items():
        labels = label_set(train)
        index = {label: i for i, label in enumerate(labels)}
        y_train = torch.tensor([index[e.label] for e in train])
        y_test = torch.tensor([index[e.label] for e in test])
        lengths = [len(ids) for ids in backbone.tokenizer([e.text for e in test])["input_ids"]]
        for max_length in args.lengths:
            model = ContinualTinyTransformer(backbone, ModelConfig(max_length=max_length))
            started = time.perf_counter()
            test_features = model.embed([e.text for e in test])
            serve = len(test) / (time.perf_counter() - started)
            probe = fit_probe(model.embed([e.text for e in train]), y_train, len(labels))
            accuracy = probe.accuracy(test_features, y_test)
            module = TaskModule.for_backbone(backbone, len(labels))
            texts = [e.text for e in train[:64]]
            started = time.perf_counter()
            for i in range(0, len(texts), 16):
                model.forward_module(**model.tokenize(texts[i:i + 16]), module=module).sum().backward()
            train_speed = len(texts) / (time.perf_counter() - started)
            over = sum(n > max_length for n in lengths) / len(lengths)
            results.append({"task": name, "max_length": max_length, "probe_accuracy": accuracy,
                            "texts_cut": over, "serve_per_s": serve, "train_per_s": train_speed})
            rows.append([name, max_length, f"{over:.0%}", f"{accuracy:.3f}", f"{serve:.0f}", f"{train_speed:.1f}"])
            print(rows[-1], flush=True)
    print_table(["task", "max_length", "texts cut", "probe accuracy", "embed texts/s", "train texts/s"], rows)
    save("continual-max-length", {"machine": machine(), "results": results, "settings": vars(args)})


if __name__ == "__main__":
    main()
