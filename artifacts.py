"""Results on disk: written once in a private folder, published by one rename, verified on every read.

Every result the scripts hand to each other (checkpoints, factors, scores, the LDS ground truth and its runs,
counterfactual runs) follows three rules, so that a kill, a rerun or a second process can never serve a wrong one:

- Write once. Work happens in a private folder named by the result's signature (everything that changes it). The
  finished folder gets a metadata JSON listing each file's sha256 and size, then becomes visible under its public
  name by a rename (two when it replaces an older result, moved aside first: a reader in between finds nothing,
  never a mix). Nothing public is ever rewritten in place.
- One writer. `lock` takes an exclusive `flock` on `.staging/<result>.lock`: a second process waits, then finds the
  result published. The kernel drops the lock with its process, so a killed run blocks no one.
- Verified reads. `read` checks the metadata, every file's size and sha256, and (with `expected`) the provenance the
  reader is about to rely on. A damaged result raises `Damaged`: its owner recomputes it, a consumer reports it.

`kill_point` lets tests SIGKILL a run at a named step (`GLUE_KILL_AT=step`), to prove all of the above.
"""

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import time
import zipfile
from contextlib import contextmanager

import numpy as np

from cli import UserError

logger = logging.getLogger(__name__)
STAGING = ".staging"  # private work folders, beside the public results


class Missing(UserError):
    """The result has not been published (or was never finished)."""


class Damaged(UserError):
    """The result is there but fails verification: truncated, corrupt, or its metadata is unreadable."""


def make_output_dir(path: str) -> str:
    """Creates `path` and checks it is writable, before any work is spent."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as err:
        raise UserError(f"cannot write to {path}: {err.strerror}; choose another directory") from None
    return path


def check_writable(path: str) -> str:
    """Fails now, not after hours of work, if `path` could not be created or written; creates nothing (a failed
    run leaves no empty folder)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not a directory" if not os.path.isdir(existing) else "is not writable"
        raise UserError(f"cannot write to {path}: {existing} {problem}; choose another directory")
    return path


@contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yields a temporary name beside `path`, renamed over it once written: a file that exists is complete."""
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    yield tmp
    os.replace(tmp, path)


def save_figure(fig, path: str) -> None:
    """Writes a matplotlib figure under a temporary name (same extension: it picks the format) and renames it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    make_output_dir(os.path.dirname(os.path.abspath(path)))
    with atomic_path(path, os.path.splitext(path)[1]) as tmp:
        fig.savefig(tmp, dpi=150)
    plt.close(fig)


def atomic_write_json(obj, path: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)


def digest(obj) -> str:
    """A short, stable name for a JSON-able signature."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


_passes = {}


def kill_point(step: str) -> None:
    """Tests only: SIGKILL this process (no cleanup runs, as in a real kill) at `step` when GLUE_KILL_AT names it,
    or at its N-th pass with GLUE_KILL_AT=step:N."""
    target, _, count = os.environ.get("GLUE_KILL_AT", "").partition(":")
    if target == step:
        _passes[step] = _passes.get(step, 0) + 1
        if _passes[step] == int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def lock(path: str, enabled: bool = True):
    """Exclusive lock on the result at `path` (on the file .staging/<name>.lock beside it), held for the block."""
    if not enabled:  # non-main torchrun ranks: the main rank decides and writes
        yield
        return
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(os.path.join(parent, STAGING), exist_ok=True)
    with open(os.path.join(parent, STAGING, f"{name}.lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for another process writing %s ...", path)
            start = time.time()
            fcntl.flock(handle, fcntl.LOCK_EX)
            logger.info("... it finished after %.0f s", time.time() - start)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def staging_dir(public: str, signature: dict) -> str:
    """The private work folder of the result `public` with this signature: <parent>/.staging/<name>-<digest>."""
    parent, name = os.path.split(os.path.abspath(public))
    return os.path.join(parent, STAGING, f"{name}-{digest(signature)}")


def clean_staging(public: str) -> None:
    """Removes every private folder of `public` (call it under the lock, once nothing in them can be resumed)."""
    parent, name = os.path.split(os.path.abspath(public))
    staging = os.path.join(parent, STAGING)
    own = re.compile(rf"{re.escape(name)}(-[0-9a-f]{{16}}|\.replaced-\d+)")  # not scores_ekfac-x's folders
    for entry in os.listdir(staging) if os.path.isdir(staging) else []:
        if own.fullmatch(entry):
            shutil.rmtree(os.path.join(staging, entry), ignore_errors=True)


def files_in(folder: str) -> set:
    """Relative paths of every file under `folder` (none if it does not exist)."""
    return {os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names}


def manifest(folder: str, exclude: tuple = ()) -> dict:
    """{relative path: {sha256, size}} of every file under `folder`."""
    return {relative: {"sha256": file_sha256(os.path.join(folder, relative)),
                       "size": os.path.getsize(os.path.join(folder, relative))}
            for relative in sorted(files_in(folder) - set(exclude))}


def seal(folder: str, meta_name: str, meta: dict, files: list | None = None) -> dict:
    """Writes `meta` plus the manifest of `files` (default: every file in `folder`) as `folder/meta_name`, last:
    a folder whose metadata exists is complete."""
    listed = manifest(folder, exclude=tuple(files_in(folder) - set(files)) if files else (meta_name,))
    meta = {**meta, "files": listed}
    atomic_write_json(meta, os.path.join(folder, meta_name))
    return meta


def publish(staging: str, public: str, meta_name: str, meta: dict) -> dict:
    """Seals the finished `staging` folder and renames it to `public`, replacing any previous result there."""
    meta = seal(staging, meta_name, meta)
    kill_point("before_publish")
    old = None
    if os.path.lexists(public):
        old = os.path.join(os.path.dirname(os.path.abspath(public)), STAGING,
                           f"{os.path.basename(public)}.replaced-{os.getpid()}")
        os.replace(public, old)
    os.replace(staging, public)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return meta


def verify(folder: str, meta: dict, what: str) -> None:
    """Every file the metadata lists is there with its size and sha256."""
    for relative, expected in meta.get("files", {}).items():
        path = os.path.join(folder, relative)
        if not os.path.isfile(path):
            raise Damaged(f"{what} in {folder} is incomplete: {relative} is missing")
        if os.path.getsize(path) != expected["size"] or file_sha256(path) != expected["sha256"]:
            raise Damaged(f"{what} in {folder} is damaged: {relative} does not match its recorded sha256")


def read(folder: str, meta_name: str, what: str, expected: dict | None = None) -> dict:
    """The verified metadata of the result in `folder`.

    Raises:
        Missing: nothing published there.
        Damaged: metadata unreadable, a file missing, truncated or changed.
        UserError: `expected` provenance differs from the result's (naming each difference).
    """
    path = os.path.join(folder, meta_name)
    if not os.path.isfile(path):
        raise Missing(f"no finished {what} in {folder}")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        raise Damaged(f"{what} in {folder} is damaged: {meta_name} is not valid JSON") from None
    if not isinstance(meta, dict) or "files" not in meta:
        raise Damaged(f"{what} in {folder} has no file manifest (written by an older version?); recompute it")
    verify(folder, meta, what)
    if expected is not None:
        check_provenance(meta.get("provenance", {}), expected, f"{what} in {folder}")
    return meta


def reuse(folder: str, meta_name: str, what: str, signature: dict, overwrite: bool,
          keep_both: str = "another --output_dir") -> dict | None:
    """The owner's read: the published result for `signature`, or None when it must be (re)computed (missing,
    damaged, or --overwrite). A result made with other arguments is refused, never silently replaced."""
    if overwrite:
        return None
    try:
        meta = read(folder, meta_name, what)
    except Missing:
        return None
    except Damaged as err:
        logger.warning("%s: recomputing it", err)
        return None
    signature = json.loads(json.dumps(signature, default=str))
    if meta.get("signature") != signature:
        saved = meta.get("signature", {})
        changed = sorted(k for k in signature.keys() | saved.keys() if signature.get(k) != saved.get(k))
        raise UserError(f"{folder} holds {what} computed with other arguments ({', '.join(changed)} differ); pass "
                        f"--overwrite to recompute them, or {keep_both} to keep both")
    return meta


def check_provenance(saved: dict, expected: dict, what: str) -> None:
    """Refuses, naming every difference, a result computed on other data than the reader's."""
    expected = json.loads(json.dumps(expected, default=str))
    changed = [f"{key} {saved.get(key)!r} vs {value!r}" if not key.endswith("_data") else f"{key} differs"
               for key, value in expected.items() if saved.get(key) != value]
    if changed:
        raise UserError(f"{what} was computed on other data than this run ({'; '.join(changed)}: theirs vs this "
                        "run's); pass the flags it was computed with, or recompute it")


# ----------------------------------------------------------------------------------------------------------------------
# Stages of one result (factor fitting): resumed after a kill only when their files verify

def stage_record(root: str, stage: str) -> str:
    return os.path.join(root, f"{stage}.stage.json")


def finished_stages(root: str, work: str, stages: list) -> list:
    """The leading stages whose records verify against `work`; removes every file that no such record covers (a
    killed stage's partial output) and the records of later stages, so they are recomputed from scratch."""
    done, covered = [], set()
    for stage in stages:
        try:
            with open(stage_record(root, stage)) as f:
                record = json.load(f)
            verify(work, record, f"stage {stage}")
        except (OSError, ValueError, Damaged):
            break
        done.append(stage)
        covered |= set(record["files"])
    for stage in stages[len(done):]:
        if os.path.exists(stage_record(root, stage)):
            os.remove(stage_record(root, stage))
    if os.path.isdir(work):
        for relative in manifest(work):
            if relative not in covered:
                os.remove(os.path.join(work, relative))
    return done


def salvage_stages(public: str, meta_name: str, signature: dict, root: str, work: str, stages: list) -> None:
    """Before refitting a damaged published result with this signature, links its leading stages whose files still
    verify into the fresh private folder, so that only the damaged stage and those after it are recomputed."""
    try:
        with open(os.path.join(public, meta_name)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return
    if os.path.exists(root) or meta.get("signature") != json.loads(json.dumps(signature, default=str)):
        return
    for stage in stages:
        try:
            files = {name: meta["files"][name] for name in meta["stages"][stage]}
            verify(public, {"files": files}, f"stage {stage}")
        except (KeyError, TypeError, Damaged):
            return
        for name in files:
            os.makedirs(os.path.dirname(os.path.join(work, name)), exist_ok=True)
            os.link(os.path.join(public, name), os.path.join(work, name))
        atomic_write_json({"stage": stage, "files": files}, stage_record(root, stage))
        logger.info("Kept the verified %s stage of %s", stage, public)


def stage_files(root: str, stages: list) -> dict:
    """{stage: its files}, from the records: kept in the published metadata for `salvage_stages`."""
    files = {}
    for stage in stages:
        with open(stage_record(root, stage)) as f:
            files[stage] = sorted(json.load(f)["files"])
    return files


def record_stage(root: str, work: str, stage: str, before: set) -> None:
    """Records the files `stage` added to `work` (those not in `before`), with their sha256."""
    added = {k: v for k, v in manifest(work).items() if k not in before}
    atomic_write_json({"stage": stage, "files": added}, stage_record(root, stage))


def link_tree(source: str, target: str) -> None:
    """Hard-links every file of `source` into `target`: an immutable snapshot (published files are never rewritten,
    only replaced by rename), taken in constant time and space."""
    for root, _, names in os.walk(source):
        destination = os.path.join(target, os.path.relpath(root, source))
        os.makedirs(destination, exist_ok=True)
        for name in names:
            try:
                os.link(os.path.join(root, name), os.path.join(destination, name))
            except OSError:  # a file system without hard links
                shutil.copy2(os.path.join(root, name), os.path.join(destination, name))


# ----------------------------------------------------------------------------------------------------------------------
# Influence scores written by analyze.py

SCORES_META = "glue_scores.json"


def scores_dir(output_dir: str, task_name: str, scores_name: str) -> str:
    """Where a score set is published: <output_dir>/<task>/scores_<name>/ (kronfluence's layout)."""
    return os.path.join(output_dir, task_name, f"scores_{scores_name}")


def analyze_command(output_dir: str, task_name: str, scores_name: str) -> str:
    """The analyze.py command that makes the score set `scores_name` (as analyze.py names its sets)."""
    base, ensemble = re.fullmatch(r"(.+?)((?:_seed-?|_ens)\d+)?", scores_name).groups()
    strategy, *parts = base.split("_")
    flags = [f"--factor_strategy {strategy}"]
    for part in parts:
        if part == "half":
            flags.append("--use_half_precision")
        elif part.startswith("qlr") and part[3:].isdigit():
            flags.append(f"--query_gradient_rank {part[3:]}")
        else:  # a custom --scores_name
            flags = [f"--scores_name {base}"]
            break
    if ensemble:  # an ensemble's member or combination
        flags.append("--checkpoint_dir <the ensemble's root>")
    return (f"python analyze.py --dataset_name {task_name} --output_dir {output_dir} {' '.join(flags)} (plus the data "
            "flags it was computed with)")


def load_scores(output_dir: str, task_name: str, scores_name: str, expected: dict | None = None,
                kind: str = "pairwise") -> tuple:
    """A verified score set: (scores as float32 numpy, queries x train in dataset order, or train for "self"; meta).

    Raises:
        UserError: missing, damaged or computed on other data (`expected` provenance), naming the command to rerun.
    """
    from safetensors.torch import load_file  # numpy has no bfloat16 (--use_half_precision)

    folder = scores_dir(output_dir, task_name, scores_name)
    rerun = analyze_command(output_dir, task_name, scores_name)
    try:
        meta = read(folder, SCORES_META, f"scores '{scores_name}'", expected)
    except (Missing, Damaged) as err:
        raise UserError(f"{err}; make them with: {rerun}") from None
    name = f"{kind}_scores.safetensors"
    if name not in meta["files"]:
        raise UserError(f"scores '{scores_name}' in {folder} have no {kind} scores; rerun: {rerun}"
                        + (" --compute_self_scores" if kind == "self" else ""))
    scores = load_file(os.path.join(folder, name))["all_modules"].float().numpy().copy()  # not a view of the file
    return scores, meta


# ----------------------------------------------------------------------------------------------------------------------
# Retraining runs (LDS ground truth, counterfactual): one small file per retrain, resumable and shardable

def save_arrays(path: str, **arrays) -> None:
    """One finished run as .npz, written under a temporary name and renamed: present means complete."""
    with atomic_path(path, ".npz") as tmp:
        np.savez(tmp, **arrays)


def load_run(path: str, shapes: dict) -> dict | None:
    """A finished run's arrays, or None when it is missing. One that is unreadable or has other shapes (a damaged
    file) is deleted with a warning, so the owner redoes it."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        if all(arrays[k].shape == shape for k, shape in shapes.items()):
            return arrays
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass
    logger.warning("%s is damaged; deleting it so that it is redone", path)
    os.remove(path)
    return None


def claim_experiment(folder: str, arguments: dict, keep_both: str) -> None:
    """Records the arguments a results folder was built with; refuses to mix runs built with other arguments."""
    make_output_dir(folder)
    path = os.path.join(folder, "experiment_args.json")
    arguments = json.loads(json.dumps(arguments, default=str))
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        changed = sorted(k for k in arguments.keys() | saved.keys() if arguments.get(k) != saved.get(k))
        if changed:
            raise UserError(f"{folder} holds runs built with other arguments ({', '.join(changed)} differ); "
                            f"pass {keep_both}, or delete that folder")
    else:
        atomic_write_json(arguments, path)
