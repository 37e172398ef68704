"""The strongest label-error candidates of a whole training set: high self-influence (an example the model can only
fit by memorising it) and a low area under the margin (its assigned label kept losing during training), combined by
the mean of their two ranks. Prints a Markdown table and writes it as JSON beside the scores.

    python benchmarks/label_errors.py --output_dir runs/full_results --scores_name ekfac_index_k16 \
        --checkpoint_dir runs/full --top 30
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pipeline  # noqa: E402
from glue_attribution import cli, detection, results, scores  # noqa: E402
from glue_attribution.config import DetectionConfig  # noqa: E402


def ranks(suspicion: np.ndarray) -> np.ndarray:
    """1 = most suspicious; NaN (never seen in training) last."""
    order = np.argsort(-np.nan_to_num(suspicion, nan=-np.inf), kind="stable")
    out = np.empty(len(order), dtype=int)
    out[order] = np.arange(1, len(order) + 1)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_name", default="sst2")
    parser.add_argument("--output_dir", required=True, help="analyze.py's --output_dir")
    parser.add_argument("--scores_name", required=True, help="A score set with self-influence (e.g. an index's)")
    parser.add_argument("--checkpoint_dir", required=True, help="train.py's --checkpoint_dir (training margins)")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()

    self_scores, meta = scores.load_scores(args.output_dir, args.dataset_name, args.scores_name, kind="self")
    saved = meta["args"]
    train, _ = pipeline.load_training_set(args.dataset_name, saved["data_dir"], saved["max_train_samples"],
                                          saved.get("label_noise", 0), saved.get("label_noise_seed", 0))
    margins = detection.training_margins(DetectionConfig(checkpoint_dir=args.checkpoint_dir,
                                                         dataset_name=args.dataset_name))
    aum = detection.aum_suspicion(margins)
    self_rank, aum_rank = ranks(self_scores), ranks(aum)
    combined = np.argsort((self_rank + aum_rank) / 2, kind="stable")[:args.top]
    task = pipeline.get_task(args.dataset_name)
    rows = [{"index": int(j), "label": task.label_name(train[int(j)]["label"]),
             "self_influence_rank": int(self_rank[j]), "aum": float(-aum[j]),
             "text": " / ".join(train[int(j)][k] for k in task.keys)} for j in combined]
    print(f"| # | train index | label | self-influence rank (of {len(train):,}) | AUM | text |")
    print("| ---: | ---: | --- | ---: | ---: | --- |")
    for i, row in enumerate(rows, 1):
        print(f"| {i} | {row['index']} | {row['label']} | {row['self_influence_rank']} | {row['aum']:.2f} | "
              f"{row['text'].replace('|', '/')} |")
    overlap = len(set(np.argsort(self_rank)[:args.top * 10]) & set(np.argsort(aum_rank)[:args.top * 10]))
    folder = scores.scores_dir(args.output_dir, args.dataset_name, args.scores_name)
    path = os.path.join(folder, "..", f"label_errors_{args.scores_name}.json")
    results.atomic_write_json({"scores_name": args.scores_name, "candidates": rows,
                               f"overlap_of_top_{args.top * 10}": overlap}, os.path.normpath(path))
    print(f"\nTop {args.top * 10} by self-influence and by AUM share {overlap} examples; written to "
          f"{os.path.normpath(path)}")


if __name__ == "__main__":
    cli.run(main)
