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
  reader is about to rely on. A damaged result raises `ResultDamaged`: its owner recomputes it, a consumer reports it.

`failpoints.py` lets tests SIGKILL a run at a named step, to prove all of the above.
"""

import csv
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import zipfile
from contextlib import contextmanager

import numpy as np

from .errors import GlueError, ResultDamaged, ResultMissing
from .failpoints import failpoint

logger = logging.getLogger(__name__)
STAGING = ".staging"  # private work folders, beside the public results


def make_output_dir(path: str) -> str:
    """Creates `path` and checks it is writable, before any work is spent."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as err:
        raise GlueError(f"cannot write to {path}: {err.strerror}; choose another directory") from None
    return path


def nearest_existing(path: str) -> str:
    """`path`, or the closest of its parents that exists."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return existing


def free_bytes(path: str) -> int:
    """Free space on the file system that `path` is (or would be created) on."""
    return shutil.disk_usage(nearest_existing(path)).free


def check_free_space(path: str, needed: int, what: str) -> None:
    """Refuses a stage before it starts when its output (`needed` bytes, known in advance) cannot fit in `path`."""
    free = free_bytes(path)
    if free < needed:
        raise GlueError(f"no space left in {path}: {needed / 1e6:.0f} MB needed for {what}, {free / 1e6:.0f} MB free; "
                        "free some space or choose another --output_dir")


def check_writable(path: str) -> str:
    """Fails now, not after hours of work, if `path` could not be created or written; creates nothing (a failed
    run leaves no empty folder)."""
    existing = nearest_existing(path)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not a directory" if not os.path.isdir(existing) else "is not writable"
        raise GlueError(f"cannot write to {path}: {existing} {problem}; choose another directory")
    return path


@contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yields a temporary name beside `path`, renamed over it once written: a file that exists is complete."""
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        yield tmp
    except BaseException:  # a full disk, Ctrl-C: no partial file left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def atomic_write_json(obj, path: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)


def write_csv(path: str, header: list, rows) -> None:
    """A table as CSV, written under a temporary name and renamed."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def read_json(path: str, what: str) -> dict:
    """A JSON record another run wrote ({} when there is none)."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        raise GlueError(f"{path} is damaged; {what}") from None


def digest(obj) -> str:
    """A short, stable name for a JSON-able signature: the one naming scheme of private and experiment folders."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def array_digest(array: np.ndarray) -> str:
    """A short digest of an array's bytes (what a ranking removes), recorded to refuse runs made from other data."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def experiment_dir(parent: str, prefix: str, arguments: dict) -> str:
    """<parent>/<prefix>_<digest of the arguments>: an experiment's folder (LDS ground truth, counterfactual,
    detection). Older versions named LDS folders by the first 10 digits of the same digest; such a folder is found."""
    name = digest(arguments)
    folder, legacy = os.path.join(parent, f"{prefix}_{name}"), os.path.join(parent, f"{prefix}_{name[:10]}")
    return legacy if os.path.isdir(legacy) and not os.path.exists(folder) else folder


def file_sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


@contextmanager
def lock(path: str, enabled: bool = True, wait: bool = True):
    """Exclusive lock on the result at `path` (on the file .staging/<name>.lock beside it), held for the block.
    Yields True; with `wait` False, yields False at once (holding nothing) when another process holds it."""
    if not enabled:  # non-main torchrun ranks: the main rank decides and writes
        yield True
        return
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(os.path.join(parent, STAGING), exist_ok=True)
    with open(os.path.join(parent, STAGING, f"{name}.lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            logger.info("Waiting for another process writing %s ...", path)
            start = time.time()
            fcntl.flock(handle, fcntl.LOCK_EX)
            logger.info("... it finished after %.0f s", time.time() - start)
        try:
            yield True
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
    failpoint("before_publish")
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
            raise ResultDamaged(f"{what} in {folder} is incomplete: {relative} is missing")
        if os.path.getsize(path) != expected["size"] or file_sha256(path) != expected["sha256"]:
            raise ResultDamaged(f"{what} in {folder} is damaged: {relative} does not match its recorded sha256")


def read(folder: str, meta_name: str, what: str, expected: dict | None = None) -> dict:
    """The verified metadata of the result in `folder`.

    Raises:
        ResultMissing: nothing published there.
        ResultDamaged: metadata unreadable, a file missing, truncated or changed.
        GlueError: `expected` provenance differs from the result's (naming each difference).
    """
    path = os.path.join(folder, meta_name)
    if not os.path.isfile(path):
        raise ResultMissing(f"no finished {what} in {folder}")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        raise ResultDamaged(f"{what} in {folder} is damaged: {meta_name} is not valid JSON") from None
    if not isinstance(meta, dict) or "files" not in meta:
        raise ResultDamaged(f"{what} in {folder} has no file manifest (written by an older version?); recompute it")
    verify(folder, meta, what)
    if expected is not None:
        check_provenance(meta.get("provenance", {}), expected, f"{what} in {folder}")
    return meta


def reuse(folder: str, meta_name: str, what: str, signature: dict, overwrite: bool,
          keep_both: str = "another --output_dir", legacy: dict | None = None) -> dict | None:
    """The owner's read: the published result for `signature`, or None when it must be (re)computed (missing,
    damaged, or --overwrite). A result made with other arguments is refused, never silently replaced. `legacy`:
    the values of fields that results published before those fields were recorded were computed with."""
    if overwrite:
        return None
    try:
        meta = read(folder, meta_name, what)
    except ResultMissing:
        return None
    except ResultDamaged as err:
        logger.warning("%s: recomputing it", err)
        return None
    signature = json.loads(json.dumps(signature, default=str))
    saved = meta.get("signature", {})
    if isinstance(saved, dict) and legacy:
        saved = {**json.loads(json.dumps(legacy, default=str)), **saved}
    if saved != signature:
        changed = sorted(k for k in signature.keys() | saved.keys() if signature.get(k) != saved.get(k))
        raise GlueError(f"{folder} holds {what} computed with other arguments ({', '.join(changed)} differ); pass "
                        f"--overwrite to recompute them, or {keep_both} to keep both")
    return meta


def check_provenance(saved: dict, expected: dict, what: str) -> None:
    """Refuses, naming every difference, a result computed on other data than the reader's."""
    expected = json.loads(json.dumps(expected, default=str))
    changed = [f"{key} {saved.get(key)!r} vs {value!r}" if not key.endswith("_data") else f"{key} differs"
               for key, value in expected.items() if saved.get(key) != value]
    if changed:
        raise GlueError(f"{what} was computed on other data than this run ({'; '.join(changed)}: theirs vs this "
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
        except (OSError, ValueError, ResultDamaged):
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
        except (KeyError, TypeError, ResultDamaged):
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
# Retraining runs (LDS ground truth, counterfactual): one small file per retrain, resumable and shardable

def save_arrays(path: str, **arrays) -> None:
    """One finished run as .npz, written under a temporary name and renamed: present means complete."""
    with atomic_path(path, ".npz") as tmp:
        np.savez(tmp, **arrays)


def load_run(path: str, shapes: dict, owner: bool = True) -> dict | None:
    """A finished run's arrays, or None when it is missing. One that is unreadable or has other shapes (a damaged
    file) is deleted with a warning, so the owner redoes it; a consumer (`owner` False) gets `ResultDamaged` and
    deletes nothing."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        if all(arrays[k].shape == shape for k, shape in shapes.items()):
            return arrays
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass
    if not owner:
        raise ResultDamaged(f"{path} is damaged (unreadable or of other shapes)")
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
            raise GlueError(f"{folder} holds runs built with other arguments ({', '.join(changed)} differ); "
                            f"pass {keep_both}, or delete that folder")
    else:
        atomic_write_json(arguments, path)
