"""Linear datamodeling score (LDS): how well influence scores predict what retraining on random subsets does.

The ground truth: the model retrained on `num_masks` random subsets of the training set (each keeping exactly
`subset_fraction` of it), `num_repeats` times each with the train.py recipe, every query's margin recorded. Each
retrain is one small file (runs/mask<m>_repeat<r>.npz), so a killed build redoes only what is missing; margins.npy
(averaged over repeats) and ground_truth.json seal the folder once every run is there.

The statistics: per query, the Spearman correlation over masks between its margin and the sum of its scores over the
kept examples; the LDS is the mean over queries, with its standard error over queries, a 95% bootstrap interval over
masks, and paired differences against a reference set (same queries, same resamples).
"""

import json
import logging
import os

import numpy as np
from scipy.stats import rankdata
from tqdm.auto import tqdm

from . import pipeline, progress, results, sweeps
from .checkpoints import check_checkpoint_data, member, member_seeds, trained_checkpoints
from .config import DATA_DEFAULTS, OWN_DATA_KEYS, RECIPE_DEFAULTS
from .ensembles import combine
from .errors import GlueError, ResultDamaged, ResultMissing
from .failpoints import failpoint
from .scores import analyze_command, load_scores, source_of

logger = logging.getLogger(__name__)
BASELINE_SCORES = ("same-label", "label", "random")
GROUND_TRUTH_META = "ground_truth.json"
MAX_REPEATS = 1000  # run seeds are seed + MAX_REPEATS * mask + repeat, distinct while repeats stay below this
TARGET_STRATUM = 10  # regression --stratify_masks: strata of this many training examples adjacent in target order


# ----------------------------------------------------------------------------------------------------------------------
# Ground truth

def ground_truth_arguments(config) -> dict:
    """Everything that changes the ground truth (not the device or sharding): names its folder, guards reuse."""
    return {"dataset_name": config.dataset_name, "data_dir": config.data_dir,
            "model_name_or_path": config.model_name_or_path,
            "max_seq_length": config.max_seq_length, "pad_to_max_length": config.pad_to_max_length,
            "max_train_samples": pipeline.train_size(config.dataset_name, config.max_train_samples),
            "max_query_examples": config.max_query_examples, "num_masks": config.num_masks,
            "subset_fraction": config.subset_fraction, "num_repeats": config.num_repeats,
            "stratify_masks": config.stratify_masks, "seed": config.seed,
            # A recipe flag added later counts only when set, so that older ground truths keep their names.
            "recipe": {key: getattr(config, key) for key in RECIPE_DEFAULTS
                       if key != "group_by_length" or config.group_by_length},
            # Your own data files, only when given: GLUE ground truths keep their names.
            **{key: getattr(config, key) for key in OWN_DATA_KEYS if getattr(config, key, None) is not None},
            # Only when set, so that the ground truths built before label noise existed keep their names.
            **({"label_noise": config.label_noise, "label_noise_seed": config.label_noise_seed}
               if config.label_noise else {})}


def ground_truth_dir(config) -> str:
    """--lds_dir, or <output_dir>/<task>/lds_<digest of the ground truth's arguments>."""
    if config.lds_dir is not None:
        return config.lds_dir
    return results.experiment_dir(os.path.join(config.output_dir, config.dataset_name), "lds",
                                  ground_truth_arguments(config))


def claim_ground_truth(config) -> str:
    """The ground truth's folder, recording its arguments there (a folder built with other arguments is refused)."""
    if not 1 <= config.num_repeats < MAX_REPEATS:
        raise GlueError(f"--num_repeats must be in [1, {MAX_REPEATS}), got {config.num_repeats}")
    folder = ground_truth_dir(config)
    results.claim_experiment(folder, ground_truth_arguments(config), keep_both="another --lds_dir")
    return folder


def make_masks(num_train: int, num_masks: int, fraction: float, seed: int, labels=None,
               ordered: bool = False) -> np.ndarray:
    """(num_masks, num_train) int8 rows keeping exactly round(fraction * n) examples; with `labels`, exactly
    round(fraction * n_c) of each class c. `ordered` labels are bins in target order (`mask_strata`): bin c keeps
    round(fraction * the examples in bins up to c) minus what the bins before it keep, so the total stays exact
    and each bin keeps within one of its share at any fraction."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(num_train, dtype=int) if labels is None else np.asarray(labels)
    strata = np.unique(labels)
    sizes = np.array([np.count_nonzero(labels == label) for label in strata])
    quotas = np.diff(np.round(fraction * np.cumsum(sizes)), prepend=0) if ordered else np.round(fraction * sizes)
    masks = np.zeros((num_masks, num_train), dtype=np.int8)
    for mask in masks:
        for label, quota in zip(strata, quotas.astype(int)):
            mask[rng.permutation(np.flatnonzero(labels == label))[:quota]] = 1
    return masks


def mask_strata(labels, is_regression: bool) -> np.ndarray:
    """What --stratify_masks balances: the classes, or for regression runs of TARGET_STRATUM training examples
    adjacent in target order, so that the kept examples' mean target (which a regression model's predictions follow,
    whatever the examples say) barely moves between masks."""
    labels = np.asarray(labels)
    if not is_regression:
        return labels
    strata = np.empty(len(labels), dtype=int)
    strata[np.argsort(labels, kind="stable")] = np.arange(len(labels)) // TARGET_STRATUM
    return strata


def run_seed(seed: int, mask: int, repeat: int) -> int:
    return seed + MAX_REPEATS * mask + repeat


def run_path(folder: str, mask: int, repeat: int) -> str:
    return os.path.join(folder, "runs", f"mask{mask:04d}_repeat{repeat:03d}.npz")


def save_npy(path: str, array: np.ndarray) -> None:
    with results.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def load_or_make_masks(folder: str, config, train_labels) -> np.ndarray:
    """The folder's masks; the first process to get here draws and saves them (every shard draws the same, so a
    damaged file is simply drawn again)."""
    path = os.path.join(folder, "masks.npy")
    regression = pipeline.get_task(config.dataset_name).is_regression
    masks = make_masks(len(train_labels), config.num_masks, config.subset_fraction, config.seed,
                       mask_strata(train_labels, regression) if config.stratify_masks else None, ordered=regression)
    try:
        if np.array_equal(np.load(path, allow_pickle=False), masks):
            return masks
        logger.warning("%s differs from the masks these arguments draw; redrawing it", path)
    except (OSError, ValueError, EOFError):
        pass
    save_npy(path, masks)
    return masks


def signature(config) -> str:
    """The ground truth's signature (the digest naming its folder), recorded in each of its run files."""
    return results.digest(ground_truth_arguments(config))


def repair_command(folder: str) -> str:
    """The one command that repairs a ground truth: only `build` writes in it."""
    return f"python evaluate_lds.py build --lds_dir {folder}"


def run_problem(run: dict, config, mask: int, repeat: int) -> str | None:
    """Why a run file is not this ground truth's (mask, repeat) retrain, or None. A run file records its mask, repeat,
    seed and the ground truth's signature; one written before they were recorded (a legacy file: margins, correct and
    seed) is checked on what it has: its seed, which names the build's --seed, the mask and the repeat."""
    if "seed" not in run or int(run["seed"]) != run_seed(config.seed, mask, repeat):
        return "a retrain with another seed (another build's run, or another mask or repeat)"
    if "ground_truth" in run and (str(run["ground_truth"]) != signature(config) or int(run["mask"]) != mask
                                  or int(run["repeat"]) != repeat):
        return "a run of another ground truth (its recorded signature, mask or repeat differ)"
    return None


def load_retrain(folder: str, mask: int, repeat: int, num_query: int, config, owner: bool = True,
                 sealed: dict | None = None) -> dict | None:
    """A finished retrain's margins and correct flags, verified (None if missing). The build (`owner`) deletes a
    damaged or foreign file, or one whose sha256 differs from the `sealed` manifest, so that it is redone; a consumer
    raises one line naming the file and the command that repairs it, and deletes nothing."""
    path = run_path(folder, mask, repeat)
    try:
        run = results.load_run(path, {"margins": (num_query,)}, owner=owner)
    except ResultDamaged as err:
        raise GlueError(f"{err}, in the sealed ground truth {folder}; repair it with: "
                        f"{repair_command(folder)}") from None
    if run is None:
        return None
    relative = os.path.relpath(path, folder)
    problem = run_problem(run, config, mask, repeat)
    if problem is None and sealed and relative in sealed and results.file_sha256(path) != sealed[relative]["sha256"]:
        problem = "changed since the ground truth was sealed (its sha256 differs)"
    if problem is None:
        return run
    if not owner:
        raise GlueError(f"{path} is {problem}, in the sealed ground truth {folder}; repair it with: "
                        f"{repair_command(folder)}")
    logger.warning("%s is %s; deleting it so that it is redone", path, problem)
    os.remove(path)
    return None


def sealed_manifest(folder: str) -> dict:
    """The files ground_truth.json lists, read without verifying ({} when there is none): what `build` checks each
    run file against before trusting it."""
    try:
        with open(os.path.join(folder, GROUND_TRUTH_META)) as f:
            files = json.load(f).get("files", {})
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def reuse_sealed(folder: str, config, provenance: dict) -> bool:
    """True when the folder holds a sealed ground truth that verifies: every file in its manifest (the run files
    too, since they are listed) and every run's recorded mask, repeat, seed and signature; for a ground truth sealed
    before the runs were listed, also that the runs average to its margins.npy. Then `build` has nothing to do."""
    try:
        results.read(folder, GROUND_TRUTH_META, "LDS ground truth", provenance)  # other data: refused
    except ResultMissing:
        return False
    except ResultDamaged as err:
        logger.warning("%s: repairing it", err)
        return False
    try:
        return load_repeat_margins(folder, config, provenance["num_query"], all_repeats=True) is not None
    except GlueError as err:
        logger.warning("%s: repairing it", str(err).split("; repair it with")[0])
        return False


def retrain_runs(folder: str, config, masks: np.ndarray, train_text, query_text) -> None:
    """Retrains this shard's missing, damaged or foreign (mask, repeat) runs, saving each as it ends."""
    runs = [(m, r) for m in range(config.num_masks) for r in range(config.num_repeats)]
    mine = sweeps.shard(runs, config.shard_index, config.num_shards)
    sealed = sealed_manifest(folder)
    pending = [(m, r) for m, r in mine if load_retrain(folder, m, r, len(query_text), config, sealed=sealed) is None]
    logger.info("***** Building LDS ground truth in %s *****", folder)
    logger.info("  Runs = %d (%d masks x %d repeats), this shard = %d, already done = %d, keep %d of %d examples",
                len(runs), config.num_masks, config.num_repeats, len(mine), len(mine) - len(pending),
                int(masks[0].sum()), masks.shape[1])
    if not pending:
        return
    retrain = sweeps.retrainer(config, train_text, query_text)
    os.makedirs(os.path.join(folder, "runs"), exist_ok=True)
    progress.stage("the LDS retrains", folder)
    # Claimed one by one: a second identical command (or shard) retrains the runs this one has not started.
    done_here = 0
    claimed = sweeps.claimed(pending, lambda run: os.path.join(folder, os.path.basename(run_path(folder, *run))),
                             lambda run: load_retrain(folder, *run, len(query_text), config) is not None)
    with tqdm(claimed, total=len(pending), desc=f"Retrains (shard {config.shard_index}/{config.num_shards})",
              unit="run") as bar:
        for m, r in bar:
            seed = run_seed(config.seed, m, r)
            result = retrain(np.flatnonzero(masks[m]), seed)
            results.save_arrays(run_path(folder, m, r), **result, seed=np.array(seed), mask=np.array(m),
                                repeat=np.array(r), ground_truth=np.array(signature(config)))
            failpoint("lds_run_saved")
            done_here += 1
            if "correct" in result:  # classification
                bar.set_postfix(query_acc=f"{result['correct'].mean():.3f}")
    logger.info("Retrained %d runs here; %d by another process", done_here, len(pending) - done_here)


def merge_runs(folder: str, config, provenance: dict) -> bool:
    """Averages the runs over repeats into margins.npy once all are present and sound, and seals the folder with
    ground_truth.json (summary, provenance, sha256 of masks and margins); False if runs are missing."""
    with results.lock(folder):  # the last two shards may finish together
        # --merge_only retrained nothing: its runs are also checked against the seal they would replace.
        sealed = sealed_manifest(folder) if config.merge_only else None
        runs = [[load_retrain(folder, m, r, provenance["num_query"], config, sealed=sealed)
                 for r in range(config.num_repeats)] for m in range(config.num_masks)]
        missing = sum(run is None for row in runs for run in row)
        if missing:
            logger.info("%d of %d runs missing; rerun (or `build --merge_only`) once every shard has finished",
                        missing, config.num_masks * config.num_repeats)
            return False
        margins = np.stack([[run["margins"] for run in row] for row in runs])  # (masks, repeats, queries)
        correct = [run["correct"] for row in runs for run in row if "correct" in run]  # none for regression
        summary = {"num_runs": int(margins.shape[0] * margins.shape[1]),
                   "query_accuracy": float(np.mean(correct)) if correct else None,
                   # How reproducible one retrain is: over masks, Spearman between two seeds' margins, mean over
                   # queries.
                   "repeat_spearman": (float(spearman_rows(margins[:, 0].T, margins[:, 1].T).mean())
                                       if config.num_repeats > 1 else None)}
        save_npy(os.path.join(folder, "margins.npy"), margins.mean(axis=1))
        # The run files are sealed with it: a consumer verifies them, and a rerun of `build` reuses it as it is.
        results.seal(folder, GROUND_TRUTH_META, {**summary, "provenance": provenance},
                     files=["masks.npy", "margins.npy", *(os.path.relpath(run_path(folder, m, r), folder)
                                                          for m in range(config.num_masks)
                                                          for r in range(config.num_repeats))])
    logger.info("Merged %d runs into %s: %s", summary["num_runs"], os.path.join(folder, "margins.npy"), summary)
    return True


# ----------------------------------------------------------------------------------------------------------------------
# Scoring

def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of `a` with the same row of `b`. A constant row (e.g. the same-label score
    under stratified masks) predicts no difference between masks: its correlation counts as 0."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    numerator = (a * b).sum(axis=1)
    denominator = np.sqrt((a**2).sum(axis=1) * (b**2).sum(axis=1))
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return pearson_rows(rankdata(a, axis=1), rankdata(b, axis=1))


def load_ground_truth(config, provenance: dict) -> tuple:
    """(folder, masks (num_masks, n_train), margins (num_masks, n_query), summary) of a finished, verified build
    on this data."""
    folder = ground_truth_dir(config)
    try:
        summary = results.read(folder, GROUND_TRUTH_META, "LDS ground truth", provenance)
    except ResultMissing:
        raise GlueError(f"no finished LDS ground truth in {folder}; build it with: python evaluate_lds.py build "
                        "(with the same flags as this command)") from None
    except ResultDamaged as err:
        raise GlueError(f"{err}; repair it with: {repair_command(folder)} (finished retrains are kept)") from None
    results.claim_experiment(folder, ground_truth_arguments(config), keep_both="another --lds_dir")  # same arguments
    masks = np.load(os.path.join(folder, "masks.npy"), allow_pickle=False)
    return folder, masks, np.load(os.path.join(folder, "margins.npy"), allow_pickle=False), summary


def baseline_scores(config, train_labels, query_labels) -> dict:
    """Reference rows: `same-label` (+1 for training examples with the query's true label, -1 otherwise; what a
    ground truth that only counts kept examples per class rewards), for regression `label` (each training example's
    target, for every query; what a ground truth that only follows the kept examples' mean target rewards), and
    `random` (seeded Gaussian scores, LDS ~0)."""
    train_labels, query_labels = np.asarray(train_labels), np.asarray(query_labels)
    rng = np.random.default_rng(config.seed)
    baselines = {"random": rng.standard_normal((len(query_labels), len(train_labels)), dtype=np.float32)}
    if pipeline.get_task(config.dataset_name).is_regression:
        baselines["label"] = np.broadcast_to(train_labels.astype(np.float32), (len(query_labels), len(train_labels)))
    else:
        baselines["same-label"] = np.where(query_labels[:, None] == train_labels[None, :], 1, -1).astype(np.float32)
    return {name: baselines[name] for name in BASELINE_SCORES if name in baselines}


def lds_per_query(scores: np.ndarray, masks: np.ndarray, margin_ranks: np.ndarray) -> np.ndarray:
    """Each query's Spearman, over masks, between its margin and the sum of its scores over the kept examples."""
    return pearson_rows(rankdata(scores.astype(np.float64) @ masks.T.astype(np.float64), axis=1), margin_ranks)


def ceiling_per_query(repeat_ranks: list, picks=slice(None)) -> np.ndarray:
    """Each query's noise ceiling: the highest Spearman any attributor can reach against the averaged ground truth.

    One retrain's reliability r is the mean, over pairs of repeats, of their Spearman over masks; the average of R
    repeats has reliability R r / (1 + (R - 1) r) (Spearman-Brown), and a correlation with a measurement of
    reliability rho is at most sqrt(rho). `repeat_ranks`: per repeat, its margins' ranks (queries, masks).
    """
    pairs = [(i, j) for i in range(len(repeat_ranks)) for j in range(i + 1, len(repeat_ranks))]
    single = np.mean([pearson_rows(repeat_ranks[i][:, picks], repeat_ranks[j][:, picks]) for i, j in pairs], axis=0)
    single = np.clip(single, 0, 1)  # repeats that disagree more than chance: no reproducible signal
    repeats = len(repeat_ranks)
    return np.sqrt(repeats * single / (1 + (repeats - 1) * single))


def lds_table(scores: dict, masks: np.ndarray, margins: np.ndarray, num_bootstrap: int, seed: int,
              reference: str | None = None, repeat_margins: np.ndarray | None = None) -> dict:
    """Per score set: LDS (mean over queries), its standard error over queries, a 95% bootstrap interval over masks,
    and the paired difference against the `reference` set (same queries, same mask resamples). With the per-repeat
    margins (masks, repeats, queries), also the LDS as a fraction of the noise ceiling (`ceiling_per_query`), with
    its interval over the same resamples."""
    # Spearman = Pearson of ranks. The bootstrap resamples masks and keeps each mask's rank in the full set:
    # re-ranking a resample ties its duplicated masks, which biases the interval away from the estimate.
    margin_ranks = rankdata(margins.T, axis=1)  # (queries, masks)
    ranks = {name: rankdata(s.astype(np.float64) @ masks.T.astype(np.float64), axis=1) for name, s in scores.items()}
    per_query = {name: pearson_rows(r, margin_ranks) for name, r in ranks.items()}
    repeat_ranks = (None if repeat_margins is None else
                    [rankdata(repeat_margins[:, i].T, axis=1) for i in range(repeat_margins.shape[1])])
    rng = np.random.default_rng(seed)
    boot = {name: np.empty(num_bootstrap) for name in scores}
    boot_ceiling = np.empty(num_bootstrap)
    for b in range(num_bootstrap):
        picks = rng.integers(0, masks.shape[0], masks.shape[0])
        for name, r in ranks.items():
            boot[name][b] = pearson_rows(r[:, picks], margin_ranks[:, picks]).mean()
        if repeat_ranks is not None:
            boot_ceiling[b] = ceiling_per_query(repeat_ranks, picks).mean()

    def summary(values, resampled):
        return {"mean": float(values.mean()), "se_queries": float(values.std(ddof=1) / np.sqrt(len(values))),
                "ci95_masks": [float(x) for x in np.percentile(resampled, [2.5, 97.5])]}

    table = {}
    for name in scores:
        table[name] = {**summary(per_query[name], boot[name]), "per_query": per_query[name].tolist()}
        if reference in scores and name != reference:
            table[name]["versus"] = {"reference": reference, **summary(per_query[name] - per_query[reference],
                                                                       boot[name] - boot[reference])}
        if repeat_ranks is not None:
            ceiling = ceiling_per_query(repeat_ranks).mean()
            # A resample whose ceiling is 0 (no reproducible signal at all) has no fraction: left out.
            fractions = boot[name][boot_ceiling > 0] / boot_ceiling[boot_ceiling > 0]
            table[name]["fraction_of_ceiling"] = {
                "mean": float(per_query[name].mean() / ceiling) if ceiling > 0 else None,
                "ci95_masks": [float(x) for x in np.percentile(fractions, [2.5, 97.5])] if len(fractions) else None}
    return table


def noise_ceiling(repeat_margins: np.ndarray, num_bootstrap: int, seed: int) -> dict:
    """The ground truth's noise ceiling (mean over queries of `ceiling_per_query`) with a 95% bootstrap interval over
    masks (the resamples of `lds_table` with the same seed), and the single-retrain reliability it rests on."""
    repeat_ranks = [rankdata(repeat_margins[:, i].T, axis=1) for i in range(repeat_margins.shape[1])]
    rng = np.random.default_rng(seed)
    boot = [ceiling_per_query(repeat_ranks, rng.integers(0, len(repeat_margins), len(repeat_margins))).mean()
            for _ in range(num_bootstrap)]
    return {"mean": float(ceiling_per_query(repeat_ranks).mean()),
            "ci95_masks": [float(x) for x in np.percentile(boot, [2.5, 97.5])],
            "num_repeats": int(repeat_margins.shape[1])}


def load_repeat_margins(folder: str, config, num_query: int, all_repeats: bool = False) -> np.ndarray | None:
    """Every retrain's margins, (masks, repeats, queries), from a sealed ground truth's runs, each verified; None
    with one repeat (no ceiling can be estimated then) unless `all_repeats`, or when a run file is missing (only from
    a ground truth sealed before its runs were listed: for a later one `load_ground_truth` has refused it already);
    the log then names the file and the command that restores it.

    Raises:
        GlueError: a run is damaged or foreign, or the runs do not average to the sealed margins.npy; the line names
            it and the `build` command that repairs it (a consumer never deletes or rewrites anything).
    """
    if config.num_repeats < 2 and not all_repeats:
        return None
    runs = [[load_retrain(folder, m, r, num_query, config, owner=False) for r in range(config.num_repeats)]
            for m in range(config.num_masks)]
    missing = [run_path(folder, m, r) for m, row in enumerate(runs) for r, run in enumerate(row) if run is None]
    if missing:
        logger.warning("%s%s is missing from the ground truth in %s%s; restore it with: %s",
                       "" if all_repeats else "No noise ceiling: ", missing[0], folder,
                       f" (and {len(missing) - 1} more runs)" if len(missing) > 1 else "", repair_command(folder))
        return None
    repeats = np.stack([[run["margins"] for run in row] for row in runs])
    sealed = np.load(os.path.join(folder, "margins.npy"), allow_pickle=False)
    if not np.allclose(repeats.mean(axis=1), sealed):
        raise GlueError(f"the runs in {folder} do not average to its sealed margins.npy; repair it with: "
                        f"{repair_command(folder)}")
    return repeats


def load_data(config) -> tuple:
    """(train_text, query_text, provenance): the examples the ground truth covers, as analyze.py scored them."""
    train_text, query_text = pipeline.load_train_and_queries(config.dataset_name, config.data_dir,
                                                             config.max_train_samples,
                                                             config.max_query_examples, config.label_noise,
                                                             config.label_noise_seed)
    check_checkpoint_data(config, train_text)
    return train_text, query_text, pipeline.data_provenance(config.dataset_name, train_text, query_text,
                                                            config.max_seq_length)


def data_and_ground_truth(config) -> tuple:
    """(train_text, query_text, provenance, (folder, masks, margins, summary)): what every score set is checked
    against, and the verified ground truth built on it."""
    train_text, query_text, provenance = load_data(config)
    return train_text, query_text, provenance, load_ground_truth(config, provenance)


def recipe_differences(config) -> dict:
    """{field: {"checkpoint": value, "ground_truth": value}} for each data or recipe flag (the data itself is compared
    by fingerprint) with which the ground truth was built otherwise than the checkpoint being scored was trained; {}
    without a checkpoint."""
    if config.configured_by is None or not os.path.isfile(config.configured_by):
        return {}
    saved = results.read_json(config.configured_by, "retrain it with train.py").get("args", {})
    trained = {**DATA_DEFAULTS, **RECIPE_DEFAULTS, **saved}
    trained["max_train_samples"] = pipeline.train_size(config.dataset_name, trained["max_train_samples"])
    built = ground_truth_arguments(config)
    built = {"label_noise": 0.0, "label_noise_seed": 0, "group_by_length": False, **dict.fromkeys(OWN_DATA_KEYS),
             **built, **built["recipe"]}
    if built["text_columns"] is not None:  # a tuple here, a list in the checkpoint's JSON
        built["text_columns"] = list(built["text_columns"])
    return {key: {"checkpoint": trained[key], "ground_truth": built[key]}
            for key in (*DATA_DEFAULTS, *RECIPE_DEFAULTS) if key != "data_dir" and trained[key] != built[key]}


def warn_recipe_differences(differences: dict, folder: str, checkpoint: str) -> None:
    """One line: the scores explain the checkpoint's model, the ground truth retrains another recipe."""
    if differences:
        logger.warning("the ground truth in %s was built with another %s than the checkpoint at %s was trained with "
                       "(%s); its LDS measures how well these scores predict retrains of the ground truth's recipe "
                       "(recorded in lds_results.json as recipe_differences)", folder, ", ".join(differences),
                       os.path.dirname(checkpoint), "; ".join(f"{k} {v['checkpoint']} vs {v['ground_truth']}"
                                                              for k, v in differences.items()))


def checkpoint_results_dir(folder: str, checkpoints: tuple | None) -> str | None:
    """Where the LDS of one checkpoint's scores goes in a ground truth shared by several checkpoints:
    <folder>/by_checkpoint/<digest of its models' sha256>/, side by side (None without a checkpoint)."""
    if checkpoints is None:
        return None
    return os.path.join(folder, "by_checkpoint", results.digest(sorted(checkpoints[1])))


def reference_set(requested: str | None, names) -> str | None:
    """The set every other is compared with, paired: --reference, else ekfac if scored, else identity."""
    if requested is not None and requested not in names:
        raise GlueError(f"--reference {requested} is not among the scored sets; add it to --strategies")
    return requested or next((n for n in ("ekfac", "identity") if n in names), None)


def table_title(config, masks: np.ndarray, margins: np.ndarray, summary: dict) -> str:
    """The table's title: the ground truth's size, and how good and how reproducible its retrains are."""
    return (f"LDS on {config.dataset_name}: {masks.shape[0]} masks x {config.num_repeats} repeats keeping "
            f"{int(masks[0].sum())} of {masks.shape[1]} examples, {margins.shape[1]} queries"
            + (f"; retrains' query accuracy {summary['query_accuracy']:.3f}"
               if summary["query_accuracy"] is not None else "")
            + (f", seed-to-seed Spearman {summary['repeat_spearman']:.3f}"
               if summary["repeat_spearman"] is not None else ""))


def agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> dict:
    """How alike two score sets on the same queries are: per-query Spearman, overlap of the top-k training examples
    (out of k) and how often the top-1 is the same, each averaged over queries."""
    top_a, top_b = np.argsort(-a, axis=1)[:, :k], np.argsort(-b, axis=1)[:, :k]
    overlap = [len(set(x) & set(y)) for x, y in zip(top_a, top_b)]
    return {"spearman": float(spearman_rows(a, b).mean()), f"top{k}_overlap": float(np.mean(overlap)),
            "top1_same": float(np.mean(top_a[:, 0] == top_b[:, 0]))}


def scored_members(output_dir: str, task_name: str, method: str) -> list:
    """Seeds S of the published member sets <method>_seed<S>, in order."""
    folder = os.path.join(output_dir, task_name)
    names = [name[len("scores_"):] for name in (os.listdir(folder) if os.path.isdir(folder) else [])
             if name.startswith("scores_")]
    return member_seeds(names, method)


def ensemble_curves(config, provenance: dict, masks: np.ndarray, margins: np.ndarray) -> dict:
    """Per method: the seeds of its members and, for 1, 2, 4, ... ensembled models, their LDS (and, with
    --stability_dir, their agreement with the same members computed under other randomness)."""
    margin_ranks = rankdata(margins.T, axis=1)
    checkpoints = trained_checkpoints(config.checkpoint_dir, config.dataset_name)
    curves = {}
    for method in config.strategies:
        seeds = scored_members(config.output_dir, config.dataset_name, method)
        if config.stability_dir is not None:
            seeds = [s for s in seeds if s in scored_members(config.stability_dir, config.dataset_name, method)]
        if not seeds:
            where = os.path.join(config.output_dir, config.dataset_name)
            command = analyze_command(config.output_dir, config.dataset_name, f"{method}_{member(0)}",
                                      config.checkpoint_dir, provenance.get("num_query"))
            raise GlueError(f"no member score sets {method}_{member('<S>')} in {where}"
                            + (f" (and {config.stability_dir})" if config.stability_dir else "")
                            + f"; make them with: {command}")
        members, metas = zip(*(load_scores(config.output_dir, config.dataset_name, f"{method}_{member(seed)}",
                                           provenance,
                                           checkpoints=checkpoints) for seed in seeds))
        seconds = [sum(v for k, v in meta.items() if k.endswith("_seconds")) for meta in metas]
        others = stability_counterparts(config, method, seeds, metas, provenance) if config.stability_dir else None
        rows = curve_rows(members, others, masks, margin_ranks)
        for row in rows:
            row["seconds_per_model"] = float(np.mean(seconds))
        curves[method] = {"seeds": seeds, "rows": rows, "scores": [source_of(meta) for meta in metas]}
    return curves


def stability_counterparts(config, method: str, seeds: list, metas: list, provenance: dict) -> list:
    """The member sets of `method` in --stability_dir: the same checkpoints and data, other randomness."""
    others = []
    for seed, meta in zip(seeds, metas):
        scores, other = load_scores(config.stability_dir, config.dataset_name, f"{method}_{member(seed)}", provenance)
        if other["provenance"].get("checkpoint_sha256") != meta["provenance"].get("checkpoint_sha256"):
            raise GlueError(f"{method}_{member(seed)} in --stability_dir {config.stability_dir} was computed from "
                            "another checkpoint; both folders must analyse the same ensemble")
        if other.get("signature") == meta.get("signature"):
            raise GlueError(f"{method}_{member(seed)} in --stability_dir {config.stability_dir} was computed with the "
                            "same arguments; recompute it there with another analyze.py --seed")
        others.append(scores)
    return others


def curve_rows(members: list, others: list | None, masks: np.ndarray, margin_ranks: np.ndarray) -> list:
    """For 1, 2, 4, ... models: the LDS of each disjoint group of consecutive members, combined; with `others`
    (the same members under other randomness), each group's agreement with its counterpart, averaged."""
    rows = []
    for size in (2**i for i in range(len(members).bit_length())):
        groups = [range(i, i + size) for i in range(0, len(members) - size + 1, size)]
        combined = [combine([members[j] for j in g]) for g in groups]
        lds = [lds_per_query(c, masks, margin_ranks).mean() for c in combined]
        row = {"models": size, "groups": len(groups), "lds_mean": float(np.mean(lds)),
               "lds_sd": float(np.std(lds, ddof=1)) if len(lds) > 1 else None, "lds": [float(x) for x in lds]}
        if others is not None:
            agree = [agreement(c, combine([others[j] for j in g])) for c, g in zip(combined, groups)]
            row["stability"] = {k: float(np.mean([a[k] for a in agree])) for k in agree[0]}
        rows.append(row)
    return rows


