"""Every shiq-toy / shiq-llm command in the ```bash blocks of README.md and of the documentation pages runs as
written, page after page in the site's order, each page's commands in order, in one fresh copy of the
repository's tracked files (issues #8 and #15).

The commands run unchanged (flags and paths as printed, no environment variable to shorten them): a documented
command is itself short (its ``--quick`` or small options, as a user would type them), and a command at its full
budget is shown in a ```text block with its measured time, which this test does not run. Pages share their
outputs as a reader following the site does (the practitioners' ``data/`` is reused by later pages). Not run:
installation lines (pip, venv), the test commands themselves (``python -m pytest``), scripts (``python …``, the
benchmarks measure minutes of work by design), and commands for a server or an interactive program
(``mkdocs serve``, ``jupyter``). Each command is the program's ``main(argv)`` — what its console script calls —
in a forked child of one process that imported the programs once (``tests/run_commands.py``: the imports cost
seconds per process). The copy is a git repository with the tracked files committed, so that the test
also checks that ``.gitignore`` covers everything the documented commands write.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("shiq-toy", "shiq-llm")
README_MAX_LINES = 250


def readme_commands(text: str) -> list[tuple[str, int]]:
    """The shiq-toy / shiq-llm commands of the ```bash blocks, in order (``&&`` chains split, comments cut),
    each with the exit status its comment announces ("exit status N"), else 0. ```text blocks are templates or
    full-budget runs, not run."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            announced = re.search(r"#.*exit status (\d+)", line)
            line = re.sub(r"\s+#.*$", "", line).strip()
            for part in (p.strip() for p in line.split("&&")):
                if part.split(" ", 1)[0] in PROGRAMS:
                    commands.append((part, int(announced.group(1)) if announced else 0))
    return commands


def documented_pages(root: Path = ROOT) -> list[Path]:
    """README.md, then every page of mkdocs.yml's nav in nav order (the order a reader follows)."""
    config = (root / "mkdocs.yml").read_text()
    nav = config[config.index("\nnav:") :]
    pages = re.findall(r"^\s*-\s+(?:[^:\n]+:\s+)?([\w/.-]+\.md)\s*(?:#.*)?$", nav, re.M)
    return [root / "README.md", *(root / "docs" / page for page in pages if (root / "docs" / page).is_file())]


def test_the_documented_commands_are_found():
    pages = documented_pages()
    commands = {page.name: [c for c, _ in readme_commands(page.read_text())] for page in pages}
    assert "shiq-toy bandit --out figures/" in commands["README.md"]  # the main job
    every = [c for page in commands.values() for c in page]
    assert any(c.startswith("shiq-llm train --config configs/shiq_synthetic.yaml") for c in every)
    assert any(c.startswith("shiq-toy verify") for c in every) and any(c.startswith("shiq-llm demo") for c in every)
    assert readme_commands("```bash\nfoo && shiq-toy tree --out x/   # a comment\n```\n") == [("shiq-toy tree --out x/", 0)]
    assert readme_commands("```bash\nshiq-toy verify x:y   # fails: exit status 1\n```\n") == [("shiq-toy verify x:y", 1)]
    assert readme_commands("```text\nshiq-toy gym --out x/\n```\n") == []


def test_every_page_with_commands_is_in_the_nav():
    listed = set(documented_pages())
    with_commands = {page for page in (ROOT / "docs").rglob("*.md") if readme_commands(page.read_text())}
    assert with_commands <= listed, f"pages whose commands would not run: {sorted(map(str, with_commands - listed))}"


def test_the_readme_is_a_front_door_and_ci_installs_as_it_says():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    install, test = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci, ".ci/run must install and test exactly as README.md's first block says"


def _fresh_copy(repo: Path) -> None:
    """The tracked files in ``repo``, committed there, so that ``git status`` shows what the commands write."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]
    for argv in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "tracked files"]):
        subprocess.run([*git, *argv], cwd=repo, check=True, capture_output=True)


def test_every_documented_command_runs_as_written_in_order(tmp_path):
    repo, logs = tmp_path / "clone", tmp_path / "logs"
    repo.mkdir()
    logs.mkdir()
    _fresh_copy(repo)
    commands = [(page.relative_to(repo), command, status) for page in documented_pages(repo)
                for command, status in readme_commands(page.read_text())]
    env = {k: v for k, v in os.environ.items() if k != "SHIQ_STEP_CAP"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "run_commands.py"), str(repo), str(logs)], env=env,
                          input=json.dumps([(shlex.split(command), status) for _, command, status in commands]),
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    statuses = json.loads(done.stdout)
    for (page, command, _), (status, seconds) in zip(commands, statuses):  # shown with pytest -s / -rP
        print(f"{seconds:7.1f} s  {status}  {page}: {command}")
    for number, ((page, command, expected), (status, _)) in enumerate(zip(commands, statuses)):
        log = (logs / f"{number}.log").read_text()
        assert status == expected, f"{page}: exited {status}, not {expected}: {command}\n{log[-3000:]}"
    assert len(statuses) == len(commands)
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True).stdout
    assert not status, f"the documented commands wrote paths that .gitignore does not cover:\n{status}"
