"""The Python entry: train, analyse, read a score set (top influential examples, self-influence) and score it with the
LDS, from a notebook, with the configurations of config.py. The scripts run the same functions (training.py,
analysis.py, lds.py); what they add is the command line, the pages and the printed reports. See docs/api.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from . import pipeline
from .config import AnalysisConfig, LDSConfig, TrainConfig, TrainRunConfig


def configure(cls, checkpoint_dir: str, dataset_name: str = "sst2", **fields):
    """A configuration of `cls` whose data, model and recipe fields not given in `fields` are those the checkpoint
    in <checkpoint_dir>/<dataset_name> was trained with (as the scripts take them from --checkpoint_dir)."""
    import json
    import os

    from .checkpoints import CHECKPOINT_META, checkpoints
    from .config import DATA_DEFAULTS, RECIPE_DEFAULTS

    folder = checkpoints(checkpoint_dir, dataset_name)[0][1]
    with open(os.path.join(folder, CHECKPOINT_META)) as f:
        saved = json.load(f)["args"]
    names = {f.name for f in dataclasses.fields(cls)}
    keys = (*DATA_DEFAULTS, *(RECIPE_DEFAULTS if issubclass(cls, TrainConfig) else ()))  # analysis: its own batches
    inherited = {k: saved[k] for k in keys if k in saved and k in names}
    if isinstance(inherited.get("text_columns"), list):
        inherited["text_columns"] = tuple(inherited["text_columns"])
    return cls(**{**inherited, **fields, "checkpoint_dir": checkpoint_dir, "dataset_name": dataset_name})


def train(config: TrainRunConfig) -> list:
    """Fine-tunes the checkpoint(s) of `config` as train.py does; returns their folders."""
    from . import training

    return training.train(config)


@dataclass(frozen=True)
class ScoreSet:
    """A published score set with what it scores: `scores[i, j]` is the influence of training example j on query i
    (dataset order); `train` and `queries` are their texts and labels; `meta` its glue_scores.json (signature,
    provenance, the arguments it was computed with)."""

    name: str
    scores: np.ndarray
    train: object  # datasets.Dataset
    queries: object
    meta: dict
    output_dir: str
    task_name: str

    @property
    def provenance(self) -> dict:
        return self.meta["provenance"]

    def example(self, split, index: int, score: float | None = None) -> dict:
        """One example as a reader sees it: its index, texts, label name (and a score)."""
        task = pipeline.get_task(self.task_name)
        row = split[int(index)]
        found = {"index": int(index), **{key: row[key] for key in task.keys}, "label": task.label_name(row["label"])}
        return found if score is None else {**found, "score": float(score)}

    def top(self, query: int, k: int = 3) -> dict:
        """The `k` most positively ("positive") and most negatively ("negative") influential training examples of
        query `query`, each with its score."""
        order = np.argsort(-self.scores[query], kind="stable")
        return {side: [self.example(self.train, j, self.scores[query, j]) for j in picks]
                for side, picks in (("positive", order[:k]), ("negative", order[::-1][:k]))}

    def self_influence(self) -> np.ndarray:
        """Every training example's self-influence (analysis with compute_self_scores=True), dataset order; sort it
        descending for the candidates for wrong labels."""
        from .scores import load_scores

        return load_scores(self.output_dir, self.task_name, self.name, kind="self")[0]


def load_score_set(config: AnalysisConfig, name: str | None = None) -> ScoreSet:
    """The score set `name` (default: the one `config` names) in config.output_dir, verified to score the training
    examples and queries that `config`'s data gives, in the same order."""
    from .influence import influence_arguments
    from .scores import load_scores

    name = name or influence_arguments(config)[2]
    pipeline.use_data(config)
    train_text, query_text = pipeline.load_train_and_queries(config.dataset_name, config.data_dir,
                                                             config.max_train_samples, config.max_query_examples,
                                                             config.label_noise, config.label_noise_seed)
    expected = pipeline.data_provenance(config.dataset_name, train_text, query_text, config.max_seq_length)
    scores, meta = load_scores(config.output_dir, config.dataset_name, name, expected)
    return ScoreSet(name, scores, train_text, query_text, meta, config.output_dir, config.dataset_name)


def analyze(config: AnalysisConfig) -> ScoreSet | None:
    """Fits factors and computes the scores of `config` as analyze.py does (reusing finished ones); returns them
    (None on torchrun's other processes, and on a shard of a gradient index whose other shards are not done)."""
    from . import analysis

    done = analysis.analyze(config)
    if done is None:
        return None
    config, scores_name, *_ = done
    return load_score_set(config, scores_name)


def ask(config: AnalysisConfig, texts: list, label=None) -> list:
    """The most influential training examples (`config.top_k` per side) of new texts, from the gradient index built
    for `config` (factor_strategy "ekfac_index" or "kfac_index"; analyze it first). `texts`: one string per text
    column, or a list of such tuples for several queries; without `label` the model's prediction is explained.
    Returns one dict per query: its texts, label, prediction and "top" examples with their scores."""
    import json

    from . import analysis

    rows = [texts] if isinstance(texts, str) or isinstance(texts[0], str) else list(texts)
    answers = []
    for row in rows:  # one query per call: the index answers each in a product against the store
        row = [row] if isinstance(row, str) else list(row)
        query = dataclasses.replace(config, query_text=row, query_file=None,
                                    query_label=None if label is None else str(label))
        with open(analysis.answer_new_queries(query)) as f:
            answers += json.load(f)["queries"]
    return answers


@dataclass(frozen=True)
class LDSResult:
    """The linear datamodeling score of score sets against a ground truth: `table[name]` has the mean over queries
    ("mean"), its standard error ("se_queries"), a bootstrap interval over masks and each query's LDS
    ("per_query"); the baselines (same-label or label, random) are rows too."""

    folder: str
    table: dict

    def score(self, name: str) -> float:
        return self.table[name]["mean"]


def build_ground_truth(config: LDSConfig) -> str:
    """Retrains on the random subsets of `config` (evaluate_lds.py build; resumable); returns the ground truth's
    folder."""
    from . import lds

    pipeline.use_data(config)
    folder = lds.claim_ground_truth(config)
    train_text, query_text, provenance = lds.load_data(config)
    if lds.reuse_sealed(folder, config, provenance):  # sealed, and every run verifies: nothing to do
        return folder
    masks = lds.load_or_make_masks(folder, config, train_text["label"])
    if not config.merge_only:
        lds.retrain_runs(folder, config, masks, train_text, query_text)
    lds.merge_runs(folder, config, provenance)
    return folder


def lds_score(config: LDSConfig) -> LDSResult:
    """The LDS of config.strategies (score sets in config.output_dir) and the baselines against the ground truth
    that `config` names (evaluate_lds.py score, without the page, figure and files)."""
    from . import lds
    from .checkpoints import trained_checkpoints
    from .scores import load_scores

    pipeline.use_data(config)
    train_text, query_text, provenance, (folder, masks, margins, _) = lds.data_and_ground_truth(config)
    checkpoints = trained_checkpoints(config.checkpoint_dir, config.dataset_name)
    sets = {name: load_scores(config.output_dir, config.dataset_name, name, provenance, checkpoints=checkpoints)[0]
            for name in config.strategies}
    sets.update(lds.baseline_scores(config, train_text["label"], query_text["label"]))
    table = lds.lds_table(sets, masks, margins, config.num_bootstrap, config.seed,
                          lds.reference_set(config.reference, sets), None)
    return LDSResult(folder, table)
