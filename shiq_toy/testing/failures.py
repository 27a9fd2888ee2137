"""What a failed property looks like: the result types of the oracle, and the comparisons that raise
:class:`OracleFailure` with the counterexample's inputs, the expected and the actual numbers.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

__all__ = [
    "OracleFailure",
    "PropertyResult",
    "Report",
    "as_numpy",
    "format_array",
    "format_inputs",
    "default_tolerance",
    "compare",
    "call_under_test",
    "gradcheck_property",
]


class OracleFailure(AssertionError):
    """A property broke: the message names it and shows the counterexample, expected and actual numbers."""


@dataclass(frozen=True)
class PropertyResult:
    name: str
    status: str  # "pass", "FAIL" or "n/a"
    detail: str  # what was checked, or why it does not apply
    counterexample: str = ""


@dataclass
class Report:
    target: str
    variant: str
    output: str
    examples: int
    results: list[PropertyResult] = field(default_factory=list)
    shrunk: bool = True

    @property
    def ok(self) -> bool:
        return all(r.status != "FAIL" for r in self.results)

    @property
    def failed(self) -> list[str]:
        return [r.name for r in self.results if r.status == "FAIL"]

    def table(self) -> str:
        """property → pass / FAIL / n/a, then the counterexample of each failure."""
        lines = [f"verify {self.target} as {self.variant}: {self.output}; {self.examples} hypothesis examples per property", ""]
        lines.append(f"{'property':<16}{'result':<8}checks")
        lines += [f"{r.name:<16}{r.status:<8}{r.detail}" for r in self.results]
        failed = self.failed
        lines += ["", f"{len(failed)} of {sum(r.status != 'n/a' for r in self.results)} properties failed" if failed else "all properties pass"]
        for r in self.results:
            if r.status == "FAIL":
                lines += ["", f"--- {r.name}: {'smallest counterexample found' if self.shrunk else 'first counterexample found'} ---", r.counterexample]
        return "\n".join(lines)


def as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def format_array(x) -> str:
    text = np.array2string(as_numpy(x), precision=6, suppress_small=True, max_line_width=110, threshold=120)
    return text.replace("\n", "\n" + " " * 22)


def format_inputs(**named) -> str:
    return "\n".join(f"  {name:<20}{format_array(value) if not isinstance(value, (int, float, str)) else value}" for name, value in named.items())


def default_tolerance(out: torch.Tensor, rtol: float | None, atol: float | None) -> tuple[float, float]:
    """float64 results: 1e-8; float32: 1e-4; lower precisions: 2e-2 (unless given)."""
    default = 1e-8 if out.dtype == torch.float64 else 1e-4 if out.dtype == torch.float32 else 2e-2
    return (default if rtol is None else rtol), (default if atol is None else atol)


def compare(prop: str, what: str, actual, expected, tol: tuple[float, float], inputs: str) -> None:
    actual, expected = as_numpy(actual).astype(np.float64), as_numpy(expected).astype(np.float64)
    if actual.shape != expected.shape:
        raise OracleFailure(f"property '{prop}' broke: {what}: the output has shape {actual.shape}, expected {expected.shape}\ninputs:\n{inputs}")
    rtol, atol = tol
    bad = ~(np.abs(actual - expected) <= atol + rtol * np.abs(expected))
    if bad.any():
        gap = np.where(bad, np.nan_to_num(np.abs(actual - expected), nan=np.inf), -1.0)
        where = np.unravel_index(int(np.argmax(gap)), gap.shape)
        label = "(sequence, position)" if gap.ndim == 2 else "index"
        raise OracleFailure(
            f"property '{prop}' broke: {what}\n"
            f"  at {label} {tuple(int(i) for i in where)}: expected {expected[where]:.10g}, got {actual[where]:.10g} "
            f"(tolerance {atol:g} + {rtol:g}·|expected|)\ninputs:\n{inputs}\n"
            f"  {'expected':<20}{format_array(expected)}\n  {'actual':<20}{format_array(actual)}"
        )


def call_under_test(prop: str, fn: Callable, args, kwargs, inputs: str) -> torch.Tensor:
    """Call the function under test; an exception or a non-tensor result is a failure of ``prop``."""
    try:
        out = fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - any error of the function under test is a finding
        where = traceback.format_exception_only(type(error), error)[-1].strip()
        raise OracleFailure(f"property '{prop}' broke: the function raised {where}\ninputs:\n{inputs}") from error
    if not isinstance(out, torch.Tensor):
        try:
            out = torch.as_tensor(np.asarray(out))
        except Exception:  # noqa: BLE001
            raise OracleFailure(f"property '{prop}' broke: the function returned {type(out).__name__}, not an array\ninputs:\n{inputs}") from None
    return out


def gradcheck_property(fn, leaves, inputs: str) -> None:
    """torch.autograd.gradcheck of ``fn`` at ``leaves`` (looser steps and tolerances for a float32 output)."""
    try:
        probe = fn(*leaves)
        low = probe.dtype != torch.float64
        torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-3 if low else 1e-6, atol=1e-2 if low else 1e-5, rtol=1e-2 if low else 1e-3)
    except OracleFailure:
        raise
    except Exception as error:  # noqa: BLE001 - gradcheck's GradcheckError (or a RuntimeError of autograd)
        text = str(error).strip()
        if len(text) > 1500:
            text = text[:1500] + " …"
        raise OracleFailure(
            "property 'gradient' broke: autograd's gradient differs from finite differences "
            f"(a stop-gradient / detach, or a non-differentiable step)\n  gradcheck says: {text}\ninputs:\n{inputs}"
        ) from None
