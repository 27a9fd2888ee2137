"""``shiq-llm experiment multiturn|ablation|compare --out DIR [--quick]``: the LLM experiments of ``shiq_llm.experiments``.

    shiq-llm experiment multiturn --out results/multiturn           # the README's run (defaults)
    shiq-llm experiment ablation --out results/ablation --quick     # a reduced budget, about 2 minutes
    shiq-llm experiment multiturn --help                            # every option, with its default

Each option is a field of the experiment's arguments dataclass (``MultiturnArgs``, ``AblationArgs``, ``CompareArgs``), its help the
field's docstring. ``--quick`` starts from the experiment's ``QUICK`` preset instead of the defaults; options
given on the command line override either. :func:`register` adds the command to ``shiq-llm`` (``shiq_llm.cli``).
"""

from __future__ import annotations

import argparse
import importlib

from shiq_toy.experiments import add_arguments, args_from_namespace

__all__ = ["register", "EXPERIMENTS"]

#: Experiment name -> (module, arguments class, help).
EXPERIMENTS = {
    "multiturn": ("shiq_llm.experiments.multiturn", "MultiturnArgs",
                  "credit assignment on the multi-turn task: ShiQ with per-turn rewards vs the final reward only, "
                  "ShiQ/ms, ShiQ/tk, DPO, CoPG, DRO"),
    "ablation": ("shiq_llm.experiments.ablation", "AblationArgs",
                 "ShiQ vs ShiQ/init, ShiQ/ms, ShiQ/tk on the single-turn and multi-turn embedded tasks"),
    "compare": ("shiq_llm.experiments.compare", "CompareArgs",
                "ShiQ vs DPO, CoPG, DRO, IPO with learning rates tuned on a validation split, reward at matched KL"),
}


def _run(args: argparse.Namespace) -> int:
    from shiq_llm.experiments.sweep import SweepError

    module = importlib.import_module(EXPERIMENTS[args.experiment][0])
    cls = getattr(module, EXPERIMENTS[args.experiment][1])
    try:
        module.main(args_from_namespace(cls, args, module.QUICK if args.quick else cls()))
    except SweepError as error:  # every output of the finished cells is written; the failed cells are named
        print(f"shiq-llm experiment {args.experiment}: {error}")
        return 1
    return 0


def register(subparsers) -> None:
    """Add ``experiment`` (with one subcommand per :data:`EXPERIMENTS` entry) to the ``shiq-llm`` subparsers; it
    sets ``handler`` to a function ``(args) -> int``."""
    from shiq_llm.train.config import LLM_METHODS

    parser = subparsers.add_parser("experiment", help="run an LLM experiment: a CSV, a figure and a table in --out",
                                   description=__doc__.split("\n\n")[0])
    experiments = parser.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    for name, (module_name, class_name, help_text) in EXPERIMENTS.items():
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
        sub = experiments.add_parser(name, help=help_text, description=module.__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        methods = (*LLM_METHODS, *((module.FINAL_REWARD,) if hasattr(module, "FINAL_REWARD") else ()))
        choices = {"methods": methods, **({"tasks": module.TASKS} if hasattr(module, "TASKS") else {})}
        add_arguments(sub, cls, choices=choices, suppress=True)
        quick = ", ".join(f"{f}={getattr(module.QUICK, f)}" for f in cls.__dataclass_fields__
                          if getattr(module.QUICK, f) != getattr(cls(), f))
        sub.add_argument("--quick", action="store_true", help=f"start from a reduced budget ({quick}); options given "
                         "here still override it")
        sub.set_defaults(handler=_run)
