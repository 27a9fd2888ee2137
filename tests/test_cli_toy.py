"""Smoke tests of every ``shiq-toy`` command with a tiny budget: exit codes, files, their contents."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shiq_toy.cli import main
from shiq_toy.experiments.bandit import BanditArgs
from shiq_toy.experiments.gym import GymArgs
from shiq_toy.experiments.misspecified import MisspecifiedArgs
from shiq_toy.experiments.online import OnlineArgs
from shiq_toy.experiments.tree import TreeArgs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    """The commands pin torch to --threads while they run and restore the setting after: checked here."""
    before = torch.get_num_threads()
    yield
    assert torch.get_num_threads() == before


def _rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def test_bandit_command(tmp_path, capsys):
    out = tmp_path / "fig"
    code = main(["bandit", "--out", str(out), "--steps", "4", "--seeds", "2", "--num-samples", "40", "--batch-size", "8"])
    assert code == 0
    header, rows = _rows(out / "bandit_regret.csv")
    assert header == ["setting", "method", "step", "regret"]
    methods = ("shiq", "shiq_init", "shifted_q", "logit_q", "dpo", "copg", "dro")
    assert {(r["setting"], r["method"]) for r in rows} == {(s, m) for s in ("offline", "online") for m in methods}
    assert len(rows) == 2 * len(methods) * 5  # steps 0..4, one evaluation per step
    assert all(math.isfinite(float(r["regret"])) and float(r["regret"]) >= 0 for r in rows)
    summary = json.loads((out / "bandit_summary.json").read_text())
    step0 = [float(r["regret"]) for r in rows if r["step"] == "0"]  # every method starts at π_ref
    assert all(math.isclose(x, summary["reference_regret"], rel_tol=1e-12) for x in step0)
    assert (out / "bandit_regret.png").stat().st_size > 10_000
    assert "regret of π_ref" in capsys.readouterr().out


def test_tree_command(tmp_path, capsys):
    out = tmp_path / "tree"
    code = main(["tree", "--out", str(out), "--steps", "6", "--eval-every", "3", "--trees", "2", "--vocab-size", "2", "--horizon", "2",
                 "--num-samples", "30", "--reward-noise", "0.1", "--methods", "shiq", "shiq_ms"])
    assert code == 0
    header, rows = _rows(out / "tree_ablation.csv")
    assert header == ["method", "step", "kl", "loss"]
    assert [(r["method"], int(r["step"])) for r in rows] == [(m, s) for m in ("shiq", "shiq_ms") for s in (0, 3, 6)]
    assert all(math.isfinite(float(r["kl"])) and math.isfinite(float(r["loss"])) for r in rows)
    summary = json.loads((out / "tree_summary.json").read_text())
    assert set(summary["methods"]) == {"shiq", "shiq_ms"} and summary["args"]["num_samples"] == 30
    assert (out / "tree_ablation.png").stat().st_size > 10_000
    assert "shiq_ms" in capsys.readouterr().out


def test_solve_tree_command(capsys):
    """v*(root) printed by backward induction equals the enumerated β ln E_π_ref[exp(R/β)] it prints."""
    assert main(["solve-tree", "--vocab-size", "3", "--horizon", "2", "--beta", "0.7", "--seed", "3"]) == 0
    text = capsys.readouterr().out
    root = float(re.search(r"v\*\(root\) = (-?[\d.]+)", text).group(1))
    check = float(re.search(r"exp\(R/β\)\] = (-?[\d.]+)", text).group(1))
    assert math.isclose(root, check, abs_tol=1e-6)
    assert len([line for line in text.splitlines() if re.match(r"\s+[01]\s", line)]) == 1 + 3  # every state listed
    assert main(["solve-tree", "--vocab-size", "2", "--horizon", "4", "--max-rows", "3"]) == 0
    assert "12 more states" in capsys.readouterr().out


def test_bad_input_exit_codes(tmp_path, capsys):
    assert main(["bandit", "--out", str(tmp_path), "--rewards", "1", "0", "--ref-probs", "0.2", "0.3", "0.5"]) == 2
    assert "same number" in capsys.readouterr().err
    assert main(["solve-tree", "--beta", "0"]) == 2
    assert "beta" in capsys.readouterr().err
    assert main(["tree", "--methods", "ppo"]) == 2
    assert "--methods" in capsys.readouterr().err
    assert main([]) == 2


@pytest.mark.parametrize(
    "command, cls", [("bandit", BanditArgs), ("tree", TreeArgs), ("gym", GymArgs), ("online", OnlineArgs), ("misspecified", MisspecifiedArgs)]
)
def test_help_documents_every_option_with_its_default(command, cls, capsys):
    from dataclasses import fields

    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
        assert "--" + f.name in text and " ".join(f.metadata["help"].split())[:20] in text, f.name
    assert text.count("(default: ") >= len(fields(cls))


def test_module_entry_point_in_a_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "shiq_toy.cli", "solve-tree", "--vocab-size", "2", "--horizon", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "v*(root)" in result.stdout
