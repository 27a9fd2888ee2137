"""Every shiq-toy / shiq-llm command in README.md's code blocks runs as written, in README order, in a fresh copy
of the repository's tracked files (issue #8, item 1).

The commands run unchanged (flags and paths as printed); only their step counts are capped through the
environment variable ``SHIQ_STEP_CAP`` (``shiq_toy.experiments.step_cap``), so that the whole README runs in
minutes. Not run here: installation lines (pip, venv), the test commands themselves (``python -m pytest``), the
benchmark scripts (``python benchmarks/…``: they measure minutes of work by design), and commands for a server
or an interactive program (``mkdocs serve``, ``jupyter``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("shiq-toy", "shiq-llm")


def readme_commands(text: str) -> list[tuple[str, int]]:
    """The shiq-toy / shiq-llm commands of the ```bash blocks, in order (``&&`` chains split, comments cut),
    each with the exit status its comment announces ("exit status N"), else 0. ```text blocks are templates."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            announced = re.search(r"#.*exit status (\d+)", line)
            line = re.sub(r"\s+#.*$", "", line).strip()
            for part in (p.strip() for p in line.split("&&")):
                if part.split(" ", 1)[0] in PROGRAMS:
                    commands.append((part, int(announced.group(1)) if announced else 0))
    return commands


def test_the_readme_has_the_documented_commands():
    commands = [c for c, _ in readme_commands((ROOT / "README.md").read_text())]
    assert any(c.startswith("shiq-toy bandit") for c in commands)
    assert any(c.startswith("shiq-llm train --config configs/shiq_synthetic.yaml") for c in commands)
    assert readme_commands("```bash\nfoo && shiq-toy tree --out x/   # a comment\n```\n") == [("shiq-toy tree --out x/", 0)]
    assert readme_commands("```bash\nshiq-toy verify x:y   # fails: exit status 1\n```\n") == [("shiq-toy verify x:y", 1)]


def test_every_readme_command_runs_as_written_in_order(tmp_path):
    repo = tmp_path / "clone"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    env = dict(os.environ, SHIQ_STEP_CAP="2", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    bin_dir = Path(sys.executable).parent
    for command, status in readme_commands((repo / "README.md").read_text()):
        argv = shlex.split(command)
        argv[0] = str(bin_dir / argv[0]) if (bin_dir / argv[0]).exists() else argv[0]
        done = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == status, f"README command exited {done.returncode}, not {status}: {command}\n{done.stderr[-3000:]}"
