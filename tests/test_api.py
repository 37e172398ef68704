"""The Python entry (docs/api.md), as a notebook user runs it: installed with `pip install -e .` into a fresh virtual
environment, from another working directory; and the typed configurations the scripts build from their flags."""

import dataclasses
import importlib.util
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest

import detect_mislabeled
import run_counterfactual
from conftest import ROOT
from glue_attribution import config as configs


def api_example() -> str:
    """The code blocks of docs/api.md, in order."""
    return "\n".join(re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S))


@pytest.mark.skipif(importlib.util.find_spec("wheel") is None, reason="pip install -e . needs the wheel package")
def test_api_example_runs_from_an_editable_install_in_another_directory(tmp_path, glue_dir, tiny_model_dir):
    # A fresh environment that sees this one's packages (torch, pip, setuptools, wheel) through a .pth file, whether
    # this one is the system's or a virtual environment; its own pip and setuptools would shadow them.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    (Path(own) / "parent_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--no-index", "-e", str(ROOT)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    code, count = re.subn(r'DATA, MODEL = .*\n', f'DATA, MODEL = "{glue_dir}", "{tiny_model_dir}"\n', api_example())
    assert count == 1
    code += f"""
assert ga.__file__.startswith({str(ROOT / "glue_attribution")!r})
assert len(scores.top(0, k=3)["positive"]) == 3 and scores.scores.shape == (16, len(scores.train))
assert scores.provenance["num_train"] == len(scores.train)
assert scores.meta["signature"]["task"] == {{"class": "task.GlueTask", "measurement": "margin"}}
assert loss_scores.meta["signature"]["task"]["class"].endswith("LossTask")
assert loss_scores.scores.shape == scores.scores.shape and not (loss_scores.scores == scores.scores).all()
"""
    work = tmp_path / "notebook"
    work.mkdir()
    result = subprocess.run([python, "-c", code], cwd=work, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                 "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^positive \[\(\d+, ", result.stdout, re.M) and re.search(r"^LDS: -?\d", result.stdout, re.M)
    assert (work / "runs" / "scores" / "rte" / "scores_ekfac_loss" / "pairwise_scores.safetensors").is_file()


@pytest.mark.parametrize("script, cls", [(run_counterfactual, configs.CounterfactualConfig),
                                         (detect_mislabeled, configs.DetectionConfig)])
def test_configuration_fields_are_the_scripts_flags(script, cls, glue_dir, capsys):
    """A results folder is named by the digest of its result-changing fields: the configuration must hold exactly
    the flags the Namespace held (plus the own-data fields, left out while unset), or existing folders lose their
    names."""
    config = script.parse_args(["--dataset_name", "rte", "--data_dir", str(glue_dir)])
    assert isinstance(config, cls)
    assert set(config.to_dict()) == {f.name for f in dataclasses.fields(cls)} - set(configs.OWN_DATA_KEYS)
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    flags = set(re.findall(r"--(\w+)", capsys.readouterr().out))
    assert set(config.to_dict()) - flags == {"configured_by", "overrides"}  # what from_checkpoint adds
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1  # the library never changes a configuration
