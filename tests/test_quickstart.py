"""The quick start's inputs, checked fast: the GLUE sample in tests/fixtures/glue_sample (row counts, checksums, a
byte-exact prefix of the real GLUE files) and the README's `<!-- quickstart -->` block (it uses only the sample).
Running the block itself is tests/quickstart.py's job (minutes; .ci/run runs it)."""

import csv
import hashlib
import importlib.util
import posixpath
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "fixtures" / "glue_sample"
SAMPLE_DIR = "tests/fixtures/glue_sample"
REAL_GLUE = ROOT.parent / "shared" / "glue_data"
# file -> (data rows, header). The sample holds only these two tasks.
FILES = {"SST-2/train.tsv": (512, ["sentence", "label"]), "SST-2/dev.tsv": (256, ["sentence", "label"]),
         "RTE/train.tsv": (256, ["index", "sentence1", "sentence2", "label"]),
         "RTE/dev.tsv": (277, ["index", "sentence1", "sentence2", "label"])}
TASK_FOLDERS = {"sst2": "SST-2", "rte": "RTE"}


def _load_quickstart():
    spec = importlib.util.spec_from_file_location("quickstart_script", ROOT / "tests" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _documented() -> dict:
    """file -> (data rows, bytes, sha256) from the table in the sample's README."""
    table = {}
    for line in (SAMPLE / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].strip("`") in FILES:
            table[cells[0].strip("`")] = (int(cells[2]), int(cells[3]), cells[4])
    return table


def test_sample_readme_documents_every_file_and_nothing_else():
    assert set(_documented()) == set(FILES)
    on_disk = {str(p.relative_to(SAMPLE)) for p in SAMPLE.rglob("*") if p.is_file()} - {"README.md"}
    assert on_disk == set(FILES)


@pytest.mark.parametrize("name", FILES)
def test_sample_file_rows_and_checksum(name):
    data = (SAMPLE / name).read_bytes()
    rows_expected, header = FILES[name]
    documented_rows, documented_bytes, documented_sha = _documented()[name]
    assert data.endswith(b"\n") and b"\r" not in data
    with open(SAMPLE / name, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert rows[0] == header
    assert all(len(row) == len(header) for row in rows)
    assert len(rows) - 1 == rows_expected == documented_rows
    assert len(data) == documented_bytes
    assert hashlib.sha256(data).hexdigest() == documented_sha


@pytest.mark.parametrize("name", FILES)
def test_sample_file_is_a_prefix_of_the_real_glue_file(name):
    real = REAL_GLUE / name
    if not real.is_file():
        pytest.skip(f"no real GLUE copy at {real}")
    data = (SAMPLE / name).read_bytes()
    with open(real, "rb") as f:
        assert f.read(len(data)) == data, f"{name} is not the leading lines of {real}"


def test_readme_quickstart_uses_only_the_sample():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quickstart = _load_quickstart()
    if not any(line.strip() == quickstart.MARKER for line in readme.splitlines()):
        pytest.skip(f"README.md has no {quickstart.MARKER} block yet")
    commands = quickstart.extract_commands(readme)  # exactly one well-formed block, else QuickstartError
    data_dirs = []
    for source, display in commands:
        words = shlex.split(source, comments=True)
        assert not any("shared" in word for word in words), f"the quick start must not need ../shared: {display}"
        values = {}
        for i, word in enumerate(words):
            for flag in ("--data_dir", "--dataset_name"):
                if word == flag and i + 1 < len(words):
                    values[flag] = words[i + 1]
                elif word.startswith(flag + "="):
                    values[flag] = word.split("=", 1)[1]
        if "--data_dir" in values:
            data_dir = posixpath.normpath(values["--data_dir"])
            assert data_dir == SAMPLE_DIR, f"--data_dir must be {SAMPLE_DIR}, not {values['--data_dir']}: {display}"
            data_dirs.append(data_dir)
            task = values.get("--dataset_name")
            assert task in TASK_FOLDERS, f"the sample holds only {sorted(TASK_FOLDERS)}, not {task}: {display}"
    assert data_dirs, f"no quick-start command passes --data_dir {SAMPLE_DIR} (it would need the hub)"


def test_extract_commands_joins_continuations_and_skips_comments():
    quickstart = _load_quickstart()
    readme = ("# Title\n\n" + quickstart.MARKER + "\n```bash\n# a comment\npython a.py --x 1 \\\n    --y 2\n\n"
              "python b.py  # trailing comment\n```\n")
    assert quickstart.extract_commands(readme) == [("python a.py --x 1 \\\n    --y 2", "python a.py --x 1 --y 2"),
                                                    ("python b.py  # trailing comment",
                                                     "python b.py  # trailing comment")]
    for broken in ("no block\n", quickstart.MARKER + "\n\n```bash\nls\n```\n", quickstart.MARKER + "\n```bash\nls\n",
                   (quickstart.MARKER + "\n```bash\nls\n```\n") * 2, quickstart.MARKER + "\n```bash\n```\n"):
        with pytest.raises(quickstart.QuickstartError):
            quickstart.extract_commands(broken)
