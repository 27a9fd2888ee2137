"""Shared test set-up: offline Hugging Face hub, deterministic hypothesis profile, float64 toys."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests run tiny tensors: one intra-op thread is fastest, and CI runs two xdist workers on two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- The test suite leaves the working tree as it found it (issue #15): `git status --porcelain` at the end of the
# session must equal its value at the start, or the run fails naming the paths the tests wrote. Checked on the
# controller only (pytest-xdist workers have ``workerinput``), once for the whole run; not checked outside a git
# checkout (an unpacked sdist).

import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_GIT_STATUS = pytest.StashKey[frozenset]()


def _git_status() -> frozenset | None:
    try:
        done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return frozenset(done.stdout.splitlines()) if done.returncode == 0 else None


def pytest_sessionstart(session):
    if hasattr(session.config, "workerinput"):
        return
    status = _git_status()
    if status is not None:
        session.config.stash[_GIT_STATUS] = status


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput") or _GIT_STATUS not in session.config.stash:
        return
    after = _git_status()
    if after is None:
        return
    changed = sorted(after - session.config.stash[_GIT_STATUS])
    if changed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = ("the tests changed the working tree (`git status --porcelain` differs from the start of the run; "
                   "write to tmp_path):\n" + "\n".join(f"  {line}" for line in changed))
        if reporter is not None:
            reporter.write("\n")
            reporter.write_sep("=", "working tree not clean", red=True)
            reporter.write_line(message)
        else:
            print(message)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
