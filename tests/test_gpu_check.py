"""``benchmarks/gpu_check.py`` runs before a GPU is ever lent: the whole check at toy sizes on the CPU.

One run (a subprocess, as a user types it) writes the JSON and the markdown table; the test reads both back and
checks every row: present, finite, within its stated tolerance where it has one, and the agreements that the
check reports (log-probabilities against TRL's, bf16 against float32) recomputed from the recorded numbers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out), "--device", "cpu", "--tiny"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def _rows(report: dict, section: str) -> list[dict]:
    return [row for row in report["rows"] if row["section"] == section]


def test_every_section_has_its_rows_and_the_table_shows_them(report):
    data, table = report
    has_trl = importlib.util.find_spec("trl") is not None
    expected = {"demo": 2, "head": 3 * len(data["sizes"]["head_vocabs"]) if has_trl else len(data["sizes"]["head_vocabs"]),
                "trainer": 2 if has_trl else 1, "bf16": 3}
    assert {section: len(_rows(data, section)) for section in expected} == expected
    assert data["mode"] == "tiny" and data["environment"]["device"] == "cpu"
    for row in data["rows"]:
        assert f"| {row['section']} | {row['name']} |" in table
        if has_trl or row["section"] not in ("head", "trainer"):
            assert row["status"] == "ok", row
        else:
            assert row["status"] == "skipped: trl not installed", row


def test_measured_values_are_finite_and_within_the_stated_tolerances(report):
    data, _ = report
    for row in data["rows"]:
        if row["status"] != "ok":
            continue
        for key in ("value", "reference", "candidate", "tolerance"):
            if key in row:
                assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (key, row)
    for row in _rows(data, "demo"):  # |bf16 − fp32| within 3 standard errors + the floor, recomputed
        assert row["value"] == pytest.approx(row["candidate"] - row["reference"], abs=1e-12)
        assert abs(row["value"]) <= row["tolerance"]
    for row in _rows(data, "head"):
        if "log p" in row["name"]:
            assert 0 <= row["value"] <= data["tolerances"]["head_logprob"]
        else:  # a ratio ours / TRL of two positive measurements
            assert row["value"] == pytest.approx(row["candidate"] / row["reference"], rel=1e-9)
            assert row["reference"] > 0 and row["candidate"] > 0
    for row in _rows(data, "trainer"):
        assert row["reference"] > 0 and row["candidate"] > 0
        assert row["value"] == pytest.approx(row["candidate"] / row["reference"], rel=1e-9)
    bf16 = {row["name"].split(":")[1].strip(): row for row in _rows(data, "bf16")}
    loss = bf16["relative difference bf16 vs fp32"]
    assert loss["value"] == pytest.approx(abs(loss["candidate"] - loss["reference"]) / abs(loss["reference"]), rel=1e-6)
    assert loss["value"] <= data["tolerances"]["bf16"]["loss_rel"]
    assert data["tolerances"]["bf16"]["grad_cosine"] <= bf16["cosine similarity bf16 vs fp32"]["value"] <= 1 + 1e-6
    assert 0 < bf16["relative L2 difference bf16 vs fp32"]["value"] <= data["tolerances"]["bf16"]["grad_rel_l2"]
