"""Typed configurations, one per concern: what a script builds from its flags (and the checkpoint's) and what the
library takes. A notebook builds them directly: `AnalysisConfig(dataset_name="rte", checkpoint_dir="runs/ckpt")`.

Their fields are the scripts' flags, named and defaulted as there, so a configuration recorded in a result file is
the command line that made it. The library never changes a configuration; a script derives a new one with
`dataclasses.replace`. Light on purpose (the standard library only): the scripts build them before importing torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

# ----------------------------------------------------------------------------------------------------------------------
# Data and model; the fine-tuning recipe


class Configuration:
    """What every configuration does: made from a script's flags, recorded as JSON."""

    @classmethod
    def from_flags(cls, flags: dict):
        """The configuration of a script's parsed flags, `vars(args)` (flags beyond the fields are dropped)."""
        return cls(**{f.name: flags[f.name] for f in fields(cls) if f.name in flags})

    def to_dict(self) -> dict:
        """The fields as JSON (what result files record as "args"); the own-data fields only when set, so results
        made before they existed keep their names."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "task"}
        for key in OWN_DATA_KEYS:
            if values.get(key) is None:
                values.pop(key, None)
        if values.get("text_columns") is not None:
            values["text_columns"] = list(values["text_columns"])
        return values


@dataclass(frozen=True)
class DataConfig(Configuration):
    """The data and the model (names as in HF's run_glue); a checkpoint records them and later scripts read them."""

    dataset_name: str = "sst2"
    data_dir: str | None = None
    model_name_or_path: str = "bert-base-cased"
    max_seq_length: int = 128
    pad_to_max_length: bool = False
    max_train_samples: int | None = None
    label_noise: float = 0.0
    label_noise_seed: int = 0
    # Your own data instead of GLUE: CSV, TSV or JSON lines, with run_glue's column conventions (data.py).
    train_file: str | None = None
    validation_file: str | None = None
    text_columns: tuple | None = None
    device: str = "auto"
    verbose: bool = False


OWN_DATA_KEYS = ("train_file", "validation_file", "text_columns")


@dataclass(frozen=True)
class TrainConfig(Configuration):
    """The fine-tuning recipe; defaults are the seed's (AdamW on all parameters, constant learning rate)."""

    learning_rate: float = 3e-5
    weight_decay: float = 0.01
    num_train_epochs: int = 3
    train_batch_size: int = 32
    lr_scheduler_type: str = "constant"
    warmup_ratio: float = 0.0
    bf16: bool = False
    group_by_length: bool = False  # HF's flag: batches of similar lengths, less padding (~3x faster on SST-2)


DATA_DEFAULTS = {"data_dir": None, "model_name_or_path": "bert-base-cased", "max_seq_length": 128,
                 "pad_to_max_length": False, "max_train_samples": None, "label_noise": 0.0, "label_noise_seed": 0,
                 "train_file": None, "validation_file": None, "text_columns": None}
RECIPE_DEFAULTS = asdict(TrainConfig())
RECIPE_KEYS = (*DATA_DEFAULTS, *RECIPE_DEFAULTS)  # what an ensemble's members share (all but the seed)


def train_config(config) -> TrainConfig:
    """The recipe fields of a configuration (a retraining experiment's) as the `TrainConfig` that `finetune` takes."""
    return TrainConfig(**{key: getattr(config, key) for key in RECIPE_DEFAULTS})


@dataclass(frozen=True)
class TrainRunConfig(TrainConfig, DataConfig):
    """train.py: the data, the recipe, and where the checkpoint goes."""

    seed: Any = 1004  # one seed, or a list of them (an ensemble)
    eval_batch_size: int = 32
    max_eval_samples: int | None = None
    checkpoint_dir: str = "./checkpoints"
    save_epoch_checkpoints: bool = False
    configured_by: str | None = None
    overrides: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------------
# Analysis


@dataclass(frozen=True)
class AnalysisConfig(DataConfig):
    """analyze.py: factors and scores of a checkpoint. `task` is the kronfluence Task class to use (None: the
    margin's, `glue_attribution.task.GlueTask`); it is called with the tracked modules' names, e.g. a subclass
    whose `compute_measurement` returns the loss."""

    checkpoint_dir: str = "./checkpoints"
    ensemble_seeds: list | None = None
    checkpoint_epoch: int | None = None
    output_dir: str = "./influence_results"
    factor_strategy: str = "ekfac"
    use_half_precision: bool = False
    query_gradient_rank: int | None = None
    damping_factor: float | None = 1e-8
    scores_name: str | None = None
    proj_dim: int | None = None
    query_batch_size: int = 8
    train_batch_size: int = 8
    factor_batch_size: int | None = None
    max_query_examples: int = 2000
    tracked_modules: list | None = None
    compute_self_scores: bool = False
    stock_kronfluence: bool = False
    allow_tf32: bool = False
    use_empirical_fisher: bool = False
    seed: int = 0
    float64: bool = False
    attn_implementation: str | None = None
    overwrite: bool = False
    profile: bool = False
    inspect_query: int | None = None
    top_k: int = 3
    inspect_self: int | None = None
    html: str | None = None
    explorer_tokens: int | None = None
    # The gradient index (--factor_strategy ekfac_index / kfac_index, gradient_index.py) and new queries against it
    index_rank: int | None = 16  # None: full rank ('full')
    index_projection: str = "eigen"
    index_factor_examples: int | None = None
    index_normalize: bool = False
    index_store_dtype: str = "float32"
    index_chunk_size: int = 2048
    query_text: list | None = None
    query_file: str | None = None
    query_label: str | None = None
    shard_index: int = 0
    num_shards: int = 1
    configured_by: str | None = None
    overrides: dict = field(default_factory=dict)
    task: Any = None


# ----------------------------------------------------------------------------------------------------------------------
# The experiments that retrain: LDS, counterfactual, detection


@dataclass(frozen=True)
class LDSConfig(TrainConfig, DataConfig):
    """evaluate_lds.py: the ground truth (masks, retrains) and what scoring it takes."""

    command: str = "build"
    checkpoint_dir: str = "./checkpoints"
    output_dir: str = "./influence_results"
    lds_dir: str | None = None
    max_query_examples: int = 2000
    num_masks: int = 100
    subset_fraction: float = 0.5
    num_repeats: int = 5
    stratify_masks: bool = False
    seed: int = 0
    shard_index: int = 0
    num_shards: int = 1
    merge_only: bool = False
    strategies: list = field(default_factory=lambda: ["ekfac"])
    reference: str | None = None
    num_bootstrap: int = 1000
    figure: str | None = None
    inspect_query: int | None = None
    top_k: int = 3
    stability_dir: str | None = None
    configured_by: str | None = None
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CounterfactualConfig(TrainConfig, DataConfig):
    """run_counterfactual.py: which rankings, how many examples removed, how many retrains."""

    checkpoint_dir: str = "./checkpoints"
    output_dir: str = "./influence_results"
    counterfactual_dir: str | None = None
    strategies: list = field(default_factory=lambda: ["ekfac", "identity"])
    max_query_examples: int = 100
    remove_intervals: list = field(default_factory=lambda: [20, 40, 60, 80, 100, 120])
    num_base_repeat: int = 5
    num_repeat: int = 3
    search: str = "ascending"
    reference: str | None = None
    seed: int = 1004
    shard_index: int = 0
    num_shards: int = 1
    figure: str | None = None
    plot_only: bool = False
    configured_by: str | None = None
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DetectionConfig(TrainConfig, DataConfig):
    """detect_mislabeled.py: the rankings of suspected labels and the fix-and-retrain runs."""

    checkpoint_dir: str = "./checkpoints"
    output_dir: str = "./influence_results"
    detection_dir: str | None = None
    strategies: list = field(default_factory=lambda: ["identity", "diagonal", "kfac", "ekfac"])
    num_folds: int = 5
    seed: int = 0
    fix_fractions: list = field(default_factory=lambda: [0.05, 0.10])
    fix_rankings: list | None = None
    shard_index: int = 0
    num_shards: int = 1
    figure: str | None = None
    summarize: list | None = None
    configured_by: str | None = None
    overrides: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------------
# What names an experiment

# Fields that change no result (where and how a run goes, and what the checkpoint adds): left out of the arguments
# that name an experiment's folder, so a folder may be resumed or merged under other values of them.
RUN_ONLY = ("device", "output_dir", "figure", "verbose", "checkpoint_dir", "configured_by", "overrides", "shard_index",
            "num_shards")


def result_arguments(config, *also_run_only: str) -> dict:
    """The arguments that change an experiment's results: they name its folder and guard its reuse."""
    return {k: v for k, v in config.to_dict().items() if k not in (*RUN_ONLY, *also_run_only)}
