"""Shared fixtures: a tiny random BERT saved like a pretrained model, GLUE-layout TSVs for all nine tasks, and the
path of the real GLUE copy (tests that need it skip where it is absent)."""

import logging
import os
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is never needed: fail fast instead of waiting on the network
os.environ.setdefault("MPLBACKEND", "Agg")
# Tiny models: OpenMP's thread hand-off costs more than the work (and thrashes when the cores are busy); the suite
# runs one worker per core instead (pytest-xdist), and the scripts it starts inherit the single thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from glue_attribution import pipeline  # noqa: E402

REAL_GLUE = ROOT.parent / "shared" / "glue_data"
WORDS = "the a movie film plot actor scene story music ending cast script was is very quite rather".split()

# Header (None: CoLA has none) and a row builder (i, text1, text2, label id or score) for each task, GLUE layout.
LAYOUTS = {
    "cola": (None, lambda i, s1, s2, y: ["src", str(y), "*" if y == 0 else "", s1]),
    "sst2": (["sentence", "label"], lambda i, s1, s2, y: [s1, str(y)]),
    "mrpc": (["\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
             lambda i, s1, s2, y: [str(y), str(1000 + i), str(2000 + i), s1, s2]),
    "stsb": (["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
              "score"], lambda i, s1, s2, y: [str(i), "main", "f", "2012", "0", "none", "none", s1, s2, f"{y:.3f}"]),
    "qqp": (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            lambda i, s1, s2, y: [str(i), str(2 * i), str(2 * i + 1), s1, s2, str(y)]),
    "mnli": (["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"],
             lambda i, s1, s2, y: [str(i), "1", "1e", "fiction", "(", "(", "(", "(", s1, s2,
                                   *[pipeline.GLUE_TASKS["mnli"].labels[y]] * 2]),
    "qnli": (["index", "question", "sentence", "label"],
             lambda i, s1, s2, y: [str(i), s1, s2, pipeline.GLUE_TASKS["qnli"].labels[y]]),
    "rte": (["index", "sentence1", "sentence2", "label"],
            lambda i, s1, s2, y: [str(i), s1, s2, pipeline.GLUE_TASKS["rte"].labels[y]]),
    "wnli": (["index", "sentence1", "sentence2", "label"], lambda i, s1, s2, y: [str(i), s1, s2, str(y)]),
}


def fixture_examples(task_name: str, n: int, seed: int) -> list:
    """(text1, text2, label) with the label readable from the text, so tiny models can learn it; lengths vary."""
    rng = random.Random(seed)
    task = pipeline.GLUE_TASKS[task_name]
    examples = []
    for _ in range(n):
        y = rng.uniform(0, 5) if task.is_regression else rng.randrange(task.num_labels)
        cue = ["good", "bad", "odd"][int(y) % 3]
        words = rng.choices(WORDS, k=rng.randint(3, 14))
        words.insert(rng.randrange(len(words) + 1), cue)
        s1 = " ".join(words) + (' "quoted' if rng.random() < 0.2 else "")  # unbalanced quote, as in real GLUE
        examples.append((s1, " ".join(rng.choices(WORDS, k=rng.randint(2, 6))), round(y, 3) if task.is_regression
                         else y))
    return examples


def write_glue_task(root: Path, task_name: str, n_train: int = 48, n_dev: int = 16) -> None:
    task = pipeline.GLUE_TASKS[task_name]
    header, row = LAYOUTS[task_name]
    folder = root / task.folder
    folder.mkdir(parents=True, exist_ok=True)
    dev_files = ["dev" + split[len("validation"):] + ".tsv" for split in task.eval_splits]
    for seed, (name, n) in enumerate([("train.tsv", n_train)] + [(f, n_dev) for f in dev_files]):
        lines = [] if header is None else ["\t".join(header)]
        lines += ["\t".join(row(i, *example)) for i, example in enumerate(fixture_examples(task_name, n, seed))]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("glue_data")
    for task_name in pipeline.GLUE_TASKS:
        write_glue_task(root, task_name)
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random-init BERT (2 layers, hidden 16) saved with the packaged MiniLM's tokenizer: a 'pretrained' model."""
    from transformers import BertConfig, BertModel

    tokenizer = pipeline.load_tokenizer(pipeline.PACKAGED_MODEL)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_bert")
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def real_glue() -> Path:
    if not (REAL_GLUE / "README.md").is_file():
        pytest.skip("real GLUE data (../shared/glue_data) not present")
    return REAL_GLUE


def run_script(script: str, *args: str, cwd=None, **env_vars: str):
    """Runs one of the project's scripts as a user would, in the foreground: Ctrl-C is delivered even when the suite
    itself runs as a background job (`cmd &`), whose children inherit an ignored SIGINT. Returns the
    CompletedProcess."""
    import signal
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env_vars}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def assert_user_error(result, *fragments: str) -> None:
    """One clear line on stderr, non-zero exit, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last, last


def write_scores(output_dir, name: str, scores, glue_dir, task_name: str = "rte", max_seq_length: int = 32) -> None:
    """A score set published as analyze.py publishes it, computed on the first examples of the fixture data."""
    from safetensors.torch import save_file

    from glue_attribution import results
    from glue_attribution.scores import SCORES_META, scores_dir

    train, queries = pipeline.load_train_and_queries(task_name, str(glue_dir), scores.shape[1], scores.shape[0])
    provenance = pipeline.data_provenance(task_name, train, queries, max_seq_length)
    public = scores_dir(str(output_dir), task_name, name)
    staging = results.staging_dir(public, {"name": name})
    os.makedirs(staging, exist_ok=True)
    save_file({"all_modules": torch.as_tensor(scores, dtype=torch.float32)},
              os.path.join(staging, "pairwise_scores.safetensors"))
    results.publish(staging, public, SCORES_META, {"shape": list(scores.shape), "provenance": provenance})


@pytest.fixture(autouse=True)
def logging_enabled():
    """A script's one-line exit silences logging for the rest of its process; tests that run scripts in process
    get it back before the next test."""
    yield
    logging.disable(logging.NOTSET)
