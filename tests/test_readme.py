"""The README's quickstart, run as written: its commands are the product's front door."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quickstart_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quickstart -->\s*```bash\n(.*?)```\s*<!-- /quickstart -->", text, re.S)
    assert block, "README.md lost its quickstart block"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.strip()]


def test_readme_quickstart_runs(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    commands = quickstart_commands()
    assert [c[:2] for c in commands] == [["rlens", "export"], ["rlens", "run"], ["rlens", "run"]]
    outputs = []
    for command in commands:
        # the console script and `python -m rlens.cli.main` are the same entry point
        result = subprocess.run(
            [sys.executable, "-m", "rlens.cli.main", *command[1:]],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"{shlex.join(command)} failed:\n{result.stderr}"
        outputs.append(result.stdout)
    assert "prefill logits" in outputs[0]
    # the answers the README shows, from the shipped toy model
    assert outputs[1].strip() == "2"
    answer = json.loads(outputs[2])
    assert answer["text"].strip() == "below" and answer["num_visual_tokens"] == 145


def test_readme_install_and_test_commands_are_what_ci_runs() -> None:
    text = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = re.search(r"## Set up\s*```bash\n(.*?)\n```", text, re.S)
    test = re.search(r"Run the tests:\s*```bash\n(.*?)\n```", text, re.S)
    assert install and test
    assert 'pip install torch==2.13.0 -e ".[dev]"' in install.group(1)
    assert 'pip install torch==2.13.0 -e ".[dev]"' in ci
    assert test.group(1).strip() in ci
