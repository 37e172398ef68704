"""Fine-tuning a checkpoint, as train.py does: the data read and checked, the recipe run once per seed (an
ensemble's members), metrics, training margins and label noise saved with each checkpoint."""

import logging
import os
import time
from dataclasses import replace

import numpy as np

from . import checkpoints, pipeline, progress, results
from .config import TrainRunConfig, train_config

logger = logging.getLogger("train")


def train(config: TrainRunConfig) -> list:
    """Trains (or, for an ensemble's members already there, reuses) the checkpoint(s) of `config`; returns their
    folders: <checkpoint_dir>/<dataset_name>/ for one seed, seed<S>/ below it for several."""
    config = replace(config, device=pipeline.torch_device(config.device))
    if config.data_dir is not None:  # recorded as an absolute path: later scripts run from anywhere read the same data
        config = replace(config, data_dir=os.path.abspath(config.data_dir))
    pipeline.use_data(config)
    trained = []
    task = pipeline.get_task(config.dataset_name)
    members = checkpoints.checkpoint_destinations(config.checkpoint_dir, config.dataset_name,
                                                  config.seed if isinstance(config.seed, list) else [config.seed])
    results.check_writable(config.checkpoint_dir)  # fail now, not after training

    # Data: every split is read and checked before the first training step.
    tokenizer = pipeline.load_tokenizer(config.model_name_or_path)
    collate = pipeline.collator(tokenizer)
    train_text, flips = pipeline.load_training_set(config.dataset_name, config.data_dir, config.max_train_samples,
                                                   config.label_noise, config.label_noise_seed)
    train_dataset = pipeline.tokenize(train_text, config.dataset_name, tokenizer, config.max_seq_length,
                                      config.pad_to_max_length)
    eval_text = {split: pipeline.load_glue(config.dataset_name, split, config.data_dir, config.max_eval_samples)
                 for split in task.eval_splits}
    eval_datasets = {split: pipeline.tokenize(text, config.dataset_name, tokenizer, config.max_seq_length,
                                              config.pad_to_max_length) for split, text in eval_text.items()}
    # Each split's source and fingerprint: later scripts refuse to pair this model with other training data.
    data = {split: pipeline.split_record(config.dataset_name, split, config.data_dir, text)
            for split, text in {"train": train_text, **eval_text}.items()}
    recipe = train_config(config)
    if flips:
        logger.info("Label noise: flipped %d of %d training labels (recorded in label_noise.json)", len(flips),
                    len(train_text))

    for seed, checkpoint_dir in members:
        recorded = replace(config, seed=seed).to_dict()  # each checkpoint records its own seed
        if len(members) > 1 and checkpoints.trained_member(checkpoint_dir, recorded):
            logger.info("Reusing checkpoint %s (seed %d)", checkpoint_dir, seed)
            trained.append(checkpoint_dir)
            continue
        logger.info("***** Running training *****")
        logger.info("  Task = %s, examples = %d, epochs = %d, batch size = %d, steps = %d, seed = %d, device = %s",
                    config.dataset_name, len(train_dataset), recipe.num_train_epochs, recipe.train_batch_size,
                    recipe.num_train_epochs * (len(train_dataset) // recipe.train_batch_size), seed, config.device)
        progress.stage(f"training (seed {seed})", checkpoint_dir)
        start = time.time()
        margins_seen = None if task.is_regression else np.full((recipe.num_train_epochs, len(train_dataset)), np.nan)
        epochs = {}  # the weights after each epoch but the last (self-influence along training)
        model = pipeline.finetune(config.model_name_or_path, config.dataset_name, train_dataset, collate, recipe,
                                  seed=seed, device=config.device, margins_seen=margins_seen,
                                  on_epoch_end=pipeline.keep_weights(epochs) if config.save_epoch_checkpoints else None)
        # Train metrics on the same examples in dataset order (the seed's `eval_train` split).
        named = {"train": train_dataset, **{"eval" + s[len("validation"):]: d for s, d in eval_datasets.items()}}
        metrics = {"train_runtime": time.time() - start,
                   **pipeline.evaluate_splits(model, named, collate, config.dataset_name, config.eval_batch_size,
                                              config.device, config.bf16)}
        for key, value in metrics.items():
            logger.info("  %s = %s", key, value)

        meta = {"task": config.dataset_name, "num_labels": task.num_labels, "args": recorded, "data": data,
                "metrics": metrics}
        if config.train_file is not None:  # your own data, by content: a changed file is another training set
            meta["data_files"] = {path: results.file_sha256(path) for path in (config.train_file,
                                                                               config.validation_file)}
        extra = {} if margins_seen is None else {checkpoints.TRAINING_MARGINS: pipeline.margins_json(margins_seen)}
        if flips:
            extra["label_noise.json"] = {"fraction": config.label_noise, "seed": config.label_noise_seed,
                                         "flipped": [{"index": i, "label": y, "noisy_label": z} for i, y, z in flips]}
        checkpoints.save_checkpoint(model, tokenizer, checkpoint_dir, meta, extra=extra, epochs=epochs)
        logger.info("Saved checkpoint to %s", checkpoint_dir)
        del model  # one model in memory at a time
        trained.append(checkpoint_dir)
    return trained
