"""``ctt``: learn tasks, inspect versions, evaluate, predict, build the demo, render deployments."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from deploy.cli import add_deploy_parser
from model.errors import CTTError
from model.precision import FAST_PATH_Z, MAX_ACCURACY_LOSS, fast_path_verdicts
from training.settings import DEFAULT_MAX_LENGTH, SELECT_ON, learn_default
from training.demo import DEMO_TRAIN_LIMIT
from training.backup import DEFAULT_LIMITS

# Quiet third-party chatter before anything imports them; our own progress goes to stderr.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


def _fraction(value: str) -> float:
    return float(value)


PATH_MAX_BYTES = 4096  # Linux's PATH_MAX
NAME_MAX_BYTES = 255


def one_line(text: str) -> str:
    """``text`` with every control or invisible character escaped: one line, whatever it quotes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def path_arg(text: str) -> str:
    """A path an operator typed: refused when empty, too long, or with control, invisible or
    non-UTF-8 characters (which no command should ever write into a file name or a message)."""
    from model.tags import shown

    if not text:
        raise argparse.ArgumentTypeError("the path is empty")
    if not text.isprintable():
        raise argparse.ArgumentTypeError(f"the path {shown(text)} contains control, invisible or non-UTF-8 characters")
    encoded = text.encode()
    if len(encoded) > PATH_MAX_BYTES or any(len(part) > NAME_MAX_BYTES for part in encoded.split(b"/")):
        raise argparse.ArgumentTypeError(f"the path {shown(text)} is too long")
    return text


def check_task(name: str) -> str:
    """A task name, checked in full: model/ctt.py's pattern ends in '$', which lets a trailing
    newline through ``match``."""
    from model.ctt import TASK_NAME_PATTERN, check_task_name
    from model.tags import shown

    check_task_name(name)
    if not TASK_NAME_PATTERN.fullmatch(name):
        raise CTTError(f"invalid task name {shown(name)}: use 1-64 letters, digits, '.', '_' or '-', "
                       "starting with a letter or digit")
    return name


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``ctt: error: ...``) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"ctt: error: {one_line(message)} (see '{one_line(self.prog)} --help')\n")


def _print_json(document) -> None:
    print(json.dumps(document, indent=2, default=str))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _table(headers: list[str], rows: list[list], stream=None) -> None:
    stream = stream or sys.stdout  # looked up per call, so redirected output (tests, pipes) is honoured
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)), file=stream)
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)), file=stream)


# ----- commands ---------------------------------------------------------------------------
def precision_report(report) -> dict[str, dict]:
    """Tasks the service will serve in fp32 although int8 was measured, with the evidence."""
    record = {"accuracy": report.accuracy, "precision_accuracy": report.precision_accuracy,
              "precision_paired": report.precision_paired}
    return {name: verdict for name, verdict in fast_path_verdicts(record, "int8", list(report.accuracy)).items()
            if verdict["loss"] is not None and not verdict["kept"]}


def _refusal(name: str, verdict: dict) -> str:
    loss = f"{100 * verdict['loss']:.1f} points"
    if "fp32_only_right" in verdict:
        return (f"task {name!r} is worse in int8: {verdict['fp32_only_right']} examples only fp32 classifies right, "
                f"{verdict['fast_only_right']} only int8 ({loss}; a sign test at z > {FAST_PATH_Z:g}): "
                "the service serves it in fp32")
    return f"task {name!r} loses {loss} in int8 (more than {100 * MAX_ACCURACY_LOSS:.1f}): the service serves it in fp32"


def _check_backbone(spec: str | None) -> None:
    """Before the store is touched: a known backbone or an existing local folder."""
    from model.tags import shown

    from model.registry import KNOWN_BACKBONES

    if spec is not None and spec not in KNOWN_BACKBONES and not Path(spec).expanduser().is_dir():
        raise CTTError(f"--backbone {shown(spec)}: use minilm, micro or a local model folder (nothing is downloaded)")


def cmd_learn(args) -> int:
    from training.learn import LearnSettings, learn

    check_task(args.task)
    _check_backbone(args.backbone)

    settings = LearnSettings(
        epochs=args.epochs, learning_rate=args.lr, head_learning_rate=args.head_lr, warmup=args.warmup,
        vector_pull=args.vector_pull, batch_size=args.batch_size, seed=args.seed,
        patience=args.patience, select_on=args.select_on, holdout=args.holdout, max_forgetting=args.max_forgetting,
        min_accuracy=args.min_accuracy, backbone=args.backbone, max_length=args.max_length,
        stage=args.stage, progress=not args.quiet, wait=not args.no_wait,
        allow_relabel=args.allow_relabel, max_feedback_contradictions=args.max_feedback_contradictions,
        allow_contradictions=args.allow_contradictions,
        **({"owner": args.owner} if args.owner else {}),
    )
    feedback = None
    if args.feedback:
        from training.feedback import feedback_batch, open_from_environ

        database = open_from_environ()
        try:
            feedback = feedback_batch(database, args.task)
        finally:
            database.close()
    report = learn(args.task, args.train, args.eval, args.from_tag, settings, feedback=feedback)
    if args.json:
        _print_json(report.to_dict())
        return 0
    if report.replaced:
        print(f"replaced the existing task {report.task!r} (its old module is gone from this version)",
              file=sys.stderr)
    int8 = report.precision_accuracy.get("int8", {})
    calibration = report.calibration
    rows = [[name, report.accuracy[name], int8.get(name), report.learned_accuracy[name],
             report.probe_accuracy.get(name), report.forgetting.get(name),
             calibration.get(name, {}).get("ece_before"), calibration.get(name, {}).get("ece_after")]
            for name in report.tasks]
    _table(["task", "accuracy", "int8", "when learned", "probe", "forgetting", "ECE raw", "ECE calibrated"], rows,
           stream=sys.stderr)
    new = calibration.get(report.task, {})
    if new.get("method") == "temperature":
        fitted = (f"temperature {new['temperature']:.3f}" if new["temperature"] > 1 else
                  "temperature 1 (the held-out slice shows no overconfidence to correct)")
        same = " (the same examples: give --eval for an independent measure)" if new.get("ece_in_sample") else ""
        print(f"scores of {report.task!r} calibrated: {fitted}, fitted on {new['fitted_examples']} held-out "
              f"examples; ECE {new['ece_before']:.3f} → {new['ece_after']:.3f} on {new['ece_examples']} evaluation "
              f"examples{same}, where perfectly calibrated scores would show about {new['ece_floor']:.3f}",
              file=sys.stderr)
    uncalibrated = [name for name in report.tasks if calibration.get(name, {}).get("method") == "none"]
    if uncalibrated:
        print(f"uncalibrated (learned before calibrated scores existed; re-learn to calibrate): "
              f"{', '.join(uncalibrated)}", file=sys.stderr)
    for name, verdict in precision_report(report).items():
        print(_refusal(name, verdict), file=sys.stderr)
    if report.relearn_gate:
        from training.gate import describe_gate

        gate = report.relearn_gate
        verdict = ("clearly worse, registered with --allow-relabel" if gate["clearly_worse"]
                   else "not clearly worse than the parent's module")
        print(f"relearned task {report.task!r}: {describe_gate(gate)}: {verdict}", file=sys.stderr)
    if report.feedback:
        from training.learn import describe_feedback

        print(f"feedback: {describe_feedback(report.feedback)}", file=sys.stderr)
    print(f"mean accuracy {_fmt(report.mean_accuracy)}, BWT {_fmt(report.bwt)}; task module "
          f"{report.module_parameters} parameters ({report.module_bytes / 1024:.1f} KiB, "
          f"{100 * report.module_parameters / report.backbone_parameters:.3f} % of the backbone); "
          f"{report.seconds:.1f} s", file=sys.stderr)
    print(report.tag)
    return 0


def cmd_models(args) -> int:
    from model.store import delete_version, deletion_plan, list_versions, stages_of

    if getattr(args, "models_command", None) == "delete":
        plan = deletion_plan(args.tag, force=args.force)  # refused or mistyped: nothing is created
        if not args.yes:
            print(f"would delete {plan.line()}")
            print("nothing was deleted: run again with --yes to delete it", file=sys.stderr)
            return 0
        print(f"deleted {delete_version(args.tag, force=args.force).tag}")
        return 0
    versions = list_versions()
    if args.json:
        _print_json([{"tag": v.tag, "created": v.created, "parent": v.parent, "labels": v.labels,
                      "stages": stages_of(v.tag), "digest": v.digest,
                      "tasks": v.metadata.get("tasks", []), "new_task": v.metadata.get("new_task"),
                      "accuracy": v.metadata.get("accuracy", {}),
                      "mean_accuracy": v.metadata.get("mean_accuracy"), "bwt": v.metadata.get("bwt"),
                      "backbone": v.metadata.get("backbone"), "feedback": v.metadata.get("feedback"),
                      "path": str(v.path)} for v in versions])
        return 0
    if not versions:
        print("no versions in the model store yet: run 'ctt learn' or 'ctt demo'", file=sys.stderr)
        return 0
    _table(["tag", "created", "stages", "tasks", "mean acc", "BWT", "parent"],
           [[v.tag, v.created[:19], ",".join(stages_of(v.tag)) or "-", ",".join(v.metadata.get("tasks", [])),
             v.metadata.get("mean_accuracy"), v.metadata.get("bwt"), v.parent] for v in versions])
    return 0


def cmd_verify(args) -> int:
    from model.store import list_versions, repair_plan, repair_store, store_problems

    if args.tag is not None and args.all:
        raise CTTError("give a TAG or --all, not both")
    if args.yes and not args.repair:
        raise CTTError("--yes confirms --repair; give both")
    if args.repair and args.tag is not None:
        raise CTTError("--repair works on the whole store: leave out TAG")
    if args.repair and args.yes:
        for line in repair_store():
            print(f"repaired: {line}", file=sys.stderr)
    elif args.repair:
        plan = repair_plan()
        for line in plan.lines():
            print(f"would {line}", file=sys.stderr)
        print("nothing was changed: run again with --yes to repair" if plan else "repair: nothing to do",
              file=sys.stderr)
    problems = store_problems(args.tag, check_all=args.all)
    for problem in problems:
        print(problem)
    if problems:
        print(f"ctt: {len(problems)} problem(s) found", file=sys.stderr)
        return 1
    checked = 1 if args.tag is not None else len(list_versions()) if args.all else min(1, len(list_versions()))
    print(f"ok: {checked} version(s) verified, no leftovers", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from training.backup import check_destination, export_versions, select_versions

    check_destination(args.out)  # before any work: a mistyped --out costs nothing
    versions = select_versions(args.tags, args.range, args.all)
    path, digest = export_versions(versions, args.out)
    for version in versions:
        print(f"exported {version.tag}", file=sys.stderr)
    print(f"{digest}  {path}")
    return 0


def cmd_import(args) -> int:
    from training.backup import ImportLimits, check_sha256, import_backup, parse_size

    check_sha256(args.sha256)
    allowed = []
    for folder in args.allow_backbone or []:
        if not Path(folder).is_dir():
            raise CTTError(f"--allow-backbone {folder}: not a folder")  # path_arg made it printable
        allowed.append(str(Path(folder).resolve()))
    if args.max_members is not None and args.max_members < 1:
        raise CTTError(f"--max-members {args.max_members}: must be at least 1")
    limits = ImportLimits(
        max_bytes=parse_size(args.max_bytes, "--max-bytes") if args.max_bytes is not None else DEFAULT_LIMITS.max_bytes,
        max_members=args.max_members if args.max_members is not None else DEFAULT_LIMITS.max_members,
        max_member_bytes=(parse_size(args.max_member_bytes, "--max-member-bytes") if args.max_member_bytes is not None
                          else DEFAULT_LIMITS.max_member_bytes),
        allowed_backbones=tuple(allowed))
    for tag, outcome in import_backup(args.source, args.sha256, limits):
        print(f"{outcome}: {tag}")
    return 0


def cmd_stage(args) -> int:
    from model.store import STAGES, check_stage, read_stages, rollback_stage, set_stage, stage_version

    approver = os.environ.get("USER")  # recorded in the stage history
    if args.stage is not None:
        check_stage(args.stage)
    if args.stage_command == "set":
        version = set_stage(args.tag, args.stage, by=approver)
        print(f"{args.stage}: {version.tag}")
    elif args.stage_command == "rollback":
        version = rollback_stage(args.stage, by=approver)
        print(f"{args.stage}: {version.tag}")
    elif args.stage:  # show one stage: its tag alone on stdout, for scripts (make bento STAGE=...)
        print(stage_version(args.stage).tag)
    else:
        stages = read_stages()
        for stage in STAGES:
            stack = stages.get("stages", {}).get(stage, [])
            print(f"{stage}\t{stack[-1]['tag'] if stack else '-'}")
        for entry in stages.get("history", []):
            print(f"  {entry['at'][:19]}  {entry['stage']} {entry['action']} {entry['tag']} by {entry['by']}",
                  file=sys.stderr)
    return 0


def cmd_evaluate(args) -> int:
    from model.store import get_version
    from training.data import label_set, read_labelled
    from training.evaluate import accuracy

    check_task(args.task)
    examples = read_labelled(args.data)
    version = get_version(args.model, "--model")
    model = version.load()
    known = model.task(args.task).labels
    unknown = sorted(set(label_set(examples)) - set(known))
    if unknown:
        raise CTTError(f"{args.data}: labels {unknown} are not labels of task {args.task!r} ({known})")
    score = accuracy(model, args.task, examples, progress=not args.json)
    if args.json:
        _print_json({"tag": version.tag, "task": args.task, "examples": len(examples), "accuracy": score})
    else:
        print(f"{version.tag}  task {args.task}: accuracy {score:.4f} on {len(examples)} examples")
    return 0


def cmd_predict(args) -> int:
    from model.store import get_version

    check_task(args.task)
    if not args.text.strip():
        raise CTTError("--text is empty")
    version = get_version(args.model, "--model")
    prediction = version.load().predict([args.text], [args.task])[0]
    if args.json:
        _print_json({"tag": version.tag, **prediction.__dict__})
    else:
        print(f"{prediction.label}\t{prediction.score:.4f}")
    return 0


def cmd_demo(args) -> int:
    from model.store import has_versions, list_versions
    from training.demo import build_demo_model

    if args.if_missing and has_versions():
        print(f"model store already has {list_versions()[0].tag}; not rebuilding the demo", file=sys.stderr)
        return 0
    reports = build_demo_model(args.backbone, args.train_limit, progress=not args.quiet)
    for report in reports:
        print(f"{report.tag}  {report.task}: accuracy {report.accuracy[report.task]:.4f} "
              f"(probe {report.probe_accuracy[report.task]:.4f})", file=sys.stderr)
    print(reports[-1].tag)
    return 0


def cmd_feedback(args) -> int:
    from training.feedback import export_feedback, open_from_environ, parse_since

    # Options are checked before the database is opened: a typo costs nothing.
    since = parse_since(args.since) if getattr(args, "since", None) else None
    if args.feedback_command == "prune":
        return _prune(args)
    database = open_from_environ()
    try:
        if args.feedback_command == "export":
            done = export_feedback(database, args.task, Path(args.out), since)
            print(f"{done['examples']} example(s) of task {args.task!r} from {done['rows']} row(s) "
                  f"(newest label per text, up to id {done['up_to_id']}) in {database.public_url}", file=sys.stderr)
            print(done["out"])
        elif args.feedback_command == "stats":
            from model.serving.feedback import stats_document
            from model.feedback.counts import GRANULARITY, window_start

            document = stats_document(database.stats(since), version="-", version_accuracy={},
                                      since=window_start(since) if since else None,
                                      granularity_s=GRANULARITY.total_seconds())
            if args.json:
                _print_json(document)
                return 0
            rows = [[t["task"], v["version"] or "-", source, s["rows"], s["with_prediction"], s["agreement"],
                     v["first"], v["last"]]
                    for t in document["tasks"] for v in t["versions"] for source, s in v["sources"].items()]
            if since:
                print(f"since {document['since']} (windows start on a whole hour)", file=sys.stderr)
            _table(["task", "version", "source", "rows", "with prediction", "agreement", "first", "last"], rows)
        elif args.feedback_command == "credentials":
            return _feedback_credentials(database, args)
        elif args.feedback_command == "purge":
            return _feedback_purge(database, args)
        elif args.feedback_command == "recount":
            print(f"recounted {database.recount()} bucket(s) of feedback stats from the rows in {database.public_url}")
        elif args.feedback_command == "migrate":
            print(f"{database.public_url} at migration {database.migrate()}")
    finally:
        database.close()
    return 0


def _prune(args) -> int:
    """``ctt feedback prune``: shows the cutoff its age means and how many rows that is; deletes
    them only with --yes, and with --force as well when the cutoff is less than a day ago."""
    from datetime import timedelta

    from model.feedback.ages import describe_age
    from model.feedback.database import utc_now
    from training.feedback import default_retention, open_from_environ, parse_age

    older_than = args.older_than if args.older_than is not None else default_retention()
    age = parse_age(older_than)
    cutoff = utc_now() - age
    recent = age < timedelta(days=1)
    if args.yes and recent and not args.force:
        raise CTTError(f"--older-than {older_than} ({describe_age(age)}) means rows stored before "
                       f"{cutoff:%Y-%m-%d %H:%M:%S} UTC, less than a day ago: add --force to delete rows that recent "
                       "('m' is minutes; write 90d for about three months)")
    database = open_from_environ()
    try:
        what = (f"row(s) older than {older_than} ({describe_age(age)}: stored before "
                f"{cutoff:%Y-%m-%d %H:%M:%S} UTC) from {database.public_url}")
        if not args.yes:
            print(f"would delete {database.count_before(cutoff)} {what}")
            print("nothing was deleted: run again with --yes to delete them"
                  + (" (and --force: that is less than a day ago)" if recent else ""), file=sys.stderr)
            return 0
        deleted = database.prune_before(cutoff)
        from model.store import record

        record("feedback-prune", database=database.public_url, older_than=older_than,
               cutoff=f"{cutoff:%Y-%m-%dT%H:%M:%S}Z", rows=deleted)
        print(f"deleted {deleted} {what}")
    finally:
        database.close()
    return 0


def _feedback_credentials(database, args) -> int:
    """``ctt feedback credentials``: who sent feedback, per task and source (rows, first, last)."""
    from training.feedback import UNRECORDED

    rows = database.credentials(_credential(args.credential)) if args.credential is not None else database.credentials()
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print(f"no feedback {'from ' + repr(args.credential) + ' ' if args.credential else ''}"
              f"in {database.public_url}", file=sys.stderr)
        return 0
    _table(["credential", "task", "source", "rows", "first", "last"],
           [[row["principal"] or UNRECORDED, row["task"], row["source"], row["rows"],
             row["first"].isoformat(timespec="seconds") + "Z", row["last"].isoformat(timespec="seconds") + "Z"]
            for row in rows])
    return 0


def _credential(listed: str) -> str | None:
    """A credential as ``ctt feedback credentials`` lists it: ``(unrecorded)`` is the rows stored
    before credentials were recorded."""
    from training.feedback import UNRECORDED

    return None if listed == UNRECORDED else listed


def _feedback_purge(database, args) -> int:
    """``ctt feedback purge --credential ID``: shows what a revoked credential's rows are; deletes
    them only with --yes."""
    rows = database.credentials(_credential(args.credential))
    total = sum(row["rows"] for row in rows)
    what = f"{total} row(s) sent by credential {args.credential!r} from {database.public_url}"
    detail = ", ".join(f"{row['rows']} {row['source']} of task {row['task']!r}" for row in rows)
    if rows:
        first = min(row["first"] for row in rows).isoformat(timespec="seconds")
        last = max(row["last"] for row in rows).isoformat(timespec="seconds")
        detail += f"; stored {first}Z to {last}Z"
    if not args.yes:
        print(f"would delete {what}" + (f": {detail}" if rows else ""))
        print("nothing was deleted: run again with --yes to delete them" if rows else "nothing to delete",
              file=sys.stderr)
        return 0
    deleted = database.purge(_credential(args.credential))
    from model.store import record

    record("feedback-purge", database=database.public_url, credential=args.credential, rows=deleted)
    print(f"deleted {deleted} row(s) sent by credential {args.credential!r} from {database.public_url}")
    return 0


def cmd_data(args) -> int:
    from training.demo import DERIVED_TASKS, export_tasks

    names = tuple(args.tasks or DERIVED_TASKS)
    for name, (train, test) in export_tasks(Path(args.out), names, args.train_limit, args.test_limit).items():
        print(f"{name}\t{train}\t{test}")
    return 0


# ----- parser -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ctt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("learn", help="learn a task on top of the latest version and register a new one")
    p.add_argument("--task", required=True, help="task name (re-using a name replaces that task)")
    p.add_argument("--train", required=True, type=path_arg, help="labelled JSONL or CSV file (text, label)")
    p.add_argument("--eval", type=path_arg,
                   help="labelled evaluation file (default: a stratified held-out slice of --train)")
    p.add_argument("--from", dest="from_tag", help="start from this version instead of the latest")
    # Every default comes from LearnSettings (training/settings.py), defined once there.
    p.add_argument("--epochs", type=int, default=learn_default("epochs"), help="at most this many epochs")
    p.add_argument("--lr", type=float, default=learn_default("learning_rate"),
                   help="peak learning rate of the scaling vectors")
    p.add_argument("--head-lr", type=float, default=learn_default("head_learning_rate"),
                   help="peak learning rate of the head (it starts at the probe)")
    p.add_argument("--warmup", type=_fraction, default=learn_default("warmup"),
                   help="share of the steps with a linear warm-up (then cosine decay)")
    p.add_argument("--vector-pull", type=float, default=learn_default("vector_pull"),
                   help="weight of the pull of the scaling vectors towards one")
    p.add_argument("--batch-size", type=int, default=learn_default("batch_size"))
    p.add_argument("--seed", type=int, default=learn_default("seed"))
    p.add_argument("--patience", type=int, default=learn_default("patience"),
                   help="with a held-out --select-on: epochs without improvement before stopping")
    p.add_argument("--select-on", choices=list(SELECT_ON), default=learn_default("select_on"),
                   help="which module to keep: the last epoch unless significantly worse than the probe on "
                        "the held-out slice (last), or the best epoch by a held-out measure, with early "
                        "stopping (the probe is epoch 0)")
    p.add_argument("--holdout", type=_fraction, default=learn_default("holdout"),
                   help="share of --train held out to check the module (and, without --eval, to measure it)")
    p.add_argument("--max-forgetting", type=_fraction, default=learn_default("max_forgetting"),
                   help="refuse to register if an old task's accuracy drops by more than this")
    p.add_argument("--min-accuracy", type=_fraction, default=learn_default("min_accuracy"),
                   help="refuse to register if the new task scores below this")
    p.add_argument("--backbone", help="for a first version: 'minilm' (default), 'micro', or a model folder")
    p.add_argument("--max-length", type=int, default=learn_default("max_length"),
                   help=f"tokens read per text, fixed for the whole lineage (default: the lineage's; "
                        f"{DEFAULT_MAX_LENGTH} for a first version); a value other than the lineage's is refused")
    p.add_argument("--stage", default="development", help="stage label on the version")
    p.add_argument("--owner", help="owner label on the version (default: $USER)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    p.add_argument("--no-wait", action="store_true",
                   help="fail at once when another ctt command is changing the store (default: wait)")
    p.add_argument("--feedback", "--with-feedback", dest="feedback", action="store_true",
                   help="also train on the task's stored production feedback (DATABASE_URL or the SQLite file "
                        "under CTT_DATA_DIR; newest label per text; evaluation texts never train); the version "
                        "records which rows, from which sources and credentials")
    p.add_argument("--max-feedback-contradictions", type=_fraction,
                   default=learn_default("max_feedback_contradictions"),
                   help="refuse when more than this share of the feedback gives a text another label than the "
                        "training file or an evaluation set")
    p.add_argument("--allow-contradictions", action="store_true",
                   help="learn from feedback even above --max-feedback-contradictions (recorded in the version)")
    p.add_argument("--allow-relabel", action="store_true",
                   help="register a relearned task even when it is clearly worse than the parent's module on the "
                        "same evaluation examples: a deliberate relabelling (recorded in the version)")
    p.set_defaults(run=cmd_learn)

    p = sub.add_parser("models", help="list versions, newest first (or 'ctt models delete TAG')")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_models)
    models_sub = p.add_subparsers(dest="models_command", metavar="[delete]")
    d = models_sub.add_parser("delete", help="delete a version (refused while a stage or a child uses it); "
                                             "shows what it would delete, and deletes only with --yes")
    d.add_argument("tag", help="the version, exactly: NAME:VERSION or VERSION")
    d.add_argument("--force", action="store_true",
                   help="delete even a referenced, damaged or not registered version")
    d.add_argument("--yes", action="store_true", help="delete it (without: only show what would be deleted)")
    d.set_defaults(run=cmd_models, json=False)

    p = sub.add_parser("verify", help="check versions against their recorded digests without loading them")
    p.add_argument("tag", nargs="?", help="one version (default: the newest, plus store-wide checks)")
    p.add_argument("--all", action="store_true", help="every version")
    p.add_argument("--repair", action="store_true",
                   help="show how to repair the store: remove leftovers of interrupted runs (or put back a "
                        "complete version one left), forget versions removed around ctt, point 'latest' at the "
                        "newest version; with --yes, do it")
    p.add_argument("--yes", action="store_true", help="with --repair: repair (without: only show what it would do)")
    p.set_defaults(run=cmd_verify)

    p = sub.add_parser("export", help="back up versions with their lineage to a .tar file or a folder")
    p.add_argument("tags", nargs="*", metavar="TAG", help="versions to export")
    p.add_argument("--range", help="OLDER..NEWER: NEWER and its ancestors back to OLDER")
    p.add_argument("--all", action="store_true", help="every version")
    p.add_argument("--out", required=True, type=path_arg, help="a new .tar file, or a new or empty folder")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("import", help="restore versions from a backup made by 'ctt export'")
    p.add_argument("source", type=path_arg, help="the backup's .tar file or folder")
    p.add_argument("--sha256", help="refuse the backup unless its digest (printed by export) is this")
    p.add_argument("--max-bytes", help=f"most bytes the import may unpack in all, every archive decompressed "
                                       f"(default {DEFAULT_LIMITS.max_bytes >> 20}MiB)")
    p.add_argument("--max-member-bytes", help=f"most bytes of one file in the backup or in a version "
                                              f"(default {DEFAULT_LIMITS.max_member_bytes >> 20}MiB)")
    p.add_argument("--max-members", type=int, help=f"most files in all (default {DEFAULT_LIMITS.max_members})")
    p.add_argument("--allow-backbone", action="append", type=path_arg, metavar="FOLDER",
                   help="accept versions whose backbone is this local model folder (repeatable); versions "
                        "naming any other backbone than minilm or micro are refused")
    p.set_defaults(run=cmd_import)

    p = sub.add_parser("stage", help="approve versions for staging/production, roll back, show")
    stage_sub = p.add_subparsers(dest="stage_command", metavar="set|rollback|show", required=True)
    s_ = stage_sub.add_parser("set", help="approve TAG for STAGE")
    s_.add_argument("tag")
    s_.add_argument("stage", help="staging or production")
    s_ = stage_sub.add_parser("rollback", help="return STAGE to the version approved before")
    s_.add_argument("stage", help="staging or production")
    s_ = stage_sub.add_parser("show", help="the approved version of STAGE (or every stage and the history)")
    s_.add_argument("stage", nargs="?")
    p.set_defaults(run=cmd_stage)

    p = sub.add_parser("evaluate", help="accuracy of one task on a labelled file")
    p.add_argument("--task", required=True)
    p.add_argument("--data", required=True, type=path_arg)
    p.add_argument("--model", help="version tag (default: latest)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("predict", help="label and score for one text")
    p.add_argument("--task", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--model", help="version tag (default: latest)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_predict)

    p = sub.add_parser("demo", help="build the default demo model from the BBC News corpus")
    p.add_argument("--if-missing", action="store_true", help="do nothing when the store has a version")
    p.add_argument("--backbone", help="backbone for the demo (default: minilm)")
    p.add_argument("--train-limit", type=int, default=DEMO_TRAIN_LIMIT, help="training examples per task")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("data", help="export the BBC-derived labelled files (train/test JSONL)")
    p.add_argument("--out", required=True, help="folder to write into")
    p.add_argument("--tasks", nargs="*", help="which derived tasks (default: all)")
    p.add_argument("--train-limit", type=int, default=1000)
    p.add_argument("--test-limit", type=int, default=400)
    p.set_defaults(run=cmd_data)

    p = sub.add_parser("feedback", help="production feedback: export for learning, prune, live accuracy")
    feedback_sub = p.add_subparsers(dest="feedback_command", required=True,
                                    metavar="export|prune|stats|credentials|purge|recount|migrate")
    f = feedback_sub.add_parser("export", help="a task's feedback as a labelled JSONL file (newest label per text)")
    f.add_argument("--task", required=True)
    f.add_argument("--since", help="only rows stored since: an ISO date/time (UTC) or an age such as 7d")
    f.add_argument("--out", required=True, help="the .jsonl file to write")
    f = feedback_sub.add_parser("prune", help="delete rows older than an age (they hold users' text); shows what "
                                               "it would delete, and deletes only with --yes")
    f.add_argument("--older-than", help="an age: 90d, 12h, 30m (minutes), 2w, a bare number is days "
                                        "(default: CTT_FEEDBACK_RETENTION_DAYS); shown back as the time it means")
    f.add_argument("--yes", action="store_true", help="delete them (without: only show how many and from when)")
    f.add_argument("--force", action="store_true", help="with --yes: allow a cutoff less than a day ago")
    f = feedback_sub.add_parser("stats", help="rows and agreement with served predictions, per task and source")
    f.add_argument("--since", help="only rows stored since: an ISO date/time (UTC) or an age such as 7d")
    f.add_argument("--json", action="store_true")
    feedback_sub.add_parser("migrate", help="bring the database schema up to date (the service also does this)")
    f = feedback_sub.add_parser("credentials", help="who sent feedback: rows per credential, task and source")
    f.add_argument("--credential", help="only this credential's rows (its id, e.g. key:web-frontend)")
    f.add_argument("--json", action="store_true")
    f = feedback_sub.add_parser("purge", help="delete every row a (revoked) credential sent; shows them first, "
                                              "deletes only with --yes")
    f.add_argument("--credential", required=True, help="the credential's id, as 'ctt feedback credentials' lists it "
                                                        "('(unrecorded)': rows stored before credentials were)")
    f.add_argument("--yes", action="store_true", help="delete them (without: only show what would be deleted)")
    feedback_sub.add_parser("recount", help="rebuild the stats' counts from the rows (after rows were changed "
                                            "outside ctt, or written by a release before migration 0002)")
    p.set_defaults(run=cmd_feedback)

    add_deploy_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    try:
        return args.run(args)
    except CTTError as exc:
        print(f"ctt: error: {one_line(str(exc))}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except OSError as exc:  # the machine, not the input: a full disk, a permission, a vanished file
        where = f" ({one_line(str(exc.filename))})" if exc.filename else ""
        print(f"ctt: error: {one_line(exc.strerror or str(exc))}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        # The store says which: an interrupt after a version's commit point carries its tag.
        print(f"ctt: {exc.args[0] if exc.args else 'interrupted; nothing was registered'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
