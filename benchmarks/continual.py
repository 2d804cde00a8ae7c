"""Five BBC-derived tasks learned in a row with `ctt learn`, as a user would (not a test).

    python benchmarks/continual.py            (about 5 minutes on 2 cores)

Prints the accuracy matrix with the logistic-regression probe as the reference line, mean accuracy
and BWT after each step; writes benchmarks/results/continual.json and the last version's
accuracy-matrix PNG (benchmarks/results/continual.png).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS, isolated_bentoml_home, machine, print_table, save  # noqa: E402

isolated_bentoml_home()

from training.demo import DERIVED_TASKS, export_tasks  # noqa: E402

CTT = str(Path(sys.executable).parent / "ctt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-limit", type=int, default=1000)
    args = parser.parse_args()

    reports = []
    with tempfile.TemporaryDirectory() as folder:
        files = export_tasks(Path(folder), tuple(DERIVED_TASKS), train_limit=args.train_limit)
        for step, (task, (train, test)) in enumerate(files.items(), start=1):
            print(f"[{step}/{len(files)}] ctt learn --task {task}", file=sys.stderr, flush=True)
            result = subprocess.run([CTT, "learn", "--task", task, "--train", str(train), "--eval", str(test), "--json"],
                                    stdout=subprocess.PIPE, text=True)
            if result.returncode != 0:
                sys.exit(f"ctt learn failed for {task}")
            reports.append(json.loads(result.stdout))

    last = reports[-1]
    tasks = last["tasks"]
    rows = [[f"after {r['task']}", *(r["accuracy"].get(t, "") for t in tasks), r["mean_accuracy"],
             "-" if r["bwt"] is None else r["bwt"]] for r in reports]
    rows.append(["probe (reference)", *(last["probe_accuracy"][t] for t in tasks), "", ""])
    print()
    print_table(["", *tasks, "mean", "BWT"], rows)
    beats = {t: last["accuracy"][t] >= last["probe_accuracy"][t] for t in tasks}
    print(f"\nversions: {' -> '.join(r['tag'] for r in reports)}")
    print(f"BWT after the last task: {last['bwt']}; every task at least the probe: {all(beats.values())} {beats}")
    save("continual", {"machine": machine(), "reports": reports, "at_least_probe": beats})
    from model.store import get_version

    shutil.copy(get_version(last["tag"]).path / "accuracy_matrix.png", RESULTS / "continual.png")
    print(f"wrote {RESULTS / 'continual.json'} and {RESULTS / 'continual.png'}")


if __name__ == "__main__":
    main()
