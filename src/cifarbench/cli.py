"""The command line: parses flags, calls the Python API, prints. No logic lives here that the API lacks."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from cifarbench.config import DATASETS
from cifarbench.errors import CifarbenchError, as_flag, flag_of
from cifarbench.exploring import SPLITS
from cifarbench.options import RunOption, run_options
from cifarbench.reporting.tables import printable
from cifarbench.runs.limits import BundleLimits
from cifarbench.sandbox import ISOLATIONS, Limits, choose_isolation


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # a prefix must not pass for a flag: `--seed 2` is not `--seeds 2`
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # a bad flag is a user error: one line, status 1
        self.exit(1, f"cifarbench: error: {message} (see {self.prog} --help)\n")


def _add_option(p: argparse.ArgumentParser, option: RunOption) -> None:
    """One run option as a flag, from the table (cifarbench.options): its flag, type, choices and help."""
    kwargs: dict[str, Any] = {"dest": option.keyword, "help": option.option.help}
    if option.hint is bool:
        kwargs.update(action="store_false" if option.negated else "store_true", default=None)
    else:
        kwargs.update(default=option.option.default, metavar=option.option.metavar)
        if option.keyword == "set":
            kwargs.update(action="append", default=[])
        elif option.hint in (int, float):
            kwargs["type"] = option.hint
        if option.check.choices is not None and option.check.pattern is None:
            kwargs["choices"] = option.check.choices
        elif option.hint is int and None not in (option.check.ge, option.check.le) and \
                option.check.le - option.check.ge < 4:  # a few levels (--tta): --help lists them
            kwargs["choices"] = range(int(option.check.ge), int(option.check.le) + 1)
    p.add_argument(option.flag, **kwargs)


_DATA_OPTIONS = ("data_dir", "verify", "download")
"""The run options that say where the data is read from: commands that load stored runs take them too."""


def _data_flags(p: argparse.ArgumentParser) -> None:
    for option in run_options():
        if option.keyword in _DATA_OPTIONS:
            _add_option(p, option)


def _run_flags(p: argparse.ArgumentParser, *, train: bool = False) -> None:
    """Every run option (cifarbench.options: the same table as the Python API's keywords), and the CLI's own."""
    for option in run_options():
        if option.keyword not in _DATA_OPTIONS and (train or not option.option.train_only):
            _add_option(p, option)
    p.add_argument("--tensorboard", metavar="DIR", help="also log every epoch to TensorBoard in DIR (needs "
                                                        "tensorboard)")
    p.add_argument("--runs-dir", help="run history folder (default: $CIFARBENCH_HOME, then ./runs)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _data_flags(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cifarbench", description="Train, compare and understand image classifiers on CIFAR-10.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_data_commands, _training_commands, _history_commands, _inspection_commands, _classroom_commands):
        add(sub)
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The parsed flags; an unknown flag is refused by its own command's parser, with the closest flag it has."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = parser
        while (subs := next((a for a in command._actions if isinstance(a, argparse._SubParsersAction)), None)) \
                and getattr(args, subs.dest, None) in subs.choices:
            command = subs.choices[getattr(args, subs.dest)]
        flags = [o for a in command._actions for o in a.option_strings]
        given = next((e.split("=")[0] for e in extra if e.startswith("-")), "")
        close = difflib.get_close_matches(given, flags, n=1) if given else []
        command.error(f"unrecognized arguments: {' '.join(extra)}" + (f"; did you mean {close[0]}?" if close else ""))
    return args


def _data_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="fetch and verify the official CIFAR-10 archive")
    p.add_argument("--data-dir", help="destination folder (default: $CIFARBENCH_DATA, then ./data)")
    p.add_argument("--url", help="mirror URL (https only; still verified against the official md5; default: "
                                 "$CIFARBENCH_MIRROR, then the official URL)")

    p = sub.add_parser("explore", help="per-class image grids and class counts")
    p.add_argument("--per-class", type=int, default=10, help="images per class (default 10)")
    p.add_argument("--out", default="grid.png", help="PNG to write (default grid.png)")
    p.add_argument("--split", choices=SPLITS, default="train")
    p.add_argument("--seed", type=int, default=0, help="which random examples to show")
    p.add_argument("--dataset", choices=DATASETS, default="cifar10")
    p.add_argument("--json", action="store_true")
    _data_flags(p)

    sub.add_parser("models", help="list registered models and recipes")


def _training_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one model and record the run")
    p.add_argument("model", nargs="?", help=f"{MODEL_HELP} (omit with --resume)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted or crashed run from its last checkpoint")
    _trust_flag(p)
    _run_flags(p, train=True)

    p = sub.add_parser("compare", help="train several models over seeds and compare them (the main job)")
    p.add_argument("models", nargs="+", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--seeds", type=int, default=1, help="seeds per model (0..N-1); mean ± std over them")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs in parallel worker processes, each with its share of the cores or its own GPU")
    p.add_argument("--plot", help="learning-curve PNG (default: RUNS_DIR/compare-TIMESTAMP.png)")
    p.add_argument("--target", type=float, metavar="FRACTION",
                   help="also report the epoch and training second each seed first reached this test accuracy (e.g. "
                        "0.9)")
    p.add_argument("--report", metavar="HTML", help="also write a self-contained HTML report there")
    p.add_argument("--retrain", action="store_true",
                   help="train every run anew (default: reuse finished runs of this runs folder with the same config, "
                        "code, seed and data)")
    _executor_flags(p)
    _run_flags(p)
    _tune_command(sub)


def _tune_command(sub: argparse._SubParsersAction) -> None:
    """`tune MODEL --param NAME=SPEC ...`: Optuna's search, scored on the validation split (tuning.py)."""
    p = sub.add_parser("tune", help="search config fields with Optuna, each trial scored on a validation split; the "
                                    "best scored on the test set once (needs the [tune] extra)")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--param", action="append", default=[], metavar="NAME=SPEC", required=True,
                   help="a config field and its range: log:LOW:HIGH, float:LOW:HIGH, int:LOW:HIGH or choice:A,B,... "
                        "e.g. --param optimizer.lr=log:1e-3:3e-1 --param optimizer.name=choice:sgd,adamw (repeatable)")
    p.add_argument("--trials", type=int, default=10,
                   help="trials to run now (more resume the study; 0: report it; default 10)")
    p.add_argument("--study", metavar="NAME", help="the study's name: RUNS_DIR/studies/NAME.db (default tune-MODEL)")
    p.add_argument("--seed", type=int, default=0, help="every trial's seed, and the sampler's (default 0)")
    p.add_argument("--jobs", type=int, default=1, help="with --executor ray: trials running at once (default 1)")
    p.add_argument("--report", metavar="HTML", help="also write the study's HTML report there")
    _executor_flags(p)
    _run_flags(p)


def _executor_flags(p: argparse.ArgumentParser) -> None:
    """Where the runs go: this machine's worker processes, or a Ray cluster (docs/distributed.md#ray)."""
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: this machine's worker processes (default); ray: one Ray task per run, on the "
                        "cluster at --address or a local Ray (needs the [ray] extra)")
    p.add_argument("--address", metavar="ADDR",
                   help="with --executor ray: the Ray cluster's head, e.g. 10.0.0.1:6379 (default: start a local Ray)")


def _history_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="the run history: list (the default), show, compare, rm")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--runs-dir")
    p.add_argument("--json", action="store_true")
    _runs_actions(p)


def _inspection_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run or checkpoint on the whole test set")
    p.add_argument("ref", metavar="RUN_ID_OR_CHECKPOINT")
    p.add_argument("--device", default="auto")
    p.add_argument("--runs-dir")
    p.add_argument("--json", action="store_true")
    _trust_flag(p)
    _data_flags(p)

    p = sub.add_parser("report", help="one self-contained HTML report of stored runs")
    p.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    p.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    p.add_argument("--target", type=float, metavar="FRACTION", help="time-to-accuracy target, e.g. 0.9")
    p.add_argument("--device", default="auto")
    p.add_argument("--runs-dir")
    p.add_argument("--json", action="store_true")
    _trust_flag(p)
    _data_flags(p)

    p = sub.add_parser("explain", help="draw what stored runs learnt: FNN templates, conv filters, feature maps, "
                                       "saliency")
    p.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs (one subfolder per run)")
    p.add_argument("--examples", type=int, default=4, help="right and wrong test predictions in the saliency maps "
                                                           "(default 4 each)")
    _stored_flags(p)

    p = sub.add_parser("experiment", help="controlled experiments: translation, corruption, permuted pixels")
    kinds = p.add_subparsers(dest="experiment", required=True, parser_class=_Parser)
    q = kinds.add_parser("translation", help="accuracy of stored runs on test images shifted by 0..K pixels, and "
                                             "mirrored")
    q.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    q.add_argument("--shifts", type=int, default=4, metavar="K", help="largest shift in pixels (default 4)")
    q.add_argument("--fill", choices=["reflect", "zero"], default="reflect", help="what fills the uncovered border "
                                                                                  "(default reflect)")
    q.add_argument("--no-flip", dest="flip", action="store_false", help="leave out the mirrored images")
    q.add_argument("--out", metavar="DIR", help="also write DIR/translation.png")
    _stored_flags(q)
    q = kinds.add_parser("corruption", help="accuracy of stored runs under CIFAR-10-C style noise, blur, contrast, "
                                            "JPEG")
    q.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    q.add_argument("--severities", default="1,3,5", help="severity levels 1-5, comma-separated (default 1,3,5)")
    q.add_argument("--kinds", help="corruptions, comma-separated (default: gaussian_noise,gaussian_blur,contrast,jpeg)")
    q.add_argument("--seed", type=int, default=0, help="seeds the noise (default 0)")
    q.add_argument("--out", metavar="DIR", help="also write DIR/corruption.png")
    _stored_flags(q)
    q = kinds.add_parser("permutation", help="train models on plain and on pixel-permuted images over seeds and "
                                             "compare")
    q.add_argument("models", nargs="+", metavar="MODEL", help=MODEL_HELP)
    q.add_argument("--seeds", type=int, default=3, help="seeds per model and condition (0..N-1; default 3)")
    q.add_argument("--permutation-seed", type=int, default=0, help="seed of the fixed pixel permutation (default 0)")
    q.add_argument("--no-reuse", dest="reuse", action="store_false",
                   help="train every run again instead of reusing stored runs with the same config and data")
    _run_flags(q)

    p = sub.add_parser("predict", help="classify PNG/JPEG files with a trained model, or score them against labels")
    p.add_argument("ref", metavar="CHECKPOINT_OR_RUN")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG files, or folders of them")
    p.add_argument("--top", type=int, default=3, help="classes to show per image (default 3)")
    p.add_argument("--labels", metavar="FILE",
                   help="score the images against this file of filename,label rows, comma- or tab-separated "
                        "(label: class name or index): "
                        "accuracy, per-class accuracy, confusion matrix")
    p.add_argument("--device", default="auto")
    p.add_argument("--runs-dir")
    p.add_argument("--json", action="store_true")
    _trust_flag(p)


def _classroom_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="student: write one of your runs as a submission archive for the teacher")
    p.add_argument("run_id", metavar="RUN_ID", nargs="?", help="the run to submit (default: your newest completed run)")
    p.add_argument("--student", required=True, help="your name (letters, digits, spaces and -_.)")
    p.add_argument("--out", required=True, metavar="FOLDER",
                   help="folder to write STUDENT-RUN_ID.tar.gz into (e.g. the class inbox)")
    p.add_argument("--runs-dir")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("grade", help="teacher: re-score every submission in a folder and write the leaderboard")
    p.add_argument("inbox", metavar="INBOX", help="folder of submission archives (*.tar.gz)")
    p.add_argument("--hidden", metavar="FOLDER", help="also score every run on these labelled images (PNG/JPEG)")
    p.add_argument("--hidden-labels", metavar="FILE",
                   help="their labels, rows filename,label (default: FOLDER/labels.csv)")
    p.add_argument("--out", metavar="FOLDER", help="where leaderboard.html and leaderboard.csv go (default: INBOX)")
    p.add_argument("--work-dir", metavar="FOLDER",
                   help="where submissions are unpacked, one runs folder each (default: INBOX/.grading, emptied first)")
    p.add_argument("--dataset", choices=DATASETS, default="cifar10")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.add_argument("--trust-code", action="store_true",
                   help="run the students' own model code, each submission in a sandboxed process (docs/classroom.md)")
    p.add_argument("--roster", metavar="FILE", help="the expected students, one name per line: others are flagged, "
                                                    "and names with no submission listed")
    p.add_argument(flag_of("limits.timeout"), dest="timeout", type=float, default=Limits.timeout, metavar="SECONDS",
                   help=f"with --trust-code: wall-clock limit per submission (default {Limits.timeout:g})")
    p.add_argument(flag_of("limits.memory_mib"), dest="memory", type=int, default=Limits.memory_mib, metavar="MIB",
                   help=f"with --trust-code: memory limit per submission in MiB (default {Limits.memory_mib})")
    p.add_argument("--isolation", choices=ISOLATIONS, default="auto",
                   help="with --trust-code: bubblewrap (no network, read-only, private folders hidden), process "
                        "(limits only), or auto: bubblewrap where it works (default)")
    _executor_flags(p)
    _bundle_flags(p)
    _data_flags(p)


def _bundle_flags(p: argparse.ArgumentParser) -> None:
    """Caps on what one archive from elsewhere may cost (runs/bundle.BundleLimits)."""
    p.add_argument(flag_of("bundle_limits.max_bytes"), dest="max_bundle_mib", type=int,
                   default=BundleLimits.max_bytes >> 20, metavar="MIB",
                   help=f"refuse an archive whose files inflate beyond this (default {BundleLimits.max_bytes >> 20})")
    p.add_argument(flag_of("bundle_limits.max_members"), dest="max_bundle_members", type=int,
                   default=BundleLimits.max_members, metavar="N",
                   help=f"refuse an archive of more members (default {BundleLimits.max_members})")
    p.add_argument(flag_of("bundle_limits.max_runs"), dest="max_bundle_runs", type=int,
                   default=BundleLimits.max_runs, metavar="N",
                   help=f"refuse an archive of more runs (default {BundleLimits.max_runs})")


def _bundle_limits(args: argparse.Namespace) -> BundleLimits:
    # The CLI counts MiB where BundleLimits counts bytes, so this check is the CLI's own.
    if args.max_bundle_mib < 1 or args.max_bundle_mib > 1 << 20:
        raise CifarbenchError(f"{flag_of('bundle_limits.max_bytes')} {args.max_bundle_mib}: must be in [1, {1 << 20}]")
    for field, value in (("max_members", args.max_bundle_members), ("max_runs", args.max_bundle_runs)):
        if value < 1:
            raise CifarbenchError(f"{flag_of('bundle_limits.' + field)} {value}: must be at least 1")
    return BundleLimits(args.max_bundle_mib << 20, args.max_bundle_members, args.max_bundle_runs)


MODEL_HELP = "a registered model (`cifarbench models`), or your own: path/to/file.py:Name or package.module:Name"


def _stored_flags(p: argparse.ArgumentParser) -> None:
    """Flags of commands that load stored runs and their test set."""
    p.add_argument("--device", default="auto")
    p.add_argument("--runs-dir")
    p.add_argument("--json", action="store_true")
    _trust_flag(p)
    _data_flags(p)


def _trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-code", action="store_true",
                   help="run model code that came with a run from elsewhere (read its model.py first)")


def _runs_actions(runs: argparse.ArgumentParser) -> None:
    """`runs [list|show|compare|rm|export|import]`: no action lists, so `cifarbench runs --json` keeps working."""
    actions = runs.add_subparsers(dest="runs_action", parser_class=_Parser,
                                  metavar="{list,show,compare,rm,export,import}")

    def common(q: argparse.ArgumentParser) -> None:
        # SUPPRESS: a flag given before the action (`runs --json show ID`) must not be reset by the action's default.
        q.add_argument("--runs-dir", default=argparse.SUPPRESS)
        q.add_argument("--json", action="store_true", default=argparse.SUPPRESS)

    q = actions.add_parser("list", help="runs, newest first (the default)")
    q.add_argument("--limit", type=int, default=argparse.SUPPRESS)
    common(q)
    q = actions.add_parser("show", help="one run: config, data set, per-epoch metrics")
    q.add_argument("run_id", metavar="RUN_ID")
    common(q)
    q = actions.add_parser("compare", help="table of stored runs (no retraining)")
    q.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    q.add_argument("--target", type=float, metavar="FRACTION", help="time-to-accuracy target, e.g. 0.9")
    q.add_argument("--mcnemar", action="store_true",
                   help="also score each run's checkpoint on the test set for McNemar's test (implied by --data-dir)")
    q.add_argument("--device", default="auto")
    _trust_flag(q)
    _data_flags(q)
    common(q)
    q = actions.add_parser("rm", help="delete runs: their history rows and run folders")
    q.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    common(q)
    q = actions.add_parser("export", help="write runs (checkpoint, config, metrics, history, model code) to one file")
    q.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    q.add_argument("--out", required=True, help="the archive to write, e.g. runs.tar.gz")
    common(q)
    q = actions.add_parser("import", help="bring the runs of an exported archive into this runs folder")
    q.add_argument("archive", metavar="FILE")
    _bundle_flags(q)
    common(q)


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _note_unverified(dataset: dict) -> None:
    if not dataset.get("verified"):
        print(f"note: the data in {printable(dataset['source'])} does not match the official "
              f"{dataset.get('name', 'cifar10')} checksums; accepted "
              "because of --no-verify and recorded as unverified", file=sys.stderr)


def _config(args: argparse.Namespace, model: str, seed: int):
    """The config `cb.run_config` gives for these flags: each run option's flag is the keyword of the same name."""
    from cifarbench.api import run_config

    given = {o.keyword: getattr(args, o.keyword, None) for o in run_options() if o.keyword != "seed"}
    for option in run_options():
        if option.parse and given.get(option.keyword) is not None:  # the CLI's text: --widths 64,256,256
            given[option.keyword] = option.parse(given[option.keyword])
    return run_config(model, seed=seed, **given)


def _epoch_printer(args: argparse.Namespace):
    from cifarbench.progress import EpochPrinter

    return EpochPrinter(sys.stderr if args.json else sys.stdout)


def _run_printer(args: argparse.Namespace):
    """One line per finished run (parallel workers cannot stream their epochs here)."""
    out = sys.stderr if args.json else sys.stdout

    def show(run) -> None:
        print(f"{printable(run.model)} seed {run.seed}: test acc {100 * run.test_accuracy:.2f}%  "
              f"{run.train_seconds:.1f} s training", file=out, flush=True)

    return show


def cmd_download(args: argparse.Namespace) -> None:
    from cifarbench.data import cifar10

    root = cifar10.ensure_cifar10(args.data_dir, download=True, url=args.url)  # None: $CIFARBENCH_MIRROR, else official
    print(f"CIFAR-10 is in {root.resolve()}")


def cmd_explore(args: argparse.Namespace) -> None:
    from cifarbench.exploring import explore
    from cifarbench.reporting.tables import format_table

    overview = explore(dataset=args.dataset, data_dir=args.data_dir, verify=args.verify is not False,
                       download=args.download is not False, per_class=args.per_class, split=args.split,
                       seed=args.seed, out=args.out)
    counts, classes = overview.counts, overview.classes
    if args.json:
        _print_json({"grid": str(args.out), "classes": classes, "counts": counts, "dataset": overview.info})
        return
    _note_unverified(overview.info)
    rows = [(c, counts["train"][i], counts["test"][i]) for i, c in enumerate(classes)]
    rows.append(("total", sum(counts["train"]), sum(counts["test"])))
    print(format_table(["class", "train", "test"], rows))
    print(f"\nwrote {args.out} ({args.per_class} {args.split} images per class)")


def cmd_models(args: argparse.Namespace) -> None:
    from cifarbench.models import count_parameters, create_model, get_model_spec, list_models
    from cifarbench.reporting.tables import format_table
    from cifarbench.training.recipes import list_recipes

    specs = [get_model_spec(n) for n in list_models()]
    rows = [(m.name, f"{count_parameters(create_model(m.name)):,}", m.default_recipe, m.description) for m in specs]
    print(format_table(["model", "params", "default recipe", "description"], rows))
    print(f"\nrecipes: {', '.join(list_recipes())}")


def cmd_train(args: argparse.Namespace) -> None:
    from cifarbench import runtime
    from cifarbench.running import train_run

    if args.resume:
        result = _resume(args)
    else:
        if not args.model:
            raise CifarbenchError("name a model to train (`cifarbench models` lists them), or --resume RUN_ID")
        config = _config(args, args.model, 0 if args.seed is None else args.seed)
        show = _with_tensorboard(args, _epoch_printer(args))
        result = train_run(config, runs_dir=args.runs_dir, on_epoch=lambda m: show(config, m),
                           started=runtime.process_started(), spelling=as_flag)
    if not result.run_id:
        return  # a non-zero torchrun rank: rank 0 reports for everyone
    if args.json:
        _print_json(result.to_dict())
        return
    _note_unverified(result.dataset)
    print(f"run {printable(result.run_id)}: test accuracy {100 * result.test_accuracy:.2f}%, test loss "
          f"{result.test_loss:.4f}, {result.train_seconds:.1f} s training on {printable(result.device)} "
          f"({result.train_flops / 1e12:.1f} TFLOP)")
    print(f"saved in {printable(result.run_dir)}")


def _resume(args: argparse.Namespace):
    from cifarbench.running import resumable_config, train_run

    # A resumed run keeps these from its own config: changing them would no longer continue the same run.
    given = [o.flag for o in run_options() if o.option.fixed_on_resume and getattr(args, o.keyword, None) not in
             (None, False, [])]
    if given:
        raise CifarbenchError(f"--resume continues a run under its own config; {', '.join(given)} cannot change it "
                              "(start a new run instead)")
    config = resumable_config(args.resume, args.runs_dir, args.trust_code)
    if args.model and args.model != config.model:
        raise CifarbenchError(f"run {args.resume} trains {config.model!r}, not {args.model!r}")
    data = config.data.for_loading(foreign=False, data_dir=args.data_dir, verify=args.verify, download=args.download)
    show = _with_tensorboard(args, _epoch_printer(args))
    return train_run(runs_dir=args.runs_dir, on_epoch=lambda m: show(config, m), resume=args.resume, data=data,
                     trust_code=args.trust_code, spelling=as_flag)


def cmd_eval(args: argparse.Namespace) -> None:
    from cifarbench.inference import evaluate_checkpoint
    from cifarbench.reporting.tables import evaluation_table

    result = evaluate_checkpoint(args.ref, runs_dir=args.runs_dir, data_dir=args.data_dir, verify=args.verify,
                                 download=args.download, device=args.device, trust_code=args.trust_code).to_dict()
    if args.json:
        _print_json(result)
        return
    print(f"{printable(result['model'])} ({printable(result['checkpoint'])}): test accuracy "
          f"{100 * result['test_accuracy']:.2f}%, "
          f"test loss {result['test_loss']:.4f} over {result['n']} images\n")
    print(evaluation_table(result))
    if not result["dataset_matches_training"]:
        print("\nnote: this test set is not the one the model was trained with (different fingerprint)")


def cmd_compare(args: argparse.Namespace) -> None:
    from cifarbench.api import write_comparison
    from cifarbench.comparing import compare
    from cifarbench.reporting.tables import comparison_table, wall_times

    started, reused_ids = time.perf_counter(), []

    def reused(run) -> None:
        reused_ids.append(run.run_id)
        print(f"reusing run {printable(run.run_id)} ({printable(run.model)}, seed {run.seed}): finished with the same "
              "config and data (--retrain trains it again)", file=sys.stderr, flush=True)

    report = compare(args.models, lambda m, s: _config(args, m, s), seeds=args.seeds, runs_dir=args.runs_dir,
                     on_epoch=_with_tensorboard(args, _epoch_printer(args)), target=args.target, jobs=args.jobs,
                     on_run=_run_printer(args) if args.jobs > 1 or args.executor == "ray" else None,
                     retrain=args.retrain, on_reuse=reused, spelling=as_flag, executor=args.executor,
                     address=args.address)
    write_comparison(report, plot=args.plot, report=args.report, runs_dir=args.runs_dir, device=args.device)
    for failure in report.failures:
        print(f"cifarbench: warning: {printable(failure['model'])} seed {failure['seed']} failed: "
              f"{printable(failure['error'])}",
              file=sys.stderr)
    if args.json:
        _print_json(report.to_dict())
        return
    _note_unverified(report.dataset)
    print(comparison_table(report.results))
    _print_pairs(report)
    print(f"\nlearning curves: {report.plot_file}")
    if report.report:
        print(f"report: {report.report}")
    print(printable(wall_times(report.runs, time.perf_counter() - started, reused_ids)))


def _print_pairs(comparison, hint: str = "") -> None:
    """The pairwise table (difference with its interval, McNemar) under a comparison, and its warnings."""
    from cifarbench.reporting.tables import PAIRWISE_HEADERS, format_table, pairwise_rows

    if comparison.pairs:
        print("\n" + format_table(PAIRWISE_HEADERS, pairwise_rows(comparison.pairs)))
        if hint:
            print(hint)
    for warning in comparison.warnings:
        print(f"warning: {printable(warning)}")


def cmd_explain(args: argparse.Namespace) -> None:
    from cifarbench.explaining import explain_runs

    result = explain_runs(args.run_ids, args.out, runs_dir=args.runs_dir, data_dir=args.data_dir, verify=args.verify,
                          download=args.download, device=args.device, examples=args.examples,
                          trust_code=args.trust_code)
    if args.json:
        _print_json(result.to_dict())
        return
    for run in result.runs:
        print(f"{printable(run.label)} seed {run.seed} ({printable(run.run_id)}): plain-view test accuracy "
              f"{100 * run.accuracy:.2f}%; " + ", ".join(printable(f) for f in run.files))
    for note in result.notes:
        print(f"note: {printable(note)}")
    print(f"wrote {len(result.files)} figures in {printable(result.out)}")


def _integers(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CifarbenchError(f"{flag} {text!r}: expected comma-separated integers such as 1,3,5") from None


def cmd_experiment(args: argparse.Namespace) -> None:
    from cifarbench.reporting.tables import experiment_table, format_table

    if args.experiment == "permutation":
        _experiment_permutation(args)
        return
    from cifarbench.explaining import run_experiment

    settings = ({"shifts": args.shifts, "fill": args.fill, "flip": args.flip} if args.experiment == "translation" else
                {"severities": _integers(args.severities, "--severities"), "seed": args.seed,
                 **({"kinds": [k.strip() for k in args.kinds.split(",") if k.strip()]} if args.kinds else {})})
    out = sys.stderr if args.json else sys.stdout

    def show(run, result) -> None:
        print(f"{printable(run.model)} seed {run.seed}: {args.experiment} done ({printable(run.run_id)})", file=out,
              flush=True)

    report = run_experiment(args.experiment, args.run_ids, out=args.out, runs_dir=args.runs_dir,
                            data_dir=args.data_dir, verify=args.verify, download=args.download, device=args.device,
                            trust_code=args.trust_code, on_run=show, **settings)
    if args.json:
        _print_json(report.to_dict())
        return
    print(format_table(*experiment_table(report.models, report.rows)))
    figure = f"; figure: {printable(report.figure)}" if report.figure else ""
    print(f"\nstored in each run's experiments.json{figure}")


def _experiment_permutation(args: argparse.Namespace) -> None:
    from cifarbench.explaining import permutation_experiment
    from cifarbench.reporting.tables import (
        PAIRWISE_HEADERS,
        PERMUTATION_HEADERS,
        format_table,
        pairwise_rows,
        permutation_rows,
    )
    from cifarbench.runs.records import permutation_of

    out = sys.stderr if args.json else sys.stdout
    report = permutation_experiment(
        args.models, lambda m, s: _config(args, m, s), seeds=args.seeds, permutation_seed=args.permutation_seed,
        reuse=args.reuse, runs_dir=args.runs_dir, on_epoch=_epoch_printer(args),
        on_reuse=lambda r: print(f"reusing stored run {printable(r.run_id)} ({printable(r.model)} seed {r.seed}"
                                 f"{', permuted pixels' if permutation_of(r) is not None else ''})", file=out,
                                 flush=True), spelling=as_flag)
    if args.json:
        _print_json(report.to_dict())
        return
    print(format_table(PERMUTATION_HEADERS, permutation_rows(report.rows)))
    for heading, pairs in (("plain pixels", report.plain_pairs), ("permuted pixels", report.permuted_pairs)):
        if pairs:
            print(f"\n{heading}:\n" + format_table(PAIRWISE_HEADERS, pairwise_rows(pairs)))
    for warning in report.warnings:
        print(f"warning: {printable(warning)}")


def cmd_runs(args: argparse.Namespace) -> None:
    action = getattr(args, "runs_action", None) or "list"
    if action != "list":
        {"show": _runs_show, "compare": _runs_compare, "rm": _runs_rm, "export": _runs_export,
         "import": _runs_import}[action](args)
        return
    from cifarbench.reporting.tables import runs_table
    from cifarbench.runs.store import RunStore

    with RunStore(args.runs_dir, read_only=True) as store:
        runs = [RunStore.to_record(row) for row in store.list_runs(args.limit)]
    if args.json:
        _print_json({"runs": [r.to_dict() for r in runs]})
    elif runs:
        print(runs_table(runs))
    else:
        print(f"no runs yet in {store.path}")


def _runs_show(args: argparse.Namespace) -> None:
    from cifarbench.reporting.tables import budget_lines, estimate_line, history_table
    from cifarbench.runs.catalog import stored_runs

    (run,) = stored_runs([args.run_id], runs_dir=args.runs_dir)
    if args.json:
        _print_json(run.to_dict())
        return
    acc = "-" if run.test_accuracy is None else f"{100 * run.test_accuracy:.2f}%"
    env = run.environment
    print(f"run {printable(run.run_id)}: {printable(run.status)}, {printable(run.model)} / {printable(run.recipe)} / "
          f"seed {run.seed}, test accuracy "
          f"{acc}, on {printable(run.device)}, code {printable(env.get('code_version'))}, torch "
          f"{printable(env.get('torch_version'))}")
    print(f"folder: {run.run_dir}")
    if run.error:
        print(f"error: {printable(run.error)}")
    data = run.dataset
    print(f"dataset: {printable(data.get('name'))} sha256 {data.get('sha256')} "
          f"({'official' if data.get('verified') else 'unverified'}"
          f" copy in {printable(data.get('source'))}, {data.get('train_size')} train / {data.get('test_size')} test)")
    if run.budget is not None:
        print(budget_lines(run.budget))
    if run.estimate is not None:
        print(estimate_line(run.estimate, run.wall_seconds))
    print(f"config: {json.dumps(run.config, indent=2)}\n")
    print(history_table([h.to_dict() for h in run.history]) if run.history else "no finished epochs")


def _runs_compare(args: argparse.Namespace) -> None:
    from cifarbench.comparing import compare_runs
    from cifarbench.reporting.tables import comparison_table, format_table, percent, time_to_target_cell

    result = compare_runs(args.run_ids, runs_dir=args.runs_dir, target=args.target, mcnemar=args.mcnemar,
                          data_dir=args.data_dir, verify=args.verify, download=args.download, device=args.device,
                          trust_code=args.trust_code)
    if args.json:
        _print_json(result.to_dict())
        return
    print(comparison_table(result.results))
    _print_pairs(result, "" if args.mcnemar or args.data_dir else "McNemar's test needs each run's test predictions: "
                 "add --mcnemar (or --data-dir DIR)")
    print()
    with_target = args.target is not None
    rows = [(r.run_id, r.model, r.recipe, r.seed, r.status, percent(r.test_accuracy),
             "-" if r.train_seconds is None else f"{r.train_seconds:.1f}",
             *((time_to_target_cell(r.time_to_target(args.target)),) if with_target else ())) for r in result.runs]
    print(format_table(["run", "model", "recipe", "seed", "status", "test acc", "train s",
                        *((f"time to {100 * args.target:g}%",) if with_target else ())], rows))


def _runs_rm(args: argparse.Namespace) -> None:
    from cifarbench.runs.catalog import delete_run

    removed = []
    for ref in args.run_ids:
        result = delete_run(ref, runs_dir=args.runs_dir)
        removed.append(result.to_dict())
        if not args.json:
            print(f"removed run {printable(result.run_id)} (folder {printable(result.run_dir)}: "
                  f"{printable(result.folder)})")
    if args.json:
        _print_json({"removed": removed})


def _runs_export(args: argparse.Namespace) -> None:
    from cifarbench.runs.bundle import export_runs

    path = export_runs(args.run_ids, args.out, runs_dir=args.runs_dir)
    if args.json:
        _print_json({"archive": str(path), "runs": args.run_ids})
    else:
        print(f"wrote {path} ({len(args.run_ids)} runs)")


def _runs_import(args: argparse.Namespace) -> None:
    from cifarbench.runs.bundle import import_runs

    result = import_runs(args.archive, runs_dir=args.runs_dir, limits=_bundle_limits(args))
    if args.json:
        _print_json({**result.to_dict(), "with_code": [r.run_id for r in result.with_code]})
        return
    for record in result.imported:
        code = ": carries its own model code (model.py)" if record in result.with_code else ""
        print(f"imported run {printable(record.run_id)} ({printable(record.model)}, seed {record.seed}){code}")
    for run_id, why in result.skipped:
        print(f"skipped run {printable(run_id)}: {printable(why)}")
    if result.with_code:
        print(f"note: {len(result.with_code)} imported run(s) carry model code; it runs only with --trust-code (read "
              "each model.py first)")


def cmd_report(args: argparse.Namespace) -> None:
    from cifarbench.api import report_runs

    result = report_runs(args.run_ids, args.out, runs_dir=args.runs_dir, target=args.target, data_dir=args.data_dir,
                         verify=args.verify, download=args.download, device=args.device, trust_code=args.trust_code)
    if args.json:
        _print_json(result.to_dict())
    else:
        print(f"wrote {result.report} ({len(result.runs)} runs)")


def cmd_predict(args: argparse.Namespace) -> None:
    from cifarbench.inference import predict_images, score_images
    from cifarbench.reporting.tables import evaluation_table

    if args.labels:
        scored = score_images(args.ref, args.images, args.labels, runs_dir=args.runs_dir, device=args.device,
                              trust_code=args.trust_code)
        _warn(scored.warnings)
        if args.json:
            _print_json(scored.to_dict())
            return
        wrong = [i for i in scored.to_dict()["images"] if not i["correct"]]
        print(f"{printable(scored.model)} ({printable(scored.checkpoint)}): accuracy {100 * scored.accuracy:.2f}% "
              f"({scored.result.n - len(wrong)} of {scored.result.n} images)\n")
        print(evaluation_table(scored.to_dict()))
        for i in wrong[:20]:
            print(f"wrong: {printable(i['image'])}: {printable(i['label'])}, predicted {printable(i['predicted'])}")
        if len(wrong) > 20:
            print(f"... and {len(wrong) - 20} more (--json lists every image)")
        return
    result = predict_images(args.ref, args.images, top=args.top, runs_dir=args.runs_dir, device=args.device,
                            trust_code=args.trust_code)
    _warn(result["warnings"])
    if args.json:
        _print_json(result)
        return
    for p in result["predictions"]:
        print(f"{printable(p['image'])}: "
              + ", ".join(f"{printable(t['class'])} {100 * t['probability']:.1f}%" for t in p["top"]))


def _warn(warnings: Sequence[str]) -> None:
    """Warnings about a result, on stderr: stdout stays one line per image (or the JSON, which lists them too)."""
    for warning in warnings:
        print(f"warning: {printable(warning)}", file=sys.stderr, flush=True)


def cmd_submit(args: argparse.Namespace) -> None:
    from cifarbench.classroom import submit

    result = submit(args.run_id, student=args.student, out=args.out, runs_dir=args.runs_dir)
    if args.json:
        _print_json(result.to_dict())
        return
    acc = "-" if result.test_accuracy is None else f"{100 * result.test_accuracy:.2f}%"
    print(f"wrote {printable(result.archive)} ({printable(result.student)}: run {printable(result.run_id)}, "
          f"{printable(result.model)}, test accuracy {acc})")


def cmd_tune(args: argparse.Namespace) -> None:
    from cifarbench.api import write_study
    from cifarbench.tuning import parse_param, tune

    def show(trial) -> None:
        value = "-" if trial.value is None else f"{100 * trial.value:.2f}%"
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        extra = f" ({trial.error})" if trial.error else ""
        print(f"trial {trial.number}: {trial.state}, validation {value} after {trial.epochs} epochs, run "
              f"{printable(trial.run_id or '-')}: {printable(params)}{printable(extra)}", file=sys.stderr, flush=True)

    params = [parse_param(p) for p in args.param]
    result = tune(_config(args, args.model, args.seed), params, trials=args.trials, study=args.study,
                  executor=args.executor, address=args.address, jobs=args.jobs, seed=args.seed,
                  runs_dir=args.runs_dir, on_trial=show, spelling=as_flag)
    if args.report:
        write_study(result, args.report, runs_dir=args.runs_dir)
    if args.json:
        _print_json(result.to_dict())
        return
    done = sum(t.state == "complete" for t in result.trials)
    pruned = sum(t.state == "pruned" for t in result.trials)
    print(f"study {result.study} ({result.storage}): {len(result.trials)} trials, {done} complete, {pruned} pruned")
    if result.best is None:
        print("no trial completed: nothing to score on the test set")
        return
    best = result.best
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
    print(f"best trial {best.number} (run {printable(best.run_id or '-')}): validation accuracy "
          f"{100 * best.value:.2f}% with {printable(params)}")
    when = "scored now, once" if result.tested_now else "scored when it first became the best; not scored again"
    print(f"its test accuracy: {100 * result.test_accuracy:.2f}% (the test set's only use: {when})")
    if result.importances:
        print("importances: " + ", ".join(f"{k} {v:.2f}" for k, v in result.importances.items()))
    if result.report:
        print(f"report: {printable(result.report)}")


def cmd_grade(args: argparse.Namespace) -> None:
    from cifarbench.api import grade
    from cifarbench.reporting.leaderboard import leaderboard_text

    def show(run) -> None:
        verdict = (f"re-scored {100 * run.rescored_accuracy:.2f}%" if run.graded
                   else f"not graded: {run.error}")
        print(f"{printable(run.archive)}: {printable(verdict)}", file=sys.stderr, flush=True)

    limits = Limits(args.timeout, args.memory)
    if args.trust_code:
        print(f"isolation: {choose_isolation(args.isolation).describe()}", file=sys.stderr, flush=True)
    result = grade(args.inbox, trust_code=args.trust_code, data_dir=args.data_dir, verify=args.verify,
                   download=args.download, dataset=args.dataset, hidden=args.hidden, hidden_labels=args.hidden_labels,
                   out=args.out, work_dir=args.work_dir, device=args.device, on_run=show, roster=args.roster,
                   isolation=args.isolation, limits=limits, bundle_limits=_bundle_limits(args), spelling=as_flag,
                   executor=args.executor, address=args.address)
    if args.json:
        _print_json(result.to_dict())
        return
    _note_unverified(result.dataset)
    print(leaderboard_text(result))
    if result.missing:
        print(f"\non the roster, no submission: {', '.join(printable(n) for n in result.missing)}")
    print(f"\nwrote {printable(result.html)} and {printable(result.csv)}")


def _with_tensorboard(args: argparse.Namespace, show):
    """The epoch printer, plus TensorBoard logging when --tensorboard DIR was given."""
    if not getattr(args, "tensorboard", None):
        return show
    from cifarbench.reporting.tensorboard import TensorBoardLogger

    log = TensorBoardLogger(args.tensorboard)

    def both(config, metrics) -> None:
        show(config, metrics)
        log(config, metrics)

    return both


COMMANDS = {"download": cmd_download, "explore": cmd_explore, "models": cmd_models, "train": cmd_train,
            "eval": cmd_eval, "compare": cmd_compare, "runs": cmd_runs, "report": cmd_report, "predict": cmd_predict,
            "submit": cmd_submit, "grade": cmd_grade, "tune": cmd_tune, "explain": cmd_explain,
            "experiment": cmd_experiment}


def main(argv: Sequence[str] | None = None) -> int:
    from cifarbench import runtime

    runtime.configure()
    previous = _stop_on_sigterm()
    try:
        args = _parse(argv)
        COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader that left early (`| head`) is found here, not at interpreter exit
    except BrokenPipeError:
        # The reader stopped reading (`cifarbench runs show RUN | head`): stop quietly, as Python's docs advise,
        # with status 1 since the output was cut; stdout goes to devnull so the final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except CifarbenchError as exc:
        print(f"cifarbench: error: {printable(exc.spelled(as_flag))}", file=sys.stderr)  # flags, not keywords
        return 1
    except KeyboardInterrupt as exc:
        from cifarbench.errors import Interrupted

        if isinstance(exc, Interrupted):
            print(f"cifarbench: {printable(exc.message)}", file=sys.stderr)
            return 143 if exc.signal_name == "SIGTERM" else 130
        print("cifarbench: interrupted" + (" by SIGTERM" if exc.args == ("SIGTERM",) else ""), file=sys.stderr)
        return 143 if exc.args == ("SIGTERM",) else 130
    except OSError as exc:  # disk full, permission denied: the user's environment, not a bug
        where = f": {exc.filename}" if exc.filename else ""
        print(f"cifarbench: error: {printable(f'{exc.strerror or exc}{where}')}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _stop_on_sigterm():
    """SIGTERM (`timeout`, a shutdown) stops like a Ctrl-C: the run records why and how to resume, instead of
    dying mid-write and being found 'crashed'. Returns the handler it replaced (None off the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame) -> None:
        raise KeyboardInterrupt("SIGTERM")

    return signal.signal(signal.SIGTERM, stop)


if __name__ == "__main__":
    sys.exit(main())
