"""Checkpoints, the one place that knows them: where train.py puts them (`<checkpoint_dir>/<task>/`, an ensemble's
members in `seed<S>/` below it, the weights after earlier epochs in `epoch<E>/` inside), what their files are called,
and saving, verifying and loading them.

Light to import (the standard library and the project's own light modules): the scripts find a checkpoint's flags
before they import torch; transformers is imported inside the functions that load or save a model.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import TYPE_CHECKING

from . import progress, results
from .config import DATA_DEFAULTS, RECIPE_DEFAULTS, RECIPE_KEYS
from .errors import GlueError, ResultDamaged, ResultMissing
from .failpoints import failpoint
from .pipeline import check_training_data, get_task, load_tokenizer

if TYPE_CHECKING:
    from torch import nn

CHECKPOINT_META = "glue_checkpoint.json"
TRAINING_MARGINS = "training_margins.json"  # train.py's record of the training dynamics, in the checkpoint
LABEL_NOISE = "label_noise.json"  # which labels train.py --label_noise flipped, in the checkpoint

_MEMBER = re.compile(r"(?:(.+)_)?seed(-?\d+)")


def member(seed: int) -> str:
    """An ensemble member's name: its checkpoint folder, and the suffix of its score sets (<name>_seed<S>)."""
    return f"seed{seed}"


def parse_member(name: str) -> tuple | None:
    """(base, seed) of a member's name: ("ekfac", 3) for "ekfac_seed3", ("", 3) for "seed3"; None otherwise."""
    match = _MEMBER.fullmatch(name)
    return (match.group(1) or "", int(match.group(2))) if match else None


def member_seeds(names, base: str = "") -> list:
    """The seeds S, in order, of the members among `names`: score sets `<base>_seed<S>`, or with base "" the
    checkpoint folders `seed<S>`."""
    return sorted(parsed[1] for parsed in map(parse_member, names) if parsed and parsed[0] == base)


def epoch_member(epoch: int) -> str:
    """The folder, inside a checkpoint, of its weights after `epoch` (train.py --save_epoch_checkpoints), and the
    suffix of their score sets (<name>_epoch<E>)."""
    return f"epoch{epoch}"


def save_checkpoint(model: nn.Module, tokenizer, checkpoint_dir: str, meta: dict, extra: dict | None = None,
                    epochs: dict | None = None) -> None:
    """config + safetensors + tokenizer + `glue_checkpoint.json` (with every file's sha256) + `extra` JSON files,
    published in one rename (glue_attribution/results.py): a killed save leaves no checkpoint that looks complete,
    and the next save cleans up. `epochs` {epoch: state dict} become checkpoints of their own in `epoch<E>/`,
    inside this one (its manifest covers them: they are verified, replaced and deleted with it)."""
    parent = results.make_output_dir(os.path.dirname(os.path.abspath(checkpoint_dir)))
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    results.check_free_space(parent, size * (1 + len(epochs or {})), "the checkpoint")
    progress.stage("saving the checkpoint", checkpoint_dir)
    with results.lock(checkpoint_dir):
        results.clean_staging(checkpoint_dir)  # leftovers of killed saves
        staging = results.staging_dir(checkpoint_dir, {"pid": os.getpid()})
        for epoch, state_dict in (epochs or {}).items():
            folder = os.path.join(staging, epoch_member(epoch))
            model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(folder)
            results.seal(folder, CHECKPOINT_META, {**meta, "epoch": epoch, "metrics": {}})
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        results.atomic_write_json(meta.get("metrics", {}), os.path.join(staging, "all_results.json"))  # as HF's
        for name, obj in (extra or {}).items():
            results.atomic_write_json(obj, os.path.join(staging, name))
        failpoint("checkpoint_saved")
        results.publish(staging, checkpoint_dir, CHECKPOINT_META, meta)


def checkpoint_meta(checkpoint_dir: str, task_name: str) -> dict:
    """The verified metadata of a `train.py` checkpoint for this task.

    Raises:
        GlueError: no checkpoint there, it is damaged, or it was trained for another task or label count.
    """
    from transformers import AutoConfig

    task = get_task(task_name)
    try:
        meta = results.read(checkpoint_dir, CHECKPOINT_META, "checkpoint")
    except ResultMissing:
        raise GlueError(f"no checkpoint at {checkpoint_dir}; run train.py --dataset_name {task_name} "
                        f"--checkpoint_dir {os.path.dirname(os.path.normpath(checkpoint_dir)) or '.'} first") from None
    except ResultDamaged as err:
        raise GlueError(f"{err}; retrain it with train.py") from None
    config = AutoConfig.from_pretrained(checkpoint_dir)
    if meta.get("task") != task_name or config.num_labels != task.num_labels:
        raise GlueError(f"the checkpoint at {checkpoint_dir} was trained for '{meta.get('task')}' with "
                        f"{config.num_labels} labels, not '{task_name}' with {task.num_labels}")
    return meta


def load_checkpoint(checkpoint_dir: str, task_name: str, attn_implementation: str | None = None):
    """Loads a verified `train.py` checkpoint (safetensors only). Returns (model, tokenizer, meta).

    Raises:
        GlueError: as `checkpoint_meta`, or the weights cannot be loaded.
    """
    from transformers import AutoModelForSequenceClassification

    meta = checkpoint_meta(checkpoint_dir, task_name)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(checkpoint_dir, use_safetensors=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        raise GlueError(f"cannot load the checkpoint at {checkpoint_dir}: {str(err).splitlines()[0]}") from None
    return model, load_tokenizer(checkpoint_dir), meta


def ensemble_seeds(task_dir: str) -> list:
    """The seeds of the ensemble members that `train.py --seed A B ...` wrote below `task_dir`, in order."""
    names = os.listdir(task_dir) if os.path.isdir(task_dir) else []
    return [seed for seed in member_seeds(names)
            if os.path.isfile(os.path.join(task_dir, member(seed), CHECKPOINT_META))]


def checkpoints(checkpoint_dir: str, dataset_name: str, only: list | None = None, epoch: int | None = None) -> list:
    """[(seed or None, checkpoint folder)]: the one checkpoint in <checkpoint_dir>/<task>/, or the ensemble's members
    below it (analysed one by one, then together), or the members among them whose seeds are `only`; with `epoch`,
    the one checkpoint's weights after that epoch (train.py --save_epoch_checkpoints)."""
    task_dir = os.path.join(checkpoint_dir, dataset_name)
    seeds = [] if os.path.isfile(os.path.join(task_dir, CHECKPOINT_META)) else ensemble_seeds(task_dir)
    if epoch is not None:
        if seeds:
            raise GlueError(f"--checkpoint_epoch: {task_dir} holds an ensemble; the epochs of an ensemble's members "
                            "are not analysed (train one checkpoint with --save_epoch_checkpoints)")
        folder = os.path.join(task_dir, epoch_member(epoch))
        if not os.path.isfile(os.path.join(folder, CHECKPOINT_META)):
            raise GlueError(f"--checkpoint_epoch {epoch}: {task_dir} has no {epoch_member(epoch)}/; train "
                            "with train.py --save_epoch_checkpoints (it keeps every epoch but the last, which is the "
                            "checkpoint itself)")
        return [(None, folder)]
    if only is not None:
        if not seeds or set(only) - set(seeds):
            raise GlueError(f"--ensemble_seeds {' '.join(map(str, only))}: {task_dir} holds "
                            + (f"members with seeds {' '.join(map(str, seeds))}" if seeds else "no ensemble")
                            + "; train them with train.py --seed")
        seeds = [s for s in seeds if s in only]
    return [(s, os.path.join(task_dir, member(s))) for s in seeds] or [(None, task_dir)]


def checkpoint_destinations(checkpoint_dir: str, dataset_name: str, seeds: list) -> list:
    """[(seed, checkpoint folder)] that train.py writes: <checkpoint_dir>/<task>/ for one seed, seed<S>/ below it for
    an ensemble. Never mixes the two layouts in one folder (publishing one checkpoint there would replace a whole
    ensemble)."""
    task_dir = os.path.join(checkpoint_dir, dataset_name)
    if len(seeds) == 1:
        if found := ensemble_seeds(task_dir):
            listed = " ".join(map(str, found))
            raise GlueError(f"{task_dir} holds an ensemble (seeds {listed}); to add a member pass them all, e.g. "
                            f"--seed {listed} {seeds[0]} (finished members are skipped), or choose another "
                            "--checkpoint_dir")
        return [(seeds[0], task_dir)]
    if os.path.isfile(os.path.join(task_dir, CHECKPOINT_META)):
        raise GlueError(f"{task_dir} holds a single checkpoint; choose another --checkpoint_dir for the ensemble")
    return [(seed, os.path.join(task_dir, member(seed))) for seed in seeds]


def trained_member(checkpoint_dir: str, arguments: dict) -> bool:
    """An ensemble member already trained and verified: a rerun skips it. One trained with another recipe (or
    evaluation slice) is refused: the ensemble would mix two recipes."""
    try:
        saved = results.read(checkpoint_dir, CHECKPOINT_META, "checkpoint")["args"]
    except GlueError:
        return False
    check_recipe(checkpoint_dir, saved, arguments, (*RECIPE_KEYS, "max_eval_samples"),
                 fix="choose another --checkpoint_dir, or delete that member")
    return True


def trained_checkpoints(checkpoint_dir: str, dataset_name: str) -> tuple | None:
    """(checkpoint_dir, {model sha256: folder}) of the verified checkpoint(s) train.py wrote in
    <checkpoint_dir>/<task> (an ensemble's members): what a score set read for them must have been computed from.
    None when there is no checkpoint there."""
    found = {}
    for _, folder in checkpoints(checkpoint_dir, dataset_name):
        meta = _verified_meta(folder)
        if meta is None:
            continue
        found[meta["files"]["model.safetensors"]["sha256"]] = folder
        for name in meta["files"]:  # its epochs (--save_epoch_checkpoints), verified with it
            if os.path.dirname(name) and os.path.basename(name) == "model.safetensors":
                found[meta["files"][name]["sha256"]] = os.path.join(folder, os.path.dirname(name))
    return (checkpoint_dir, found) if found else None


def _verified_meta(folder: str) -> dict | None:
    """The checkpoint's verified record; None when there is none (a damaged one is refused)."""
    try:
        return results.read(folder, CHECKPOINT_META, "checkpoint")
    except ResultMissing:
        return None
    except ResultDamaged as err:
        raise GlueError(f"{err}; retrain it with train.py") from None


def check_recipe(checkpoint_dir: str, saved: dict, reference: dict, keys: tuple = RECIPE_KEYS,
                 fix: str = "pass --ensemble_seeds, or retrain them") -> None:
    """An ensemble never mixes recipes: refuses a member whose recorded arguments `saved` differ from `reference`
    (another member's, or this run's) in any of `keys`."""
    default = {**DATA_DEFAULTS, **RECIPE_DEFAULTS}  # a flag added later: its default when a record lacks it
    changed = [key for key in keys if _comparable(key, saved.get(key, default.get(key)))
               != _comparable(key, reference.get(key, default.get(key)))]
    if changed:
        raise GlueError(f"{checkpoint_dir} was trained with another {', '.join(changed)}; an ensemble's members "
                        f"share one recipe: {fix}")


def _comparable(key: str, value):
    """train.py records --data_dir as an absolute path (older checkpoints: as typed, relative to where it ran)."""
    return os.path.abspath(value) if key == "data_dir" and value is not None else value


def check_checkpoint_data(config, train_text, folders: list | None = None) -> None:
    """Every checkpoint in `folders` was trained on `train_text` (this run's training examples, label noise
    included): scores, retrains and rankings of other data would be served as this model's. When this run takes
    another slice or label noise than the checkpoint's (an override, warned, or a results folder's own), its examples
    differ on purpose and are not compared. `config`: any configuration with the data fields and checkpoint_dir."""
    if folders is None:  # the checkpoint(s) in --checkpoint_dir, when there are any
        folders = [folder for _, folder in checkpoints(config.checkpoint_dir, config.dataset_name)]
    for folder in folders:
        meta = _verified_meta(folder)
        if meta is None:
            continue
        slice_keys = ("max_train_samples", "label_noise", "label_noise_seed")
        if any(meta.get("args", {}).get(key, DATA_DEFAULTS[key]) != getattr(config, key) for key in slice_keys):
            continue
        check_training_data(meta, folder, config.dataset_name, config.data_dir, train_text)


def train_command(config) -> str:
    """The train.py command that makes the checkpoint this run reads: its task and folder, and every data, model
    and recipe flag this run uses that is not train.py's default (so it trains on the same data, offline too)."""
    flags = [f"--dataset_name {config.dataset_name}", f"--checkpoint_dir {shlex.quote(config.checkpoint_dir)}"]
    recipe = RECIPE_DEFAULTS if hasattr(config, "learning_rate") else {}  # analyze.py's --train_batch_size scores
    for key, default in {**DATA_DEFAULTS, **recipe}.items():
        value = getattr(config, key, default)
        if value == default:
            continue
        if isinstance(value, (list, tuple)):  # --text_columns
            flags.append(f"--{key} " + " ".join(shlex.quote(str(v)) for v in value))
        else:
            flags.append(f"--{key}" if value is True else f"--{key} {shlex.quote(str(value))}")
    return "python train.py " + " ".join(flags)


def require_checkpoint(config) -> None:
    """Refuses a run whose --checkpoint_dir holds no checkpoint for the task, naming the train.py command that
    makes it (a warning about the missing checkpoint would otherwise be followed by a failure further on)."""
    folder = checkpoints(config.checkpoint_dir, config.dataset_name)[0][1]
    if not os.path.isfile(os.path.join(folder, CHECKPOINT_META)):
        offline = (config.data_dir is None and getattr(config, "train_file", None) is None
                   and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "false", "no", ""))
        raise GlueError(f"no checkpoint at {folder}; train it first: {train_command(config)}"
                        + (" --data_dir <a GLUE folder, e.g. ../shared/glue_data> (offline: the hub is unreachable)"
                           if offline else ""))
