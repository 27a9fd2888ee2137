"""The embedded task's reward-vs-KL experiment (``shiq-llm demo``): the reference and offline data of
:mod:`shiq_llm.tasks.synthetic`, then the sweep ``shiq_llm/experiments/embedded_sweep.yaml``
(:mod:`shiq_llm.experiments.sweep`: every ``(algo, β)`` trained with ``ShiQTrainer``, evaluated on the held-out
prompts, ``results.csv`` and ``reward_vs_kl.png``). The other LLM experiments reuse its data and sweep settings.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from shiq_toy.experiments import num_threads
from shiq_toy.options import option

__all__ = ["DemoConfig", "run_demo", "demo_sweep_config", "prepare_single_turn_data", "EMBEDDED_SWEEP",
           "quiet_libraries"]




@dataclass
class DemoConfig:
    """Arguments of ``shiq-llm demo`` (defaults: the full demo, about 3 minutes on a 2-core CPU)."""

    out: str = option("demo", 'Output directory: data/ (reference, rows), runs/<algo>_beta<β>/ (trainer outputs), '
                      'the CSV and figure.', aliases=("output_dir",), path="out_dir")
    algos: tuple[str, ...] = option(("shiq", "dpo", "copg", "dro"), 'Methods trained '
                                    '(``shiq_llm.train.config.LLM_METHODS``).')
    betas: tuple[float, ...] = option((0.1, 0.3, 1.0), 'β of every method.')
    steps: int = option(150, 'Optimizer steps per run.')
    lr: float = option(1e-3, 'AdamW learning rate (linear decay), the same for every method.', aliases=("learning_rate",))
    batch_size: int = option(32, 'Sequences per step; dpo and copg take batch_size // 2 pairs, i.e. as many '
                             'sequences.')
    completions_per_prompt: int = option(16, 'Offline completions sampled from the reference per training prompt.')
    ref_steps: int = option(600, 'Supervised steps of the reference '
                            '(``shiq_llm.tasks.synthetic.ReferenceConfig.steps``).')
    eval_samples: int = option(16, 'Completions sampled per held-out prompt to evaluate each policy.')
    max_new_tokens: int = option(12, 'Generation budget (a correct answer is 5 tokens: four numbers and EOS).')
    seed: int = option(0, 'Seed of the reference, the data, the training runs and the evaluation samples.')
    data: str | None = option(None, 'An existing ``make-data`` directory to reuse instead of building the reference '
                              'and rows (OUT/data).', aliases=("dataset_name",), path="in_dir")
    progress: bool = option(True, 'Show tqdm progress bars.')
    threads: int = option(1, "torch CPU threads during the demo (restored afterwards). The tiny model's matrices are "
                          'too small for intra-op parallelism: with 2 threads on a busy 2-core machine the demo ran '
                          'several times slower.')

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """A reduced budget (under a minute): the same reference, data and runs, but only shiq and dpo at β = 0.1."""
        values = dict(algos=("shiq", "dpo"), betas=(0.1,))
        return cls(**{**values, **overrides})


def prepare_single_turn_data(default: Path, given: str, *, ref_steps: int, completions_per_prompt: int,
                             max_new_tokens: int, seed: int, progress: bool = False, words: int | None = None,
                             vocab_size: int | None = None) -> Path:
    """The counting task's data directory: ``given`` (checked) or ``default``, built once with these settings
    (:func:`shiq_llm.tasks.synthetic.make_data`; ``shiq_llm.experiments.prepare_data``). ``words`` and
    ``vocab_size`` (default: ``ReferenceConfig``'s) make the long-horizon variant."""
    from shiq_llm.experiments import prepare_data
    from shiq_llm.tasks import synthetic

    sizes = {k: v for k, v in (("words", words), ("vocab_size", vocab_size)) if v is not None}
    reference = synthetic.ReferenceConfig(steps=ref_steps, seed=seed, **sizes)
    settings = {"reference": reference.__dict__, "completions_per_prompt": completions_per_prompt,
                "max_new_tokens": max_new_tokens, "seed": seed}

    def build(path: Path) -> None:
        synthetic.make_data(path, reference=reference, completions_per_prompt=completions_per_prompt,
                            max_new_tokens=max_new_tokens, seed=seed, progress=progress)

    return prepare_data(given, default, settings, build, command="shiq-llm make-data")


def quiet_libraries() -> None:
    """Silence per-run chatter (dataset save bars, weight-loading bars, trainer INFO logs) under the demo's bar."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("shiq_llm").setLevel(logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # "removed shared tensor" on every tied-weights save


def _run_name(algo: str, beta: float) -> str:
    return f"{algo}_beta{beta:g}"


def run_demo(config: DemoConfig = DemoConfig(), *, log: Callable[[str], None] = print) -> list[dict]:
    """Run the demo (module docstring): the embedded task's data, then the sweep of
    ``shiq_llm/experiments/embedded_sweep.yaml`` with this config's overrides; returns the result rows.

    Writes ``OUT/results.csv``, ``OUT/reward_vs_kl.png`` and, unless ``config.data`` is given, ``OUT/data/``.
    """
    with num_threads(config.threads):
        return _run_demo(config, log)


#: The sweep file of the embedded task that ``shiq-llm demo`` runs.
EMBEDDED_SWEEP = Path(__file__).resolve().parent / "embedded_sweep.yaml"


def demo_sweep_config(config: DemoConfig, data_dir: Path):
    """The SweepConfig of the demo: :data:`EMBEDDED_SWEEP` with the demo's options."""
    from shiq_llm.experiments.sweep import load_sweep_config

    base = load_sweep_config(EMBEDDED_SWEEP)
    train = {**base.train, "learning_rate": config.lr, "max_steps": config.steps,
             "per_device_train_batch_size": config.batch_size}
    evaluation = {**base.evaluation, "num_samples": config.eval_samples, "max_new_tokens": config.max_new_tokens,
                  "seed": config.seed + 1}
    return dataclasses.replace(base, out=str(config.out), model=str(data_dir / "reference"),
                               train_data=str(data_dir / "train.jsonl"), algos=list(config.algos),
                               betas=list(config.betas), seeds=[config.seed], train=train, evaluation=evaluation)


def _run_demo(config: DemoConfig, log: Callable[[str], None]) -> list[dict]:
    from shiq_llm.experiments.sweep import run_sweep
    from shiq_llm.train.config import LLM_METHODS

    unknown = [a for a in config.algos if a not in LLM_METHODS]
    if unknown or not config.algos:
        raise ValueError(f"algos must be a non-empty subset of {list(LLM_METHODS)}, got {list(config.algos)}")
    if not config.betas or not all(b > 0 and math.isfinite(b) for b in config.betas):
        raise ValueError(f"betas must be finite numbers > 0, got {list(config.betas)}")
    if config.batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (pair methods train on batch_size // 2 pairs), got {config.batch_size}")
    quiet_libraries()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.data is None:  # built once per settings (a directory built with other settings is refused, not reused)
        data_dir = out / "data"
        if not (data_dir / "settings.json").is_file():
            log("building the reference and the offline data …")
        prepare_single_turn_data(data_dir, None, ref_steps=config.ref_steps,
                                 completions_per_prompt=config.completions_per_prompt,
                                 max_new_tokens=config.max_new_tokens, seed=config.seed, progress=config.progress)
    else:
        data_dir = Path(config.data)
        for path in (data_dir / "reference", data_dir / "train.jsonl"):
            if not path.exists():
                raise ValueError(
                    f"--data {data_dir}: missing {path.name} (make it with `shiq-llm make-data --out {data_dir}`)"
                )
    return run_sweep(demo_sweep_config(config, data_dir), log=log, progress=config.progress)
