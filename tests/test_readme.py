"""The README's commands are what a newcomer runs: its own-data example trains on a generated TSV folder, and it
stays a front door (at most 200 lines, every page it links exists)."""

import json
import pathlib
import re
import shlex
import subprocess
import sys

from tests.multidevice import REPO as REPO_DIR, device_env

REPO = pathlib.Path(REPO_DIR)
README = REPO / "README.md"


def _own_data_command() -> list[str]:
    """The README's ``finetune.py:tsv:...`` example as argv (continuation lines joined, comments dropped)."""
    text = README.read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "finetune.py:tsv:" in b)
    return shlex.split(block.replace("\\\n", " "), comments=True)


def test_the_own_data_example_trains_on_a_generated_tsv(tmp_path):
    argv = _own_data_command()
    assert argv[:3] == ["python", "-m", "experiments.main"]
    spec = next(a for a in argv if a.startswith("--config="))[len("--config="):]
    task = spec.partition(":")[2]
    columns = dict(item.split("=") for item in task.partition(":")[2].split(","))
    data = tmp_path / "my_data"
    data.mkdir()
    words = {"1": "great fun lovely", "0": "dull slow awful"}
    for split, n in (("train", 120), ("dev", 24)):
        rows = [f"{columns['text']}\t{columns['label']}"]
        rows += [f"item {i} was {words[str(i % 2)].split()[i % 3]}\t{i % 2}" for i in range(n)]
        (data / f"{split}.tsv").write_text("\n".join(rows) + "\n")

    command = [a.replace("path/to/my_data", str(data)).replace("runs/my_teacher", str(tmp_path / "run"))
               for a in argv[3:]]
    tiny = {"max_length": 16, "batch_size": 8, "eval_batch_size": 8, "num_train_steps": 4, "eval_every_steps": 4,
            "log_every_steps": 4, "checkpoint.every_steps": 4, "progress_bar": "off", "model.hidden_size": 16,
            "model.num_layers": 1, "model.num_heads": 2, "model.intermediate_size": 32}  # used without MiniLM
    proc = subprocess.run([sys.executable, "-m", "experiments.main", *command,
                           *(f"--config.{k}={v}" for k, v in tiny.items())],
                          cwd=REPO, env=device_env(1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["task"] == task == "tsv:text=review,label=stars"
    assert results["selection"]["examples"] == 12  # a tenth of the 120 whole training texts
    assert (tmp_path / "run" / "model" / "config.json").exists()


def test_the_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for link in re.findall(r"\]\(((?:docs|launch)/[^)#]+)\)", text):
        assert (REPO / link).exists(), link
