"""Your own data: CSV, TSV or JSON lines with run_glue's column conventions, through train.py, analyze.py and the
explorer, recorded and fingerprinted in the checkpoint; a bad file is one line naming the file, row and column."""

import csv
import json

import pytest

from conftest import assert_user_error, run_script
from glue_attribution import pipeline
from glue_attribution.errors import GlueError

WORDS = {"good": ["good", "great", "fine", "lovely"], "bad": ["bad", "awful", "dull", "poor"]}


def write_csv(path, n: int, seed: int) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "sentence", "label"])
        for i in range(n):
            label = ["bad", "good"][(i + seed) % 2]
            writer.writerow([i, f"a {WORDS[label][i % 4]} film, number {i}, with commas", label])


def test_csv_through_train_analyze_and_the_explorer(tmp_path, tiny_model_dir):
    write_csv(tmp_path / "train.csv", 64, 0)
    write_csv(tmp_path / "dev.csv", 16, 1)
    data = ["--dataset_name", "reviews", "--train_file", str(tmp_path / "train.csv"), "--validation_file",
            str(tmp_path / "dev.csv")]
    trained = run_script("train.py", *data, "--model_name_or_path", tiny_model_dir, "--max_seq_length", "32",
                         "--num_train_epochs", "1", "--train_batch_size", "8", "--learning_rate", "1e-3",
                         "--checkpoint_dir", str(tmp_path / "ckpt"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    meta = json.loads((tmp_path / "ckpt" / "reviews" / "glue_checkpoint.json").read_text())
    assert meta["args"]["train_file"] == str(tmp_path / "train.csv") and meta["num_labels"] == 2
    assert set(meta["data_files"]) == {str(tmp_path / "train.csv"), str(tmp_path / "dev.csv")}
    assert meta["metrics"]["eval_samples"] == 16 and meta["metrics"]["train_samples"] == 64
    # analyze.py takes the files from the checkpoint, as it takes --data_dir.
    analyzed = run_script("analyze.py", "--dataset_name", "reviews", "--checkpoint_dir", str(tmp_path / "ckpt"),
                          "--output_dir", str(tmp_path / "out"), "--max_query_examples", "8", "--query_batch_size",
                          "4", "--train_batch_size", "16", "--inspect_query", "0")
    assert analyzed.returncode == 0, analyzed.stderr[-2000:]
    scores = json.loads((tmp_path / "out" / "reviews" / "scores_ekfac" / "glue_scores.json").read_text())
    assert scores["shape"] == [8, 64] and scores["args"]["validation_file"] == str(tmp_path / "dev.csv")
    page = (tmp_path / "out" / "reviews" / "scores_ekfac" / "explorer.html").read_text()
    assert "number 63, with commas" in page and "with commas" in analyzed.stdout
    # A GLUE name with own files, or an unknown name without them, is refused in one line.
    assert_user_error(run_script("train.py", "--dataset_name", "rte", "--train_file", str(tmp_path / "train.csv"),
                                 "--validation_file", str(tmp_path / "dev.csv")), "is a GLUE task")
    assert_user_error(run_script("train.py", "--dataset_name", "reviews"), "no GLUE task", "--train_file")


def test_column_conventions_and_label_types(tmp_path):
    (tmp_path / "pairs.tsv").write_text("sentence1\tsentence2\tlabel\nA man.\tA person.\t1\nA cat.\tA car.\t0\n")
    task = pipeline.register_files("pairs", str(tmp_path / "pairs.tsv"), str(tmp_path / "pairs.tsv"))
    assert task.keys == ("sentence1", "sentence2") and task.labels == ("0", "1")
    assert pipeline.load_glue("pairs", "train")["label"] == [1, 0]
    rows = [{"text": "x y", "score": 0, "label": 2.5}, {"text": "z", "score": 1, "label": 4.0}]
    (tmp_path / "scores.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = pipeline.register_files("scored", str(tmp_path / "scores.jsonl"), str(tmp_path / "scores.jsonl"),
                                   ["text"])
    assert task.is_regression and pipeline.load_glue("scored", "validation")["label"] == [2.5, 4.0]


@pytest.mark.parametrize("content, message", [
    ("sentence,label\nfine,good\nok,meh\n", r"dev.csv:3: column 'label': unknown label 'meh'"),
    ("sentence,label\nfine,good\n,bad\n", r"dev.csv:3: column 'sentence' is empty"),
    ("text,label\nfine,good\n", r"dev.csv: no column 'sentence' \(columns: text, label\)"),
    ("sentence,label\nfine,good,extra\n", r"dev.csv:2: not as many fields as the header"),
])
def test_bad_files_name_the_file_row_and_column(tmp_path, content, message):
    (tmp_path / "train.csv").write_text("sentence,label\nfine,good\nawful,bad\n")
    (tmp_path / "dev.csv").write_text(content)
    pipeline.register_files("mine", str(tmp_path / "train.csv"), str(tmp_path / "dev.csv"))
    with pytest.raises(GlueError, match=message):
        pipeline.load_glue("mine", "validation")
