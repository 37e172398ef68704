#!/usr/bin/env bash
# Everything this project measures on a GPU, in one run (planned for under 10 minutes on one H100; see README):
#  1. the half-precision row of the CPU-scale LDS table: ekfac scores of the SST-2 512 x 100 MiniLM checkpoint
#     (README, "Influence scores") in bf16, and in fp32 on the same GPU to tell precision from device, written to
#     their own output folder; score them against the CPU ground truth on any machine with
#     `evaluate_lds.py score ... --output_dir runs/influence_results_gpu --lds_dir <ground truth>
#     --strategies ekfac_half ekfac_gpu`;
#  2. the analysis benchmark at bert-base shape (real SST-2, 4096 train x 175 queries), bf16, then fp32 with TF32.
#
#   bash benchmarks/gpu_checks.sh [checkpoint_dir] [data_dir] [output_dir]
set -euo pipefail
CHECKPOINTS=${1:-runs/checkpoints}
DATA=${2:-../shared/glue_data}
OUTPUT=${3:-runs/influence_results_gpu}

step() { echo "== $(date +%T) $*"; "$@"; }  # timestamps locate a slow or stuck step in the log

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
A="--dataset_name sst2 --data_dir $DATA --max_train_samples 512 --max_seq_length 64 --checkpoint_dir $CHECKPOINTS
   --output_dir $OUTPUT --max_query_examples 100 --query_batch_size 100 --train_batch_size 64 --factor_batch_size 64
   --factor_strategy ekfac"
step python analyze.py $A --use_half_precision
step python analyze.py $A --scores_name ekfac_gpu

B="--device cuda --model bert-base --num_train 4096 --num_query 175 --train_batch_size 128 --data_dir $DATA"
step python benchmarks/bench_analysis.py $B --use_half_precision
step python benchmarks/bench_analysis.py $B --allow_tf32
