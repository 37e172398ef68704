"""Training-data attribution for text classifiers: fine-tune a Hugging Face encoder, compute influence scores with
kronfluence, and check them against retraining (LDS, counterfactual removal, mislabeled-data detection).

Start here (docs/api.md has the whole example):

    import glue_attribution as ga
    ga.train(ga.TrainRunConfig(dataset_name="rte", data_dir="glue_data", checkpoint_dir="runs/ckpt"))
    scores = ga.analyze(ga.AnalysisConfig(dataset_name="rte", data_dir="glue_data", checkpoint_dir="runs/ckpt"))
    scores.top(query=0, k=3)

The names below are loaded on first use: the scripts import `glue_attribution.cli` to parse their flags before
torch is imported, so --help and argument errors answer at once.
"""

from .config import (
    AnalysisConfig,
    CounterfactualConfig,
    DataConfig,
    DetectionConfig,
    LDSConfig,
    TrainConfig,
    TrainRunConfig,
)

_API = ("configure", "train", "analyze", "ask", "load_score_set", "ScoreSet", "build_ground_truth", "lds_score",
        "LDSResult")
__all__ = ["AnalysisConfig", "CounterfactualConfig", "DataConfig", "DetectionConfig", "LDSConfig", "TrainConfig",
           "TrainRunConfig", *_API]


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'glue_attribution' has no attribute '{name}'")
