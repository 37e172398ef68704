"""Score sets on disk, as analyze.py publishes them: `<output_dir>/<task>/scores_<name>/pairwise_scores.safetensors`
(kronfluence's layout; queries x training examples, dataset order) with `glue_scores.json` (signature, provenance,
each file's sha256). Every consumer (LDS, counterfactual, ensembles, detection) reads them through `load_scores`.

Names: member S of an ensemble is the checkpoint folder `seed<S>` (`train.py --seed A B ...`) and the score sets
`<name>_seed<S>`; their combination (ensembles.py) is `<name>_ens<N>`. The weights after epoch E of a checkpoint
(`train.py --save_epoch_checkpoints`, in its folder `epoch<E>`) give the score sets `<name>_epoch<E>`.
"""

import os
import re

from . import results
from .errors import GlueError, ResultDamaged, ResultMissing

SCORES_META = "glue_scores.json"
SELF_RANKING = "self_influence_ranking.csv"


def ensemble_name(scores_name: str, num_members: int) -> str:
    return f"{scores_name}_ens{num_members}"


def base_name(scores_name: str) -> str:
    """The score set's name without a member's, an ensemble's or an epoch's suffix."""
    return re.fullmatch(r"(.+?)(?:_seed-?\d+|_ens\d+|_epoch\d+)?", scores_name).group(1)


def epoch_of(scores_name: str, bare: bool = False) -> int | None:
    """E of a score set `<name>_epoch<E>` (analyze.py --checkpoint_epoch E), or with `bare` of the checkpoint folder
    `epoch<E>`; else None."""
    match = re.fullmatch(r"epoch(\d+)" if bare else r".+_epoch(\d+)", scores_name)
    return int(match.group(1)) if match else None


def scores_dir(output_dir: str, task_name: str, scores_name: str) -> str:
    """Where a score set is published: <output_dir>/<task>/scores_<name>/ (kronfluence's layout)."""
    return os.path.join(output_dir, task_name, f"scores_{scores_name}")


def analyze_command(output_dir: str, task_name: str, scores_name: str, checkpoint_dir: str | None = None,
                    num_queries: int | None = None) -> str:
    """The analyze.py command that makes the score set `scores_name` (as analyze.py names its sets)."""
    base = base_name(scores_name)
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
    if (epoch := epoch_of(scores_name)) is not None:
        flags.append(f"--checkpoint_epoch {epoch}")
    if checkpoint_dir is not None:
        flags.append(f"--checkpoint_dir {checkpoint_dir}")
    elif base != scores_name and epoch is None:  # an ensemble's member or combination
        flags.append("--checkpoint_dir <the ensemble's root>")
    if num_queries is not None:  # the reader's queries (analyze.py's data, model and truncation: the checkpoint's)
        flags.append(f"--max_query_examples {num_queries}")
    return f"python analyze.py --dataset_name {task_name} --output_dir {output_dir} {' '.join(flags)}"


def computed_from(meta: dict) -> list:
    """The sha256 of the checkpoint(s) a score set was computed from (an ensemble's: its members')."""
    if "ensemble" in meta:
        return list(meta.get("checkpoint_sha256", []))
    sha = meta.get("provenance", {}).get("checkpoint_sha256")
    return [sha] if sha else []


def source_of(meta: dict) -> dict:
    """What a result records of each score set it used: the checkpoint(s) and the digest of its signature."""
    return {"checkpoint_sha256": computed_from(meta), "signature_digest": results.digest(meta.get("signature"))}


def load_scores(output_dir: str, task_name: str, scores_name: str, expected: dict | None = None,
                kind: str = "pairwise", checkpoints: tuple | None = None) -> tuple:
    """A verified score set: (scores as float32 numpy, queries x train in dataset order, or train for "self"; meta).

    Args:
        expected: the provenance the reader relies on (task, training examples and order, queries, truncation).
        checkpoints: (checkpoint_dir, {sha256: folder}) from `checkpoints.trained_checkpoints`: the set must have been
            computed from these checkpoints (an ensemble's: from its members).

    Raises:
        GlueError: missing, damaged, computed on other data or from another checkpoint, naming the command to rerun.
    """
    from safetensors.torch import load_file  # numpy has no bfloat16 (--use_half_precision)

    folder = scores_dir(output_dir, task_name, scores_name)
    rerun = analyze_command(output_dir, task_name, scores_name, checkpoints[0] if checkpoints else None,
                            (expected or {}).get("num_query"))
    try:
        meta = results.read(folder, SCORES_META, f"scores '{scores_name}'", expected)
    except (ResultMissing, ResultDamaged) as err:
        raise GlueError(f"{err}; make them with: {rerun}") from None
    if checkpoints is not None:
        shas, used = checkpoints[1], computed_from(meta)
        if not used or None in used:
            raise GlueError(f"scores '{scores_name}' in {folder} record no checkpoint, so they cannot be checked "
                            f"against {', '.join(shas.values())}; compute them for it with: {rerun}")
        foreign = [sha for sha in used if sha not in shas]
        if foreign:
            raise GlueError(f"scores '{scores_name}' in {folder} were computed from another checkpoint "
                            f"({meta.get('checkpoint_dir', 'unknown folder')}, sha256 {foreign[0][:12]}) than "
                            f"{', '.join(shas.values())} (sha256 {', '.join(s[:12] for s in shas)}); compute them for "
                            f"it with: {rerun}")
        epoch = epoch_of(scores_name)  # <name>_epoch<E>: from the weights after epoch E, and only those
        if mismatched := [shas[sha] for sha in used if epoch_of(os.path.basename(shas[sha]), bare=True) != epoch]:
            raise GlueError(f"scores '{scores_name}' in {folder} were computed from {mismatched[0]}, which is not "
                            + (f"the checkpoint after epoch {epoch}" if epoch else "the final checkpoint")
                            + f"; compute them for it with: {rerun}")
    name = f"{kind}_scores.safetensors"
    if name not in meta["files"]:
        raise GlueError(f"scores '{scores_name}' in {folder} have no {kind} scores; rerun: {rerun}"
                        + (" --compute_self_scores" if kind == "self" else ""))
    scores = load_file(os.path.join(folder, name))["all_modules"].float().numpy().copy()  # not a view of the file
    return scores, meta
