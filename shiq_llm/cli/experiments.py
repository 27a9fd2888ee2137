"""``shiq-llm experiment multiturn|ablation|compare|misspecified --out DIR [--quick]``: the LLM experiments of
``shiq_llm.experiments``.

    shiq-llm experiment multiturn --out results/multiturn           # the README's run (defaults)
    shiq-llm experiment ablation --out results/ablation --quick     # a reduced budget, about 2 minutes
    shiq-llm experiment misspecified --out results/misspecified --quick
    shiq-llm experiment multiturn --help                            # every option, with its default

Each option is a field of the experiment's arguments dataclass (``MultiturnArgs``, ``AblationArgs``, ``CompareArgs``,
``ProxyArgs``), its help the field's ``metadata["help"]``. ``--quick`` lays the experiment's ``QUICK`` preset under
the options given (explicit options win). :func:`commands` gives them to ``shiq-llm`` (``shiq_llm.cli``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from shiq_llm.cli.tasks import check_data_dir
from shiq_toy.options import Command

__all__ = ["commands", "EXPERIMENTS"]

#: Experiment name -> (module, arguments class, help).
EXPERIMENTS = {
    "multiturn": ("shiq_llm.experiments.multiturn", "MultiturnArgs",
                  "credit assignment on the multi-turn task: ShiQ with per-turn rewards vs the final reward only, "
                  "ShiQ/ms, ShiQ/tk, DPO, CoPG, DRO"),
    "ablation": ("shiq_llm.experiments.ablation", "AblationArgs",
                 "ShiQ vs ShiQ/init, ShiQ/ms, ShiQ/tk on the single-turn and multi-turn embedded tasks"),
    "compare": ("shiq_llm.experiments.compare", "CompareArgs",
                "ShiQ vs DPO, CoPG, DRO, IPO with learning rates tuned on a validation split, reward at matched KL"),
    "misspecified": ("shiq_llm.experiments.misspecified", "ProxyArgs",
                     "Q3 on the embedded task: train on a proxy reward that pays for a surface feature, judge on the "
                     "true one"),
}


def _check(name: str):
    module = importlib.import_module(EXPERIMENTS[name][0])

    def check(args) -> None:
        if hasattr(module, "check_args"):
            module.check_args(args)
        if name == "multiturn":
            check_data_dir(args.data, "--data", "multi", command="shiq-llm make-multiturn-data")
        elif name == "ablation":
            check_data_dir(args.single_data, "--single-data", "single", command="shiq-llm make-data")
            check_data_dir(args.multi_data, "--multi-data", "multi", command="shiq-llm make-multiturn-data")
        elif name == "compare":
            if not args.tables_from:
                check_data_dir(args.data, "--data", "single", command="shiq-llm make-data")
        else:
            _check_proxy(args)
            check_data_dir(args.data, "--data", "single", needs=("train.jsonl",), command="shiq-llm make-data")

    return check


def _check_proxy(args) -> None:
    import math

    if not (args.bonus >= 0 and math.isfinite(args.bonus)):
        raise ValueError(f"option --bonus must be a finite number >= 0, got {args.bonus}")
    if not args.betas or not all(b > 0 and math.isfinite(b) for b in args.betas):
        raise ValueError(f"option --betas must be finite numbers > 0, got {list(args.betas)}")
    for field in ("steps", "batch_size", "eval_samples", "threads"):
        if getattr(args, field) < 1:
            raise ValueError(f"option --{field} must be >= 1, got {getattr(args, field)}")
    if not args.algos:
        raise ValueError("option --algos must name at least one method")


def _run(name: str):
    def run(args) -> int:
        from shiq_llm.experiments.sweep import SweepError

        module = importlib.import_module(EXPERIMENTS[name][0])
        try:
            result = module.main(args)
        except SweepError as error:  # every output of the finished cells is written; the failed cells are named
            print(f"shiq-llm experiment {name}: {error}")
            return 1
        if name == "misspecified":
            for row in result:
                print(f"  {row['method']:<10} β={row['beta']:<5g} true reward {row['true_reward']:.3f}  proxy "
                      f"{row['proxy_reward']:.3f}  KL {row['kl']:.3f}")
            print(f"wrote {Path(args.out) / 'misspecified_llm.csv'}, {Path(args.out) / 'misspecified_llm.png'}")
        return 0

    return run


def commands() -> dict[str, Command]:
    """``experiment multiturn``, ``ablation``, ``compare`` and ``misspecified``."""
    from shiq_llm.train.config import LLM_METHODS

    table = {}
    for name, (module_name, class_name, help_text) in EXPERIMENTS.items():
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
        methods = (*LLM_METHODS, *((module.FINAL_REWARD,) if hasattr(module, "FINAL_REWARD") else ()))
        choices = {"methods": methods, "algos": tuple(LLM_METHODS),
                   **({"tasks": module.TASKS} if hasattr(module, "TASKS") else {})}
        choices = {k: v for k, v in choices.items() if k in cls.__dataclass_fields__}
        table[f"experiment {name}"] = Command(
            f"experiment {name}", (cls,), _run(name), check=_check(name), quick=module.QUICK, choices=choices,
            help=help_text, description=module.__doc__)
    return table
