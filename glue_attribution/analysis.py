"""An analysis, as analyze.py runs it: the checkpoint(s) and their data, then factors and scores of each checkpoint
(an ensemble's members one by one, then combined), published as a score set."""

import logging
from dataclasses import replace

import torch

from . import checkpoints, ensembles, influence, pipeline, results
from .config import AnalysisConfig

logger = logging.getLogger("analyze")


def prepare(config: AnalysisConfig) -> tuple:
    """What an analysis starts from, checked before any work: (config as run, main process?, [(seed, checkpoint
    folder)], train_text, query_text). The same examples, in the same order, as train.py; the queries are the first
    validation ones."""
    pipeline.use_data(config)
    main_process = influence.join_torchrun(config.device)
    config = replace(config, device=pipeline.torch_device(config.device))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.allow_tf32

    # An ensemble (train.py --seed A B ...) is analysed member by member, then combined.
    checkpoints.require_checkpoint(config)
    members = checkpoints.checkpoints(config.checkpoint_dir, config.dataset_name, config.ensemble_seeds,
                                      config.checkpoint_epoch)
    influence.check_members(config, members)
    train_text, query_text = pipeline.load_train_and_queries(config.dataset_name, config.data_dir,
                                                             config.max_train_samples, config.max_query_examples,
                                                             config.label_noise, config.label_noise_seed)
    checkpoints.check_checkpoint_data(config, train_text, [folder for _, folder in members])
    config = influence.check_queries(config, len(train_text), len(query_text))
    results.check_writable(config.output_dir)
    return config, main_process, members, train_text, query_text


def analyze(config: AnalysisConfig) -> tuple | None:
    """Publishes the score set of `config` (reused when already there). Returns (config as run, scores name,
    [(seed, checkpoint folder)], member score names, train_text, query_text); None on the other processes of a
    torchrun launch, and on a shard of a gradient index while other shards' chunks are missing."""
    config, main_process, members, train_text, query_text = prepare(config)
    epoch = "" if config.checkpoint_epoch is None else f"_{checkpoints.epoch_member(config.checkpoint_epoch)}"
    names = [influence.analyze_checkpoint(config, checkpoint_dir,
                                          epoch if seed is None else f"_{checkpoints.member(seed)}",
                                          train_text, query_text, main_process) for seed, checkpoint_dir in members]
    influence.leave_torchrun()
    if not main_process:
        return None
    if None in names:  # a shard of a gradient index: the last shard to finish merges it and scores
        logger.info("This shard's part of the gradient index is done; rerun once every shard has finished")
        return None
    scores_name = names[0]
    if members[0][0] is not None:
        scores_name, _ = ensembles.publish_ensemble(
            config.output_dir, config.dataset_name, influence.influence_arguments(config)[2],
            [(seed, name) for (seed, _), name in zip(members, names)], config.overwrite)
        logger.info("Ensemble of %d checkpoints (seeds %s): %s", len(members), " ".join(str(s) for s, _ in members),
                    scores_name)
    return config, scores_name, members, names, train_text, query_text


def answer_new_queries(config: AnalysisConfig) -> str:
    """The most influential training examples of new texts (config.query_text or config.query_file) from the
    gradient index already built for `config` (an ensemble's first member's); returns the JSON file they are
    written to."""
    config, _, members, train_text, _ = prepare(config)
    return influence.answer_new_queries(config, members[0], train_text)
