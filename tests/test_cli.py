"""The command line as a user meets it: data flags given once (to train.py) for the whole chain, quiet output,
instant --help and argument errors, and an offline hub that fails at once."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import analyze
import evaluate_lds
import pipeline
import run_counterfactual
from conftest import ROOT, assert_user_error, run_script
from glue_attribution import cli, counterfactual, explorer, lds, sweeps

SCRIPTS = ("train.py", "analyze.py", "evaluate_lds.py", "run_counterfactual.py")


def progress_free_lines(output: str) -> list:
    """What a terminal keeps once the progress bars are done: non-empty lines that are not tqdm bars."""
    return [line for line in output.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]


def run_main(module, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    module.main()


def test_chain_with_the_data_flags_given_once(monkeypatch, tiny_model_dir, glue_dir, tmp_path):
    """train.py gets the data, model and recipe; analyze, LDS and counterfactual get --checkpoint_dir and their own
    few flags, and record what they used. A result-changing override is logged and recorded."""
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "influence_results"
    trained = run_script("train.py", "--dataset_name", "rte", "--data_dir", str(glue_dir), "--model_name_or_path",
                         tiny_model_dir, "--max_train_samples", "32", "--max_seq_length", "32", "--num_train_epochs",
                         "1", "--train_batch_size", "8", "--learning_rate", "1e-3",
                         "--checkpoint_dir", str(checkpoints))
    assert trained.returncode == 0, trained.stderr
    assert len(progress_free_lines(trained.stdout + trained.stderr)) <= 20

    own = ["--dataset_name", "rte", "--checkpoint_dir", str(checkpoints), "--output_dir", str(out)]
    result = run_script("analyze.py", *own, "--max_query_examples", "8", "--query_batch_size", "8",
                        "--train_batch_size", "8", "--factor_strategy", "identity", "--inspect_query", "0",
                        "--top_k", "1", "--explorer_tokens", "2")
    assert result.returncode == 0, result.stderr
    lines = progress_free_lines(result.stdout + result.stderr)
    assert len(lines) <= 30, "\n".join(lines)  # the README's promise: quiet without --verbose
    assert not any("Tracking modules" in line or "BertForSequenceClassification(" in line for line in lines)
    meta = json.loads((out / "rte" / "scores_identity" / "glue_scores.json").read_text())
    assert meta["provenance"]["data_dir"] == str(glue_dir) and meta["provenance"]["max_seq_length"] == 32
    assert meta["provenance"]["num_train"] == 32 and meta["provenance"]["model_name_or_path"] == tiny_model_dir
    assert meta["overrides"] == {}
    page = (out / "rte" / "scores_identity" / "explorer.html").read_text()  # the explorer, beside the scores
    assert page.count('"positive": [') == 8 and "explorer.html" in result.stderr
    shaded = [[e for e in q["positive"] + q["negative"] if "words" in e]
              for q in explorer.read_data(str(out / "rte" / "scores_identity" / "explorer.html"))["queries"]]
    assert [len(s) for s in shaded] == [2, 2, 0, 0, 0, 0, 0, 0]  # --explorer_tokens 2 --top_k 1: 2 queries x 2 sides
    pairwise = load_file(out / "rte" / "scores_identity" / "pairwise_scores.safetensors")["all_modules"].numpy()
    for q in (0, 1):  # the shading follows the scores: the positive side sums above the negative one
        positive, negative = (sum(w[2] for w in e["words"]) for e in shaded[q])
        assert positive > negative and np.sign(positive) == np.sign(pairwise[q, shaded[q][0]["index"]])
    rerun = run_script("analyze.py", *own, "--max_query_examples", "8", "--factor_strategy", "identity")
    assert "Reusing scores" in rerun.stderr

    lds_argv = [*own, "--max_query_examples", "8", "--num_masks", "3", "--num_repeats", "1"]
    run_main(evaluate_lds, monkeypatch, "build", *lds_argv)
    run_main(evaluate_lds, monkeypatch, "score", *lds_argv, "--strategies", "identity", "--num_bootstrap", "20")
    folder = lds_folder = lds.ground_truth_dir(evaluate_lds.parse_args(["score", *lds_argv]))
    recorded = json.loads(open(os.path.join(folder, "experiment_args.json")).read())
    assert recorded["data_dir"] == str(glue_dir) and recorded["max_train_samples"] == 32
    assert recorded["recipe"]["learning_rate"] == 1e-3 and recorded["model_name_or_path"] == tiny_model_dir
    assert os.path.isfile(os.path.join(folder, "lds_results.json")) and os.path.isfile(os.path.join(folder, "lds.png"))
    page = explorer.read_data(str(out / "rte" / "scores_identity" / "explorer.html"))
    lds_per_query = [q["lds"] for q in page["queries"]]
    assert len(lds_per_query) == 8 and all(isinstance(x, float) for x in lds_per_query)

    counterfactual_argv = [*own, "--strategies", "identity", "--max_query_examples", "2", "--remove_intervals", "2",
                           "--num_base_repeat", "1", "--num_repeat", "1"]
    monkeypatch.setattr(sweeps, "retrainer", lambda args, train, queries: stub_retrain)
    run_main(run_counterfactual, monkeypatch, *counterfactual_argv)
    folder = counterfactual.results_dir(run_counterfactual.parse_args(counterfactual_argv))
    assert folder.startswith(str(out / "rte" / "counterfactual_"))
    assert os.path.isfile(os.path.join(folder, "counterfactual_results.json"))
    assert os.path.isfile(os.path.join(folder, "counterfactual.png"))  # under the results, not the README's figure

    # Each result names the checkpoint and the score set it used; scores of another checkpoint are refused.
    sha = json.loads((checkpoints / "rte" / "glue_checkpoint.json").read_text())["files"]["model.safetensors"]["sha256"]
    for path in (os.path.join(lds_folder, "lds_results.json"), os.path.join(folder, "counterfactual_results.json")):
        source = json.loads(open(path).read())["scores"]["identity"]
        assert source["checkpoint_sha256"] == [sha] and len(source["signature_digest"]) == 16
    model, tokenizer, meta = pipeline.load_checkpoint(str(checkpoints / "rte"), "rte")
    with torch.no_grad():
        model.classifier.bias.add_(1.0)
    other = tmp_path / "other"
    pipeline.save_checkpoint(model, tokenizer, str(other / "rte"),
                             {"task": "rte", "num_labels": 2, "args": meta["args"]})
    theirs = ["--dataset_name", "rte", "--checkpoint_dir", str(other), "--output_dir", str(out)]
    for script, argv in (("evaluate_lds.py", ["score", *theirs, *lds_argv[6:], "--strategies", "identity"]),
                         ("run_counterfactual.py", [*theirs, *counterfactual_argv[6:]])):
        assert_user_error(run_script(script, *argv), "scores 'identity'", "computed from another checkpoint",
                          str(other / "rte"), f"python analyze.py --dataset_name rte --output_dir {out} "
                          f"--factor_strategy identity --checkpoint_dir {other}")

    args = analyze.parse_args([*own, "--max_seq_length", "16"])
    assert args.overrides == {"max_seq_length": {"checkpoint": 32, "here": 16}} and args.data_dir == str(glue_dir)
    with pytest.raises(SystemExit):  # analyze.py analyses the checkpoint's model, whatever this flag says
        analyze.parse_args([*own, "--model_name_or_path", "bert-base-cased"])


def test_a_missing_checkpoint_is_named(tmp_path, caplog):
    args = evaluate_lds.parse_args(["build", "--checkpoint_dir", str(tmp_path / "typo")])
    assert (args.learning_rate, args.model_name_or_path) == (3e-5, "bert-base-cased")  # the flags' defaults
    cli.log_configuration(args)
    assert f"no checkpoint at {tmp_path / 'typo' / 'rte'}" in caplog.text


def stub_retrain(keep, seed, queries):
    import numpy as np

    return {"correct": np.ones(len(queries), dtype=bool), "margins": np.ones(len(queries))}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_argument_errors_answer_before_torch(script):
    """--help (with defaults) and argument errors come before the heavy imports: neither torch nor transformers."""
    for argv, code in ((["--help"], 0), (["--top_k", "0"] if script == "analyze.py" else ["--dataset_name", "x"], 2)):
        result = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / script), *argv], capture_output=True,
                                text=True, timeout=60)
        imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "import time:" in line}
        assert result.returncode == code, result.stderr[-500:]
        assert not imported & {"torch", "transformers", "datasets", "kronfluence"}
    if script != "evaluate_lds.py":  # its --help lists the subcommands, each with a description
        assert "(default: " in subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True,
                                              text=True, timeout=60).stdout


@pytest.mark.parametrize("argv", [["train.py"], ["analyze.py"], ["evaluate_lds.py", "build"],
                                  ["evaluate_lds.py", "score"], ["evaluate_lds.py", "ensembles"],
                                  ["run_counterfactual.py"], ["detect_mislabeled.py"]])
def test_help_shows_one_default_per_flag_in_groups(argv, capsys):
    """Every flag's help names its default at most once, never a bare None or False, and the flags stand in the
    groups data and model, training, analysis, output and running."""
    import importlib

    module = importlib.import_module(argv[0].removesuffix(".py"))
    with pytest.raises(SystemExit):
        module.parse_args([*argv[1:], "--help"])
    text = capsys.readouterr().out
    flags = [" ".join(block.split()) for block in text.split("\n  -")[1:]]
    assert len(flags) > 15
    for flag in flags:
        assert flag.count("(default") <= 1, flag
        assert "(default: None)" not in flag and "(default: False)" not in flag, flag
    sections = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    skipped = {"train.py": "analysis", "analyze.py": "training"}.get(argv[0])  # analyze.py trains nothing
    # analyze.py's gradient-index flags have a group of their own, named by the strategies that take them
    own = ["gradient index (--factor_strategy ekfac_index / kfac_index)"] if argv[0] == "analyze.py" else []
    assert sections[sections.index("options") + 1:] == [
        section for section in ("data and model", "training", "analysis", "output and running")
        if section != skipped] + own
    if argv[0] == "analyze.py":  # a flag whose help states its default keeps that one
        assert "(default: all)" in " ".join(text.split()) and "(default: 1e-08)" in text


def test_missing_checkpoint_names_a_train_command_that_works(tiny_model_dir, glue_dir, tmp_path):
    """analyze.py without a checkpoint prints the train.py command with this run's data and model flags; run as
    printed (offline), it makes the checkpoint analyze.py looks for."""
    import shlex

    own = ["--dataset_name", "rte", "--data_dir", str(glue_dir), "--model_name_or_path", tiny_model_dir,
           "--max_train_samples", "32", "--max_seq_length", "32", "--checkpoint_dir", str(tmp_path / "checkpoints")]
    refused = run_script("analyze.py", *own, "--output_dir", str(tmp_path / "out"), "--factor_strategy", "identity")
    assert_user_error(refused, f"no checkpoint at {tmp_path / 'checkpoints' / 'rte'}; train it first: python train.py")
    command = shlex.split(refused.stderr.strip().splitlines()[-1].split("train it first: ")[1])
    assert sorted(command[2:]) == sorted(own)
    assert run_script(*command[1:]).returncode == 0
    saved = json.loads((tmp_path / "checkpoints" / "rte" / "glue_checkpoint.json").read_text())["args"]
    assert (saved["max_train_samples"], saved["max_seq_length"], saved["data_dir"]) == (32, 32, str(glue_dir))


def test_evaluate_lds_subcommands_have_descriptions():
    result = subprocess.run([sys.executable, str(ROOT / "evaluate_lds.py"), "--help"], capture_output=True, text=True,
                            timeout=60)
    assert "Retrain on random subsets" in result.stdout and "LDS of influence scores" in result.stdout
    build = " ".join(subprocess.run([sys.executable, str(ROOT / "evaluate_lds.py"), "build", "--help"],
                                    capture_output=True, text=True, timeout=60).stdout.split())
    assert "the LDS ground truth" in build and "(default: --lds_dir's, else 100)" in build


def test_offline_hub_fails_at_once_with_the_fix(tiny_model_dir, tmp_path):
    result = run_script("train.py", "--dataset_name", "rte", "--model_name_or_path", tiny_model_dir,
                        "--checkpoint_dir", str(tmp_path / "checkpoints"), HF_HUB_OFFLINE="1")
    assert_user_error(result, "from the Hugging Face hub", "pass --data_dir")
    assert "retry" not in result.stderr.lower() and "Retrying" not in result.stdout
    assert not (tmp_path / "checkpoints").exists()  # a failed run leaves no empty folder


def test_unreachable_hub_means_offline(monkeypatch):
    """Without HF_HUB_OFFLINE, a run that needs the hub checks it once; unreachable, the run goes offline."""
    import argparse
    import socket

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    cli.offline_if_hub_unreachable(argparse.Namespace(data_dir="glue", model_name_or_path=pipeline.PACKAGED_MODEL))
    assert "HF_HUB_OFFLINE" not in os.environ  # needs no hub: not even checked
    cli.offline_if_hub_unreachable(argparse.Namespace(data_dir=None, model_name_or_path=pipeline.PACKAGED_MODEL))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
