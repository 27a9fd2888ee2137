"""shiq_toy.testing's oracle and ``shiq-toy verify``: every deliberately wrong residual of tests/wrong_residuals.py
is caught by the property it is written to break, the library's own losses and TRL's DPO loss pass, a NumPy
implementation is checked through ``from_numpy``, and a failure shows its smallest counterexample.

Budget: hypothesis examples are kept small (10 per property, no shrinking except where the message is the
subject), so the file runs in about 30 s of CPU.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from shiq_toy import baselines, losses
from shiq_toy.cli import main
from shiq_toy.testing import OracleFailure, check, from_numpy, verify
from shiq_toy.testing.properties import PROPERTIES

from . import wrong_residuals
from .trl_dpo import trl_dpo_loss

FAST = dict(max_examples=10, shrink=False)


def _status(report) -> dict[str, str]:
    return {r.name: r.status for r in report.results}


@pytest.mark.parametrize("name", sorted(wrong_residuals.CAUGHT_BY))
def test_each_wrong_implementation_is_caught_by_its_property(name):
    report = verify(getattr(wrong_residuals, name), "shiq", **FAST)
    status = _status(report)
    assert status[wrong_residuals.CAUGHT_BY[name]] == "FAIL", report.table()
    assert not report.ok
    if name == "stop_gradient":  # right values everywhere: only the gradient can see it
        assert report.failed == ["gradient"], report.table()


def test_the_correct_row_by_row_control_passes_everything():
    report = verify(wrong_residuals.correct, "shiq", **FAST)
    assert report.ok and set(_status(report).values()) == {"pass"}, report.table()


@pytest.mark.parametrize("name", sorted(losses.RESIDUALS))
def test_library_residuals_pass(name):
    report = verify(losses.RESIDUALS[name], name, **FAST)
    assert report.ok, report.table()
    assert report.output == "per-token residuals (B, T)"
    expected_na = {n for n in PROPERTIES if (n == "initialisation" and name not in ("shiq", "shiq_ms", "shiq_tk")) or (n == "telescoping" and name == "logit_q")}
    assert {n for n, s in _status(report).items() if s == "n/a"} == expected_na


def test_library_per_sequence_loss_passes_and_telescoping_does_not_apply():
    report = verify(losses.LOSSES["shiq"], "shiq", **FAST)
    assert report.ok and report.output == "per-sequence losses (B,)", report.table()
    assert _status(report)["telescoping"] == "n/a" and _status(report)["initialisation"] == "pass"


@pytest.mark.parametrize("variant,fn", [("dpo", baselines.dpo_loss), ("copg", baselines.copg_loss), ("dro", baselines.dro_loss), ("dpo", trl_dpo_loss)])
def test_library_baselines_and_trl_dpo_pass(variant, fn):
    report = verify(fn, variant, **FAST)
    assert report.ok, report.table()
    assert _status(report) == {"reference": "pass", "fixed_point": "pass", "initialisation": "n/a", "telescoping": "n/a", "mask": "n/a", "gradient": "pass"}


def test_wrong_baselines_are_caught():
    """A DPO with the sign of the margin flipped fails the reference and the exact-solution value; a DRO whose
    value gradient is cut (V detached) passes the values but not gradcheck."""
    flipped = lambda chosen, rejected, *, beta: baselines.dpo_loss(rejected, chosen, beta=beta)  # noqa: E731
    assert {"reference", "fixed_point"} <= set(verify(flipped, "dpo", **FAST).failed)
    cut = lambda delta, reward, value, *, beta: baselines.dro_loss(delta, reward, value.detach(), beta=beta)  # noqa: E731
    assert verify(cut, "dro", **FAST).failed == ["gradient"]


def test_failure_shows_the_smallest_counterexample_with_numbers():
    """Shrunk, the sign bug needs one position with a reward: expected −r, got +r."""
    report = verify(wrong_residuals.flipped_sign, "shiq", properties=("reference",), max_examples=20)
    (result,) = report.results
    text = result.counterexample
    assert result.status == "FAIL" and "property 'reference' broke" in text
    assert "smallest counterexample found" in report.table()
    mask_line = next(line for line in text.splitlines() if line.strip().startswith("mask"))
    assert mask_line.split()[1:] == ["[[1]]"], text  # one sequence of one token
    expected = float(text.split("expected ")[1].split(",")[0])
    got = float(text.split("got ")[1].split(" ")[0])
    assert got == -expected != 0, text  # β(vℓ − vref) + βρ − r versus ... + r with ℓ = ℓ_ref: −r against +r


def test_gradient_failure_names_numerical_and_analytical():
    report = verify(wrong_residuals.stop_gradient, "shiq", properties=("gradient",), max_examples=10)
    text = report.results[0].counterexample
    assert "property 'gradient' broke" in text and "numerical" in text and "analytical" in text


def _shiq_numpy(policy, ref, rewards, mask, *, beta, gamma):
    """The README's NumPy ShiQ: a loop over each row's masked-in positions."""
    rho = (policy.logit_taken - policy.logsumexp) - (ref.logit_taken - ref.logsumexp)
    out = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        t = np.flatnonzero(mask[b])
        x = beta * rho[b, t] - rewards[b, t]
        disc = np.zeros(len(t))
        for j in reversed(range(len(t))):
            disc[j] = x[j] + (gamma * disc[j + 1] if j + 1 < len(t) else 0.0)
        out[b, t] = beta * (policy.logsumexp[b, t] - ref.logsumexp[b, t]) + disc
    return out


def test_numpy_implementation_through_the_adapter():
    report = verify(from_numpy(_shiq_numpy), "shiq", **FAST)
    assert report.ok, report.table()
    assert _status(report)["gradient"] == "n/a"
    as_float32 = from_numpy(lambda *a, **k: _shiq_numpy(*a, **k).astype(np.float32))
    assert verify(as_float32, "shiq", **FAST).ok  # float32 output: float32 tolerances
    no_gamma = from_numpy(lambda *a, gamma, **k: _shiq_numpy(*a, gamma=1.0, **k))
    assert {"reference", "telescoping"} <= set(verify(no_gamma, "shiq", **FAST).failed)


def test_check_raises_with_the_table_and_bad_arguments_are_named():
    with pytest.raises(OracleFailure, match=r"(?s)mask\s+FAIL.*property 'mask' broke"):
        check(wrong_residuals.missing_mask, "shiq", properties=("mask",), **FAST)
    assert check(losses.shiq, "shiq", properties=("reference",), **FAST).ok
    with pytest.raises(ValueError, match="unknown variant 'ppo'"):
        verify(losses.shiq, "ppo")
    with pytest.raises(ValueError, match="unknown properties"):
        verify(losses.shiq, "shiq", properties=("speed",))


def test_an_output_of_the_wrong_shape_fails_every_property():
    report = verify(lambda policy, ref, rewards, mask, *, beta, gamma: rewards.sum(), "shiq", **FAST)
    assert report.failed == list(PROPERTIES)
    assert "expected (B, T) residuals or (B,) per-sequence losses" in report.results[0].counterexample


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_exit_status_and_table(capsys, tmp_path):
    args = ["--examples", "5", "--no-shrink"]
    assert main(["verify", "tests.wrong_residuals:flipped_sign", "--as", "shiq", "--properties", "reference,gradient", *args]) == 1
    out = capsys.readouterr().out
    assert "reference       FAIL" in out and "gradient        pass" in out and "property 'reference' broke" in out
    assert main(["verify", "shiq_toy.losses:shiq_tk", "--as", "shiq_tk", *args]) == 0
    assert "all properties pass" in capsys.readouterr().out
    module = tmp_path / "mine.py"
    module.write_text("from shiq_toy.losses import LOSSES\nshiq_loss = LOSSES['shiq']\n")
    assert main(["verify", f"{module}:shiq_loss", "--as", "shiq", "--properties", "reference,mask", *args]) == 0
    numpy_module = tmp_path / "numpy_shiq.py"
    numpy_module.write_text("import numpy as np\n\ndef zero(policy, ref, rewards, mask, *, beta, gamma):\n    return np.zeros(mask.shape)\n")
    assert main(["verify", f"{numpy_module}:zero", "--as", "shiq", "--numpy", *args]) == 1
    out = capsys.readouterr().out
    assert "initialisation  pass" in out and "reference       FAIL" in out and "gradient        n/a" in out


@pytest.mark.parametrize(
    "target,message",
    [
        ("shiq_toy.losses", "must be MODULE:FUNCTION"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("shiq_toy.losses:nope", "has no attribute 'nope'"),
        ("shiq_toy.losses:RESIDUALS", "is a dict, not a function"),
        ("missing/file.py:f", "file not found"),
    ],
)
def test_cli_bad_target_is_a_one_line_error(capsys, target, message):
    assert main(["verify", target, "--as", "shiq"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shiq-toy verify: error: ") and message in err and "Traceback" not in err


def test_reference_and_exact_import_without_hypothesis():
    """shiq_toy.testing.reference / exact need no hypothesis; the oracle names the extra to install."""
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import shiq_toy.testing.reference, shiq_toy.testing.exact, shiq_toy.testing as t\n"
        "from shiq_toy.cli import main; assert main(['verify', '--help']) == 0\n"
        "try:\n    t.verify\nexcept ModuleNotFoundError as e:\n    print('MISSING', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 'MISSING shiq_toy.testing needs hypothesis: pip install "shiq[testing]"' in out
