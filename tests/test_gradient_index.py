"""The gradient index (glue_attribution/gradient_index.py) through analyze.py on a tiny random BERT: exact at full
rank, resumable, shardable, and new queries answered from it."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import analyze
import glue_attribution as ga
from conftest import assert_user_error, run_script
from glue_attribution import pipeline, results
from glue_attribution.checkpoints import load_checkpoint, save_checkpoint
from glue_attribution.config import AnalysisConfig
from glue_attribution.errors import GlueError
from glue_attribution.scores import load_scores

N_TRAIN, N_QUERY = 24, 6
EXACT = ["--float64", "--attn_implementation", "eager", "--use_empirical_fisher", "--compute_self_scores"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model_dir, glue_dir):
    """Two tiny RTE checkpoints (seeds 0 and 1), saved as train.py saves them."""
    roots = []
    for seed in (0, 1):
        root = tmp_path_factory.mktemp(f"index_checkpoint{seed}")
        tokenizer = pipeline.load_tokenizer(tiny_model_dir)
        data = pipeline.tokenize(pipeline.load_glue("rte", "train", str(glue_dir), N_TRAIN), "rte", tokenizer, 32)
        config = pipeline.TrainConfig(learning_rate=1e-3, train_batch_size=8, num_train_epochs=1)
        model = pipeline.finetune(tiny_model_dir, "rte", data, pipeline.collator(tokenizer), config, seed,
                                  disable_tqdm=True)
        save_checkpoint(model, tokenizer, str(root / "rte"), {"task": "rte", "num_labels": 2})
        roots.append(root)
    return roots


def flags(glue_dir, checkpoint, output_dir, *extra):
    return ["--dataset_name", "rte", "--data_dir", str(glue_dir), "--checkpoint_dir", str(checkpoint),
            "--output_dir", str(output_dir), "--max_train_samples", str(N_TRAIN), "--max_query_examples",
            str(N_QUERY), "--max_seq_length", "32", "--query_batch_size", "4", "--train_batch_size", "8", *extra]


def run_analyze(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["analyze.py", *argv])
    analyze.main()


def scores(output_dir, name, kind="pairwise"):
    return load_scores(str(output_dir), "rte", name, kind=kind)[0]


@pytest.mark.parametrize("preconditioner", ["ekfac", "kfac"])
def test_full_rank_index_is_exact(monkeypatch, glue_dir, checkpoints, tmp_path, preconditioner):
    """k = the full width (the eigenbasis: a rotation; the random projection: the identity) gives kronfluence's
    scores and self-influence, same Fisher and damping (1e-8, and 'auto' from the full gradients' norms), in
    float64."""
    out = tmp_path / "out"
    runs = [(preconditioner, []), (preconditioner, ["--damping_factor", "auto", "--scores_name", "exact_auto"])]
    for damping in ([], ["--damping_factor", "auto"]):
        runs += [(f"{preconditioner}_index", ["--index_rank", "full", *damping]),
                 (f"{preconditioner}_index", ["--index_rank", "full", "--index_projection", "random", *damping])]
    for strategy, extra in runs:
        run_analyze(monkeypatch, *flags(glue_dir, checkpoints[0], out, "--factor_strategy", strategy, *EXACT, *extra))
    for exact, damping in ((preconditioner, ""), ("exact_auto", "_damp_auto")):
        for projection in ("", "_random"):
            name = f"{preconditioner}_index_full{projection}{damping}"
            reference = scores(out, exact)
            np.testing.assert_allclose(scores(out, name), reference, rtol=1e-6, atol=1e-6 * np.abs(reference).max())
            np.testing.assert_allclose(scores(out, name, "self"), scores(out, exact, "self"), rtol=1e-6)


def test_truncated_index_and_cosine(monkeypatch, glue_dir, checkpoints, tmp_path):
    """k below the width keeps a k x k block per module; the cosine variant divides by sqrt(self-influence)."""
    out = tmp_path / "out"
    for extra in ([], ["--index_normalize"]):
        run_analyze(monkeypatch, *flags(glue_dir, checkpoints[0], out, "--factor_strategy", "ekfac_index",
                                        "--index_rank", "4", *extra))
    run_analyze(monkeypatch, *flags(glue_dir, checkpoints[0], out, "--factor_strategy", "ekfac_index",
                                    "--index_rank", "4", "--index_store_dtype", "float16"))
    raw, cosine = scores(out, "ekfac_index_k4"), scores(out, "ekfac_index_k4_cos")
    np.testing.assert_allclose(scores(out, "ekfac_index_k4_fp16"), raw, rtol=2e-3, atol=2e-3 * np.abs(raw).max())
    self_influence = scores(out, "ekfac_index_k4", "self")
    np.testing.assert_allclose(cosine, raw / np.sqrt(self_influence), rtol=1e-5)
    meta = json.load(open(out / "rte" / "index_ekfac_index_k4" / "glue_index.json"))
    linear = {n: m for n, m in load_checkpoint(str(checkpoints[0] / "rte"), "rte")[0].named_modules()
              if isinstance(m, torch.nn.Linear)}
    assert meta["modules"] == list(linear)
    assert meta["dims"] == sum(4 * min(4, m.out_features) for m in linear.values())  # the classifier has 2 outputs
    assert load_file(out / "rte" / "index_ekfac_index_k4" / "gradient_index.safetensors")["store"].shape == (
        N_TRAIN, meta["dims"])


def test_killed_build_resumes_and_shards_merge_to_the_same_bytes(monkeypatch, glue_dir, checkpoints, tmp_path):
    index = ["--factor_strategy", "ekfac_index", "--index_projection", "random", "--index_rank", "4",
             "--index_chunk_size", "8"]  # 3 chunks
    run_analyze(monkeypatch, *flags(glue_dir, checkpoints[0], tmp_path / "one", *index))
    killed = run_script("analyze.py", *flags(glue_dir, checkpoints[0], tmp_path / "killed", *index),
                        GLUE_KILL_AT="index_chunk_saved:2")
    assert killed.returncode != 0
    staging = tmp_path / "killed" / "rte" / results.STAGING
    chunks = sorted(p.name for p in staging.rglob("chunk_*.safetensors"))
    assert chunks == ["chunk_00000.safetensors", "chunk_00001.safetensors"]
    run_analyze(monkeypatch, *flags(glue_dir, checkpoints[0], tmp_path / "killed", *index))
    for shard in (0, 1):  # shard 0 leaves chunk 1 to shard 1, which merges
        run_analyze(monkeypatch, *flags(glue_dir, checkpoints[0], tmp_path / "shards", *index, "--shard_index",
                                        str(shard), "--num_shards", "2"))
        assert (tmp_path / "shards" / "rte" / "scores_ekfac_index_k4_random").exists() == (shard == 1)
    files = {run: results.file_sha256(tmp_path / run / "rte" / "index_ekfac_index_k4_random" / "gradient_index"
                                      ".safetensors") for run in ("one", "killed", "shards")}
    assert len(set(files.values())) == 1, files
    np.testing.assert_array_equal(scores(tmp_path / "one", "ekfac_index_k4_random"),
                                  scores(tmp_path / "shards", "ekfac_index_k4_random"))


def test_new_queries(monkeypatch, glue_dir, checkpoints, tmp_path, capsys):
    """A new text is scored against the stored gradients: a validation query asked again gets its row of the
    scores; a file with other columns, another checkpoint's index and an exact strategy are refused in one line."""
    out = tmp_path / "out"
    base = flags(glue_dir, checkpoints[0], out, "--factor_strategy", "ekfac_index", "--index_rank", "4")
    run_analyze(monkeypatch, *base)
    query = pipeline.load_glue("rte", "validation", str(glue_dir), 1)[0]
    run_analyze(monkeypatch, *base, "--query_text", query["sentence1"], query["sentence2"], "--query_label",
                str(query["label"]), "--top_k", "2")
    answer = json.load(open(out / "rte" / "new_queries_ekfac_index_k4.json"))
    row = scores(out, "ekfac_index_k4")[0]
    top = answer["queries"][0]["top"]
    assert [t["index"] for t in top][:2] == np.argsort(-row, kind="stable")[:2].tolist()
    np.testing.assert_allclose([t["score"] for t in top], row[[t["index"] for t in top]], rtol=1e-4)
    assert "Query 0" in capsys.readouterr().out
    config = AnalysisConfig(dataset_name="rte", data_dir=str(glue_dir), checkpoint_dir=str(checkpoints[0]),
                            output_dir=str(out), max_train_samples=N_TRAIN, max_query_examples=N_QUERY,
                            max_seq_length=32, query_batch_size=4, train_batch_size=8,
                            factor_strategy="ekfac_index", index_rank=4, top_k=2)
    asked = ga.ask(config, [(query["sentence1"], query["sentence2"])] * 2, label=query["label"])  # from Python
    assert len(asked) == 2 and asked[1]["top"] == top and asked[0]["sentence1"] == query["sentence1"]
    mtime = os.path.getmtime(out / "rte" / "index_ekfac_index_k4" / "gradient_index.safetensors")
    run_analyze(monkeypatch, *base, "--max_query_examples", "3", "--scores_name", "q3")  # the index is reused
    np.testing.assert_allclose(scores(out, "q3"), scores(out, "ekfac_index_k4")[:3], rtol=1e-5)
    assert os.path.getmtime(out / "rte" / "index_ekfac_index_k4" / "gradient_index.safetensors") == mtime
    table = tmp_path / "queries.csv"
    table.write_text("sentence1,sentence2\nthe movie,a film\nthe plot,the story\n")
    run_analyze(monkeypatch, *base, "--query_file", str(table))
    assert len(json.load(open(out / "rte" / "new_queries_ekfac_index_k4.json"))["queries"]) == 2
    with pytest.raises(GlueError, match="another checkpoint.*--overwrite"):
        run_analyze(monkeypatch, *flags(glue_dir, checkpoints[1], out, "--factor_strategy", "ekfac_index",
                                        "--index_rank", "4", "--query_file", str(table)))
    with pytest.raises(GlueError, match="keeps no training gradients.*24 training examples.*ekfac_index"):
        run_analyze(monkeypatch, *flags(glue_dir, checkpoints[0], out, "--query_file", str(table)))
    table.write_text("premise,hypothesis\na b,c d\n")
    wrong = run_script("analyze.py", *base, "--query_file", str(table))
    assert_user_error(wrong, str(table), "'sentence1'", "premise")
