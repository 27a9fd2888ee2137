"""What every benchmark here shares: one measurement per fresh subprocess, peak memory, timing, summaries.

A benchmark script is both the driver and its own worker: the driver calls :func:`run_worker`, which runs
``python SCRIPT --worker NAME --worker-args JSON`` in a fresh process and returns the dict that the worker
printed as the last line of its standard output; the script's ``main`` starts with
``if serve_worker(argv, {NAME: function, …}): return``. A fresh process per measurement means that each
one's peak memory is its own, and that measurements which alternate (A, B, A, B, …) share the machine's noise.
Where a fresh interpreter per measurement costs too much (importing transformers takes seconds), a
:class:`WorkerProcess` (``python SCRIPT --serve-worker``) stays up and runs one call after another: one such
process per variant keeps each variant's measurements apart, and :class:`PeakMemory` returns the freed heap
to the system (``malloc_trim``) before each, so that a measurement does not reuse pages of the previous one.

Peak memory. CPU: the growth of the process's peak resident set over what it held when :class:`PeakMemory`
started (Linux: ``VmHWM`` of ``/proc/self/status``, which :class:`PeakMemory` first resets to the current
resident set through ``/proc/self/clear_refs`` so that the set-up's own peak — a reference pass, data
loading — does not hide the measured one; elsewhere ``ru_maxrss``, which cannot be reset). CUDA:
``torch.cuda.max_memory_allocated`` over what was allocated at the start. Time: wall-clock seconds and, on
CPU, the process's CPU seconds (user + system, all threads), which other jobs disturb much less.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

__all__ = [
    "run_worker",
    "serve_worker",
    "WorkerProcess",
    "PeakMemory",
    "cpu_seconds",
    "spread",
    "format_spread",
    "word_tokenizer",
    "random_texts",
    "step_clock",
    "versions",
]

ROOT = Path(__file__).resolve().parents[1]


def run_worker(script: str | Path, name: str, kwargs: Mapping | None = None, *, timeout: float | None = None) -> dict:
    """Run ``script``'s worker ``name`` with ``kwargs`` in a fresh Python process; its printed JSON result.

    RuntimeError with the end of the worker's standard error when it fails.
    """
    command = [sys.executable, str(script), "--worker", name, "--worker-args", json.dumps(dict(kwargs or {}))]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"worker {name} {dict(kwargs or {})} of {Path(script).name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


_RESULT, _ERROR = "@@harness-result ", "@@harness-error "


class WorkerProcess:
    """A long-lived ``python SCRIPT --serve-worker`` process: :meth:`call` runs one worker in it.

    Use as a context manager (the process ends on exit). Its standard error goes to a temporary file, quoted
    when a call fails.
    """

    def __init__(self, script: str | Path):
        import tempfile

        self.script = Path(script)
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen([sys.executable, str(script), "--serve-worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.stderr, text=True, cwd=ROOT)

    def call(self, name: str, kwargs: Mapping | None = None) -> dict:
        """``workers[name](**kwargs)`` in the process; RuntimeError with its error when it fails."""
        self.process.stdin.write(json.dumps({"name": name, "kwargs": dict(kwargs or {})}) + "\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith(_RESULT):
                return json.loads(line[len(_RESULT):])
            if line.startswith(_ERROR):
                raise RuntimeError(f"worker {name} {dict(kwargs or {})} of {self.script.name} failed:\n"
                                   f"{json.loads(line[len(_ERROR):])}")
        self.stderr.seek(0)
        raise RuntimeError(f"worker process of {self.script.name} ended:\n{self.stderr.read()[-4000:]}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.stderr.close()

    def __enter__(self) -> "WorkerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve_worker(argv: Sequence[str] | None, workers: Mapping[str, Callable[..., dict]]) -> bool:
    """When ``argv`` (default ``sys.argv[1:]``) is ``--worker NAME --worker-args JSON``, run
    ``workers[NAME](**JSON)``, print its result as one JSON line and return True; with ``--serve-worker``, do
    that for each JSON request ``{"name", "kwargs"}`` read from standard input (a :class:`WorkerProcess`) until
    it closes, then return True; otherwise return False."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--serve-worker" in argv:
        import traceback

        for line in sys.stdin:
            request = json.loads(line)
            try:
                result = workers[request["name"]](**request["kwargs"])
            except Exception:  # reported to the driver, which raises
                print(_ERROR + json.dumps(traceback.format_exc()), flush=True)
            else:
                print(_RESULT + json.dumps(result), flush=True)
        return True
    if "--worker" not in argv:
        return False
    name = argv[argv.index("--worker") + 1]
    kwargs = json.loads(argv[argv.index("--worker-args") + 1]) if "--worker-args" in argv else {}
    print(json.dumps(workers[name](**kwargs)), flush=True)
    return True


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory growth of this process from :meth:`start` to :meth:`stop` (module docstring), in bytes.

    device: "cpu" or "cuda" (a torch device or its name). ``method`` says how it was measured.
    """

    def __init__(self, device="cpu"):
        self.device = str(device)
        self.base = 0
        self.method = ""

    def start(self) -> "PeakMemory":
        import gc

        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base, self.method = torch.cuda.memory_allocated(), "cuda max_memory_allocated"
            return self
        try:  # glibc: give the freed heap back, so that the measurement does not reuse resident pages
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:  # Linux: reset VmHWM to the current resident set
            Path("/proc/self/clear_refs").write_text("5")
            rss = _status_kib("VmRSS")
            if rss is None or _status_kib("VmHWM") is None:
                raise OSError
            self.base, self.method = rss * 1024, "VmHWM (reset)"
        except OSError:
            self.base, self.method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"
        return self

    def stop(self) -> int:
        """Bytes of peak growth since :meth:`start`."""
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        if self.method.startswith("VmHWM"):
            return _status_kib("VmHWM") * 1024 - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of ``values``."""
    return statistics.median(values), min(values), max(values)


def format_spread(values: Sequence[float], digits: int = 2) -> str:
    """``median [min–max]`` of ``values``."""
    mid, low, high = spread(values)
    return f"{mid:.{digits}f} [{low:.{digits}f}–{high:.{digits}f}]"


def word_tokenizer(vocab: int):
    """A word-level tokenizer of ``vocab`` ids, built locally: specials 0–3, then words w4 … w{vocab-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab)}}
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def random_texts(vocab: int, count: int, *, prompt_words: int, response_words: int, seed: int = 0):
    """``count`` triples (prompt, response a, response b) of random words of :func:`word_tokenizer`."""
    import random

    rng = random.Random(seed)
    words = lambda n: " ".join(f"w{rng.randrange(4, vocab)}" for _ in range(n))  # noqa: E731
    return [(words(prompt_words), " " + words(response_words), " " + words(response_words)) for _ in range(count)]


def step_clock(sync: Callable[[], None] | None = None):
    """A ``TrainerCallback`` timing optimizer steps 2 … max_steps (step 1 is a warm-up): ``seconds``,
    ``steps`` (timed), ``step_seconds`` (wall-clock seconds of each timed step) and ``step_cpu_seconds`` (the
    process's CPU seconds of each, which other jobs on a shared machine disturb much less) after training.
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each reading."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.start = self.last = self.last_cpu = None
            self.step_seconds: list[float] = []
            self.step_cpu_seconds: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if sync is not None:
                sync()
            now, cpu = time.perf_counter(), cpu_seconds()
            if self.last is not None:
                self.step_seconds.append(now - self.last)
                self.step_cpu_seconds.append(cpu - self.last_cpu)
            self.last, self.last_cpu = now, cpu
            if state.global_step == 1:
                self.start = now

        @property
        def seconds(self) -> float:
            return sum(self.step_seconds)

        @property
        def steps(self) -> int:
            return len(self.step_seconds)

    return StepClock()


def versions(*names: str) -> str:
    """``name version, …`` of the importable packages among ``names`` (``name -`` for the others)."""
    from importlib import metadata

    out = []
    for name in names:
        try:
            out.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(f"{name} -")
    return ", ".join(out)
