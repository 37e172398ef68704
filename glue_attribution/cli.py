"""The command line shared by the scripts: the flags, the checkpoint (or a results folder) as the source of the
configuration, logging, and the scripts' edge (`run`), where the library's errors become one line and an exit status.

Light on purpose (the standard library, numpy and the task table): every script parses its arguments before
importing torch, so `--help` and argument errors answer at once.
"""

import argparse
import errno
import logging
import os
import signal
import socket
import sys
import warnings

from . import pipeline, progress, results
from .checkpoints import CHECKPOINT_META, checkpoints
from .config import DATA_DEFAULTS, RECIPE_DEFAULTS
from .errors import GlueError, Terminated

logger = logging.getLogger(__name__)


def run(main, *args):
    """The scripts' edge: runs `main(*args)` and ends every way a run can fail for reasons outside the code in one
    line on stderr: a `GlueError` (exit 2), Ctrl-C (130), SIGTERM (143), a full disk (1). Resuming needs nothing
    more: results are published only once complete, and a rerun of the same command reuses what is finished."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return main(*args)
    except GlueError as err:
        _exit(f"error: {err}", 2)
    except KeyboardInterrupt:
        _exit(f"interrupted during {progress.current()['name']}; rerun the same command to resume from there", 130)
    except Terminated:
        _exit(f"terminated (SIGTERM) during {progress.current()['name']}; rerun the same command to resume from "
              "there", 143)
    except Exception as err:
        if not disk_full(err):
            raise
        _exit(f"error: {disk_full_message(err)}", 1)


def _terminate(signum, frame):
    raise Terminated


def _exit(line: str, status: int) -> None:
    """The final line is the last: the logs that libraries write on their way out (torch's FakeTensor cache stats,
    at exit) are silenced first."""
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    print(line, file=sys.stderr)
    sys.exit(status)


def disk_full(err: BaseException) -> bool:
    """ENOSPC, as an OSError or as a library's own error that wraps it (safetensors: "No space left on device (os
    error 28)"), anywhere in the chain of causes."""
    while err is not None:
        if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_message(err: BaseException) -> str:
    """Where the disk is full (the file's folder, else the stage's), how much is free there, and what to do."""
    where = progress.current()
    folder = os.path.dirname(err.filename) if isinstance(err, OSError) and err.filename else where["folder"]
    place = f" in {folder} ({results.free_bytes(folder) / 1e6:.0f} MB free)" if folder else ""
    return (f"no space left on device{place} during {where['name']}; free some space (or choose another "
            "--output_dir / --checkpoint_dir), then rerun the same command: finished work is kept")


def positive_int(value: str) -> int:
    """argparse type for sizes and counts: a batch of 0 or -1 examples is a typo, caught before any work."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{value}'") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {number}")
    return number


def fraction(value: str) -> float:
    """argparse type for a fraction of the training set, in [0, 1)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got '{value}'") from None
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {number}")
    return number


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default once: the one its help states, else argparse's, and none where there is nothing to
    show (None, off, or a default the help explains)."""

    def _get_help_string(self, action):
        if "(default" in (action.help or "") or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


# The groups of every script's --help, in this order (a group without flags is not shown).
DATA, TRAINING, ANALYSIS, OUTPUT = "data and model", "training", "analysis", "output and running"


def parser(description: str | None = None, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser that shows every default in --help, once, and its flags in the groups above."""
    made = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, **kwargs)
    for title in (DATA, TRAINING, ANALYSIS, OUTPUT):
        made.add_argument_group(title)
    return made


def group(parser, title: str):
    """The parser's argument group `title` (made on first use), so shared and own flags land together."""
    for found in parser._action_groups:
        if found.title == title:
            return found
    return parser.add_argument_group(title)


# ----------------------------------------------------------------------------------------------------------------------
# Flags shared by the scripts. The data and recipe flags default to the checkpoint's values (`from_checkpoint`).


def add_data_args(parser, dataset_name: str = "sst2", checkpoint: bool = False) -> None:
    """Data and model flags (names as in HF's run_glue). With `checkpoint`, their defaults come from the
    checkpoint that --checkpoint_dir names, so they are given once, to train.py. `dataset_name` SUPPRESS: a
    results folder names the task (evaluate_lds.py --lds_dir)."""
    default = "the checkpoint's, else " if checkpoint else ""
    data, output = group(parser, DATA), group(parser, OUTPUT)
    data.add_argument("--dataset_name", default=dataset_name,
                      help=f"A GLUE task ({', '.join(pipeline.GLUE_TASKS)}), or the name of your own data "
                           "(--train_file)."
                           + (" (default: --lds_dir's, else rte)" if dataset_name == argparse.SUPPRESS else ""))
    data.add_argument("--data_dir", default=argparse.SUPPRESS,
                      help=f"A folder in the GLUE layout (<data_dir>/RTE/train.tsv) (default: {default}the Hugging "
                           "Face hub)")
    data.add_argument("--train_file", default=argparse.SUPPRESS,
                      help=f"Your own training data instead of GLUE: a .csv, .tsv or .json(l) file with run_glue's "
                           f"columns (sentence1 and sentence2, or sentence; label) (default: {default}none)")
    data.add_argument("--validation_file", default=argparse.SUPPRESS,
                      help=f"With --train_file: the validation examples (the queries) (default: {default}none)")
    data.add_argument("--text_columns", nargs="+", default=argparse.SUPPRESS,
                      help=f"With --train_file: the text column(s), one or a pair (default: {default}sentence1 "
                           "sentence2, else sentence)")
    data.add_argument("--model_name_or_path", default=argparse.SUPPRESS,
                      help=f"Hub name or local directory; '{pipeline.PACKAGED_MODEL}' is the packaged offline "
                           f"MiniLM (default: {default}bert-base-cased)")
    data.add_argument("--max_seq_length", type=positive_int, default=argparse.SUPPRESS,
                      help=f"Truncate sequences to this many tokens (default: {default}128)")
    data.add_argument("--pad_to_max_length", action="store_true", default=argparse.SUPPRESS,
                      help=f"Pad every example to --max_seq_length (the seed) instead of per batch (default: "
                           f"{default}off)")
    data.add_argument("--max_train_samples", type=positive_int, default=argparse.SUPPRESS,
                      help=f"Use the first N training examples (default: {default}all; RTE: 2432)")
    data.add_argument("--label_noise", type=fraction, default=argparse.SUPPRESS,
                      help=f"Flip the labels of this fraction of the training examples, each to another class "
                           f"(mislabeled data for the detection experiment) (default: {default}0)")
    data.add_argument("--label_noise_seed", type=int, default=argparse.SUPPRESS,
                      help=f"Which examples --label_noise flips, and to what (default: {default}0)")
    output.add_argument("--device", default="auto", help="Torch device ('auto': cuda if available, else cpu).")
    if checkpoint:
        data.add_argument("--checkpoint_dir", default="./checkpoints",
                          help="Where train.py saved <checkpoint_dir>/<dataset_name>/; its data, model and recipe "
                               "are the defaults of this run's flags.")
    output.add_argument("--verbose", action="store_true", help="Also show transformers' and kronfluence's logs.")


def add_training_args(parser, checkpoint: bool = False) -> None:
    """The recipe's flags, shared by train.py and the retraining scripts so a retrain is the same recipe."""
    default = "the checkpoint's, else " if checkpoint else ""
    defaults, training = RECIPE_DEFAULTS, group(parser, TRAINING)
    training.add_argument("--train_batch_size", type=positive_int, default=argparse.SUPPRESS,
                          help=f"Batch size for fine-tuning (default: {default}{defaults['train_batch_size']})")
    training.add_argument("--learning_rate", type=float, default=argparse.SUPPRESS,
                          help=f"Peak AdamW learning rate (default: {default}{defaults['learning_rate']})")
    training.add_argument("--weight_decay", type=float, default=argparse.SUPPRESS,
                          help=f"AdamW weight decay (default: {default}{defaults['weight_decay']})")
    training.add_argument("--num_train_epochs", type=positive_int, default=argparse.SUPPRESS,
                          help=f"Training epochs (default: {default}{defaults['num_train_epochs']})")
    training.add_argument("--lr_scheduler_type", default=argparse.SUPPRESS,
                          choices=["constant", "constant_with_warmup", "linear", "cosine"],
                          help=f"Learning-rate schedule (default: {default}constant, as the seed)")
    training.add_argument("--warmup_ratio", type=float, default=argparse.SUPPRESS,
                          help=f"Fraction of steps spent warming up the learning rate (default: {default}0)")
    training.add_argument("--bf16", action="store_true", default=argparse.SUPPRESS,
                          help=f"bfloat16 autocast, on GPU (default: {default}off)")
    training.add_argument("--group_by_length", action="store_true", default=argparse.SUPPRESS,
                          help="Batch training examples of similar lengths together: less padding, about 3x faster "
                               f"on SST-2's short sentences (default: {default}off)")


def add_shard_args(parser) -> None:
    output = group(parser, OUTPUT)
    output.add_argument("--shard_index", type=int, default=int(os.environ.get("RANK", 0)),
                        help="This process's share of the runs (default: torchrun's RANK, else 0).")
    output.add_argument("--num_shards", type=positive_int, default=int(os.environ.get("WORLD_SIZE", 1)),
                        help="How many processes share the runs (default: torchrun's WORLD_SIZE, else 1).")


# ----------------------------------------------------------------------------------------------------------------------
# The checkpoint as the source of the configuration

def from_results_folder(args, folder: str | None, record: str = "experiment_args.json") -> None:
    """A results folder given by path configures its own flags, as a checkpoint does: every flag it records (its
    recipe's too) that the command line does not give takes the recorded value (and is no override of the
    checkpoint's: `from_checkpoint` warns only about flags typed on the command line)."""
    args.from_folder = set()
    if folder is None:
        return
    saved = results.read_json(os.path.join(folder, record), "delete that folder and rebuild it")
    for key, value in {**saved, **saved.get("recipe", {})}.items():
        if key != "recipe" and key not in vars(args):
            setattr(args, key, value)
            args.from_folder.add(key)


def fill_flags(args, saved: dict, defaults: dict) -> dict:
    """Sets every flag in `defaults` not given on the command line: to its value in `saved` (what a checkpoint or a
    results folder records) when there is one, else to the default. A flag given explicitly wins; returns those that
    differ from the saved value, {flag: {"checkpoint": saved, "here": given}}."""
    overrides = {}
    for key, default in defaults.items():
        if key not in vars(args):
            setattr(args, key, saved.get(key, default))
        elif key in saved and saved[key] != getattr(args, key):
            overrides[key] = {"checkpoint": saved[key], "here": getattr(args, key)}
    return overrides


def from_checkpoint(args, checkpoint_dir: str | None, recipe: bool = False) -> argparse.Namespace:
    """Fills every data (and with `recipe`, fine-tuning) flag not given on the command line from the checkpoint's
    `glue_checkpoint.json` in `checkpoint_dir/<dataset_name>` (an ensemble's: its first member's; they share all but
    the seed) when there is one, else from the built-in defaults (see `fill_flags`)."""
    saved, args.configured_by = {}, None
    if checkpoint_dir is not None:
        args.configured_by = os.path.join(checkpoints(checkpoint_dir, args.dataset_name)[0][1],
                                          CHECKPOINT_META)
        saved = results.read_json(args.configured_by, "retrain the checkpoint with train.py")
        saved = saved.get("args", {}) if isinstance(saved, dict) else {}
    # Recorded in glue_scores.json by analyze.py and logged by `log_configuration`.
    overrides = fill_flags(args, saved, {**DATA_DEFAULTS, **(RECIPE_DEFAULTS if recipe else {})})
    args.overrides = {k: v for k, v in overrides.items() if k not in getattr(args, "from_folder", ())}
    if args.train_file is None and args.dataset_name not in pipeline.GLUE_TASKS:
        raise GlueError(f"--dataset_name {args.dataset_name} is no GLUE task ({', '.join(pipeline.GLUE_TASKS)}); "
                        "for your own data pass --train_file and --validation_file")
    pipeline.use_data(args)
    offline_if_hub_unreachable(args)
    return args


def offline_if_hub_unreachable(args) -> None:
    """Loading from an unreachable hub retries for about a minute before failing. When this run needs the hub (no
    --data_dir, or a model that is neither local nor the packaged one), check once, in at most 3 s, and go offline
    instead: the loaders then fail at once with the offline fix. Call before importing transformers or datasets."""
    model = args.model_name_or_path
    needs_hub = ((args.data_dir is None and getattr(args, "train_file", None) is None)
                 or not (os.path.isdir(model) or model == pipeline.PACKAGED_MODEL))
    if not needs_hub or os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", "no", ""):
        return
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"


def log_configuration(args) -> None:
    """Where the data, model and recipe flags came from, and which flags override the saved ones."""
    if args.configured_by is not None and not os.path.isfile(args.configured_by):
        logger.warning("no checkpoint at %s: the data, model and recipe flags are this command's or their defaults",
                       os.path.dirname(args.configured_by))
    for key, values in args.overrides.items():
        logger.warning("--%s %s overrides the checkpoint's %s", key, values["here"], values["checkpoint"])


# ----------------------------------------------------------------------------------------------------------------------
# Logging: quiet by default, like HF's examples

def setup_logging(verbose: bool = False) -> None:
    """The project's own INFO lines; transformers' and kronfluence's chatter (model reports, module lists, argument
    dumps, known FutureWarnings) only with --verbose."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    if verbose:
        return
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    logging.getLogger("torch").setLevel(logging.WARNING)  # e.g. the FakeTensor cache stats it logs at exit
    for name in ("transformers", "datasets", "huggingface_hub", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.cuda.amp.GradScaler(...) in kronfluence, ...
