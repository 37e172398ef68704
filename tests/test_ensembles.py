"""Ensembles over fine-tuning seeds and TRAK: train.py --seed A B, analyze.py over the members and their mean, TRAK
scores in the project's layout, and evaluate_lds.py reading both (LDS, the ensemble curve, stability)."""

import json
import os
import sys

import numpy as np
import pytest
import torch

import evaluate_lds
import train
from conftest import assert_user_error, run_script
from glue_attribution import checkpoints, ensembles, explorer, lds, pipeline, trak_scores
from glue_attribution.errors import GlueError
from glue_attribution.scores import analyze_command, load_scores

TINY = ["--dataset_name", "rte", "--max_train_samples", "32", "--max_seq_length", "32", "--num_train_epochs", "1",
        "--train_batch_size", "8", "--learning_rate", "1e-3"]


def test_combine_is_the_mean_of_per_query_standardised_members():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 20)), rng.standard_normal((3, 20))
    a[1] *= 1000  # one member's raw magnitude must not dominate
    b[2] = 5.0  # a constant row carries no ranking: it adds nothing
    expected = (a / a.std(axis=1, keepdims=True) + np.vstack([b[:2] / b[:2].std(axis=1, keepdims=True),
                                                               np.zeros(20)])) / 2
    np.testing.assert_allclose(ensembles.combine([a, b]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ensembles.combine([7 * a]), a / a.std(axis=1, keepdims=True), rtol=1e-5)


def test_agreement_known_answers():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 30))
    same = lds.agreement(a, 3 * a + 1)  # a monotone transform ranks alike
    assert same == {"spearman": pytest.approx(1.0), "top10_overlap": 10.0, "top1_same": 1.0}
    reversed_ = lds.agreement(a, -a)
    assert reversed_["spearman"] == pytest.approx(-1.0) and reversed_["top10_overlap"] == 0.0


def destinations(args) -> list:
    return checkpoints.checkpoint_destinations(args.checkpoint_dir, args.dataset_name, args.seed)


def test_train_refuses_to_mix_one_checkpoint_and_an_ensemble(tmp_path):
    single = tmp_path / "single" / "rte"
    single.mkdir(parents=True)
    (single / "glue_checkpoint.json").write_text("{}")
    with pytest.raises(GlueError, match="holds a single checkpoint"):
        destinations(train.parse_args(["--dataset_name", "rte", "--checkpoint_dir", str(tmp_path / "single"),
                                       "--seed", "0", "1"]))
    member = tmp_path / "ensemble" / "rte" / "seed3"
    member.mkdir(parents=True)
    (member / "glue_checkpoint.json").write_text("{}")
    with pytest.raises(GlueError, match="holds an ensemble"):
        destinations(train.parse_args(["--dataset_name", "rte", "--checkpoint_dir", str(tmp_path / "ensemble")]))
    assert destinations(train.parse_args(["--dataset_name", "rte", "--checkpoint_dir",
                                          str(tmp_path / "ensemble"), "--seed", "3", "4"])) == [
        (3, str(member)), (4, str(tmp_path / "ensemble" / "rte" / "seed4"))]
    with pytest.raises(SystemExit):
        train.parse_args(["--seed", "1", "1"])


def test_ensemble_and_trak_through_the_chain(monkeypatch, tiny_model_dir, glue_dir, tmp_path):
    """Two seeds trained once (a rerun reuses them); identity and TRAK scores per member and for the ensemble,
    which equals the combination of its members; evaluate_lds.py scores both and draws the curve."""
    root, out = tmp_path / "ensemble", tmp_path / "influence_results"
    command = [*TINY, "--data_dir", str(glue_dir), "--model_name_or_path", tiny_model_dir, "--checkpoint_dir",
               str(root), "--seed", "0", "1"]
    trained = run_script("train.py", *command)
    assert trained.returncode == 0, trained.stderr
    metas = [json.loads((root / "rte" / f"seed{s}" / "glue_checkpoint.json").read_text()) for s in (0, 1)]
    assert [m["args"]["seed"] for m in metas] == [0, 1]
    assert metas[0]["files"]["model.safetensors"]["sha256"] != metas[1]["files"]["model.safetensors"]["sha256"]
    again = run_script("train.py", *command)
    assert again.returncode == 0 and again.stderr.count("Reusing checkpoint") == 2, again.stderr
    assert_user_error(run_script("train.py", *command, "--learning_rate", "1e-4"), "another learning_rate")
    assert checkpoints.checkpoints(str(root), "rte", [1]) == [(1, str(root / "rte" / "seed1"))]
    with pytest.raises(GlueError, match="holds members with seeds 0 1"):
        checkpoints.checkpoints(str(root), "rte", [5])
    with pytest.raises(GlueError, match="--checkpoint_epoch: .* holds an ensemble"):
        checkpoints.checkpoints(str(root), "rte", epoch=1)

    own = ["--dataset_name", "rte", "--checkpoint_dir", str(root), "--output_dir", str(out), "--max_query_examples",
           "8", "--query_batch_size", "8", "--train_batch_size", "16"]
    for strategy in ("identity", "trak"):
        result = run_script("analyze.py", *own, "--factor_strategy", strategy,
                            *(["--proj_dim", "8"] if strategy == "trak" else []))
        assert result.returncode == 0, result.stderr
        assert f"{strategy}_ens2" in result.stderr
        members = [load_scores(str(out), "rte", f"{strategy}_seed{s}") for s in (0, 1)]
        combined, meta = load_scores(str(out), "rte", f"{strategy}_ens2")
        np.testing.assert_allclose(combined, ensembles.combine([m[0] for m in members]), rtol=1e-6)
        assert combined.shape == (8, 32) and meta["provenance"] == members[0][1]["provenance"]
        assert [m["scores_name"] for m in meta["ensemble"]] == [f"{strategy}_seed0", f"{strategy}_seed1"]
        page = explorer.read_data(str(out / "rte" / f"scores_{strategy}_ens2" / "explorer.html"))
        assert page["num_members"] == 2 and all(0 <= q["stability"] <= 1 for q in page["queries"])
        tops = [set(np.argsort(-m[0][0], kind="stable")[:10].tolist()) for m in members]  # each member's own
        assert [e["members"] for e in page["queries"][0]["positive"]] == [
            sum(e["index"] in t for t in tops) for e in page["queries"][0]["positive"]]
    trak_meta = json.loads((out / "rte" / "scores_trak_seed0" / "glue_scores.json").read_text())
    identity_meta = json.loads((out / "rte" / "scores_identity_seed0" / "glue_scores.json").read_text())
    assert trak_meta["provenance"] == identity_meta["provenance"]  # same checkpoint, examples and queries
    assert trak_meta["signature"]["trak"]["proj_dim"] == 8 and set(trak_meta["files"]) == {
        "pairwise_scores.safetensors"}
    html = run_script("analyze.py", *own, "--factor_strategy", "identity", "--inspect_query", "0", "--html",
                      str(tmp_path / "page.html"))
    assert_user_error(html, "--html explains one model", "holds an ensemble")
    other = tmp_path / "seed1"  # identity has no randomness: another --seed gives the same scores, a known answer
    again = run_script("analyze.py", *own[:4], "--output_dir", str(other), *own[6:], "--factor_strategy", "identity",
                       "--seed", "1")
    assert again.returncode == 0, again.stderr

    lds_argv = [*own[:6], "--max_query_examples", "8", "--num_masks", "3", "--num_repeats", "1"]
    monkeypatch.setattr(sys, "argv", ["evaluate_lds.py", "build", *lds_argv])
    evaluate_lds.main()
    for argv in (["score", *lds_argv, "--strategies", "trak_ens2", "identity_ens2", "trak_seed0", "--reference",
                  "trak_ens2", "--num_bootstrap", "20"],
                 ["ensembles", *lds_argv, "--strategies", "identity", "--stability_dir", str(other)]):
        monkeypatch.setattr(sys, "argv", ["evaluate_lds.py", *argv])
        evaluate_lds.main()
    folder = lds.ground_truth_dir(evaluate_lds.parse_args(["score", *lds_argv]))
    table = json.loads(open(os.path.join(folder, "lds_results.json")).read())["results"]
    assert table["identity_ens2"]["versus"]["reference"] == "trak_ens2"
    curve = json.loads(open(os.path.join(folder, "lds_ensembles.json")).read())["results"]
    assert curve["identity"]["rows"][0]["stability"] == {"spearman": pytest.approx(1.0), "top10_overlap": 10.0,
                                                        "top1_same": 1.0}
    assert os.path.getsize(os.path.join(folder, "lds_ensembles.png")) > 0
    monkeypatch.setattr(sys, "argv", ["evaluate_lds.py", "ensembles", *lds_argv, "--strategies", "identity", "trak"])
    evaluate_lds.main()
    curve = json.loads(open(os.path.join(folder, "lds_ensembles.json")).read())["results"]
    assert curve["trak"]["seeds"] == [0, 1] and [r["models"] for r in curve["trak"]["rows"]] == [1, 2]
    assert curve["trak"]["rows"][1]["lds_mean"] == pytest.approx(table["trak_ens2"]["mean"], abs=1e-9)
    with pytest.raises(GlueError, match="same arguments"):  # no randomness changed: refused
        evaluate_lds.ensembles(evaluate_lds.parse_args(["ensembles", *lds_argv, "--stability_dir", str(out),
                                                             "--strategies", "identity"]))


def test_trak_features_are_per_example_margin_gradients(tiny_model_dir, glue_dir):
    """What traker projects: for each example of a padded batch, the gradient of its own margin (computed alone,
    unpadded) with respect to the featurised parameters only, the Linear layers' weights and biases."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).eval()
    model.set_attn_implementation("eager")
    tokenizer = pipeline.load_tokenizer(tiny_model_dir)
    train_text, _ = pipeline.load_train_and_queries("rte", str(glue_dir), 6, 1)
    examples = pipeline.tokenize(train_text, "rte", tokenizer, 32)
    collate = pipeline.collator(tokenizer)
    keys = ("input_ids", "attention_mask", "token_type_ids")
    batch, = trak_scores.batches(examples, collate, keys, 6, "test")
    assert len({len(ids) for ids in examples["input_ids"]}) > 1  # the batch is padded
    wrapped = trak_scores.Logits(model, keys)
    featurised = trak_scores.featurised_parameters(model, None)
    assert "model.classifier.weight" in featurised and not any("embeddings" in name for name in featurised)
    computer = trak_scores.FeaturisedGradients(model=wrapped, task=trak_scores.Margin(regression=False),
                                               grad_dim=1, dtype=torch.float32, device="cpu", grad_wrt=featurised)
    computer.load_model_params(wrapped)  # as TRAKer.load_checkpoint does
    grads = computer.compute_per_sample_grad(batch)
    assert set(grads) == set(featurised)
    params = dict(wrapped.named_parameters())
    for i in range(len(examples)):
        alone = collate([examples[i]])
        margin = pipeline.margins(wrapped(*(alone[k] for k in keys)), alone["labels"]).sum()
        expected = torch.autograd.grad(margin, [params[name] for name in featurised])
        for name, value in zip(featurised, expected):
            torch.testing.assert_close(grads[name][i], value, rtol=1e-4, atol=1e-6)


def test_trak_out_to_loss_is_one_minus_the_probability_of_the_label():
    head = torch.nn.Linear(3, 3)
    inputs, labels = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    weights = dict(head.named_parameters())
    got = trak_scores.Margin(regression=False).get_out_to_loss_grad(head, weights, {}, (inputs, labels))
    expected = 1 - head(inputs).softmax(-1)[torch.arange(5), labels]
    np.testing.assert_allclose(got.squeeze(-1).detach().numpy(), expected.detach().numpy(), rtol=1e-6)


def test_trak_projection_is_one_matrix_for_every_batch():
    """The per-tensor Gaussian projection: the same matrix however the examples are batched, a different one for
    another seed, and (JL) it preserves squared norms up to the factor proj_dim, on average."""
    rng = torch.Generator().manual_seed(0)
    grads = {"b.weight": torch.randn(6, 40, 3, generator=rng), "a.bias": torch.randn(6, 7, generator=rng)}
    projector = trak_scores.Projector(grad_dim=127, proj_dim=256, seed=5)
    whole = projector.project(grads, model_id=0)
    halves = [projector.project({k: v[s] for k, v in grads.items()}, model_id=0) for s in (slice(0, 2), slice(2, 6))]
    torch.testing.assert_close(torch.cat(halves), whole)
    other = trak_scores.Projector(grad_dim=127, proj_dim=256, seed=6).project(grads, model_id=0)
    assert not torch.allclose(other, whole)
    norms = sum(g.flatten(1).pow(2).sum(1) for g in grads.values())
    ratio = (whole.pow(2).sum(1) / (256 * norms)).mean().item()
    assert 0.8 < ratio < 1.2


def test_rerun_hints_name_the_ensemble():
    member = analyze_command("out", "sst2", "ekfac_half_seed3")
    assert "--factor_strategy ekfac --use_half_precision --checkpoint_dir <the ensemble's root>" in member
    ablation = analyze_command("out", "sst2", "ekfac_damp_auto_ens4")
    assert "--scores_name ekfac_damp_auto --checkpoint_dir" in ablation
    assert "--checkpoint_dir" not in analyze_command("out", "sst2", "ekfac")
