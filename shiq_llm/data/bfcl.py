"""BFCL v3 multi-turn: the model's dialogues joined with their per-turn scores, as rows of the ``bfcl`` adapter.

BFCL's own harness (``pip install bfcl-eval``; ``bfcl generate``) runs a model on the multi-turn test entries
with the tools executed between its steps and writes, per entry, the model's calls: ``result[turn][step]``.
:func:`join_results` joins three of BFCL's files by ``id`` — the test entries (``question``,
``initial_config``, ``involved_classes``), the possible answers (``ground_truth[turn]``: the calls of each turn)
and a result file — and scores every turn with a checker, giving rows in the schema
``shiq_llm.data.adapters.bfcl_multi_turn`` reads with ``calls="result"`` (``turn_scores`` one per turn)::

    python -m shiq_llm.data.bfcl rows --entries BFCL_v3_multi_turn_base.json --answers possible_answer/BFCL_v3_multi_turn_base.json \\
        --results result/MODEL/BFCL_v3_multi_turn_base_result.json --split train --out rows.jsonl [--checker bfcl]

**Per-turn scores** are cumulative, as in the embedded multi-turn task: turn k scores 1 when every turn up to
k passed, else 0 (a dialogue whose state went wrong stays wrong). Checkers:

* ``bfcl`` (:func:`bfcl_turn_scores`): BFCL's own ``multi_turn_checker`` (state of the API instances after
  executing the model's and the ground truth's calls, and the ground truth's outputs among the model's) run on
  the first k+1 turns for every k. Needs ``bfcl-eval``.
* ``exact`` (:func:`exact_turn_scores`, the default; no dependency): a turn passes when the model's calls of
  the turn, parsed with :mod:`ast`, equal the ground truth's as a multiset (same functions, same keyword
  values; order free), and a turn whose ground truth is empty passes when the model made no call. Stricter
  than BFCL's (another call sequence reaching the same state fails it).

**Held-out entries**: :func:`entry_split` puts one entry in four (by a hash of its ``id``) in ``eval``; train on
``--split train`` rows and evaluate on ``eval`` ones. :func:`first_step_reward` scores a single completion of an
evaluation prompt (the system prompt and the first user turn) against the first turn's ground truth, for
``shiq-llm sweep`` (``reward: shiq_llm.data.bfcl:first_step_reward``, ``reward_options: {answers: ROWS.jsonl}``).
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import sys
import uuid
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from shiq_llm.storage.jsonl import write_jsonl

__all__ = ["parse_calls", "exact_turn_scores", "bfcl_turn_scores", "CHECKERS", "entry_split", "read_bfcl_file",
           "join_results", "first_step_reward", "FUNC_DOC_FILES", "main"]

#: BFCL's function-doc file of each API class (``bfcl_eval/data/multi_turn_func_doc/``).
FUNC_DOC_FILES = {
    "GorillaFileSystem": "gorilla_file_system.json", "MathAPI": "math_api.json", "MessageAPI": "message_api.json",
    "TwitterAPI": "posting_api.json", "TicketAPI": "ticket_api.json", "TradingBot": "trading_bot.json",
    "TravelAPI": "travel_booking.json", "VehicleControlAPI": "vehicle_control.json",
}


def _call_string(node: ast.Call) -> str:
    name = ast.unparse(node.func)
    args = [ast.unparse(a) for a in node.args]
    kwargs = sorted(f"{k.arg}={ast.unparse(k.value)}" for k in node.keywords)
    return f"{name}({', '.join(args + kwargs)})"


def parse_calls(step: Any) -> list[str]:
    """The calls of one step in a canonical spelling (``f(a=1, b='x')``, keywords sorted): ``step`` is a string
    ``"[f(a=1), g()]"`` or ``"f(a=1)"``, a call string, or a list of them. Text that is not a list of calls
    gives ``[]`` (the step made no valid call)."""
    if isinstance(step, (list, tuple)):
        return [c for item in step for c in parse_calls(item)]
    if isinstance(step, Mapping) and len(step) == 1:  # {name: json arguments}
        (name, arguments), = step.items()
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        step = f"{name}(" + ", ".join(f"{k}={v!r}" for k, v in arguments.items()) + ")"
    if not isinstance(step, str):
        return []
    try:
        tree = ast.parse(step.strip(), mode="eval").body
    except SyntaxError:
        return []
    nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    if not all(isinstance(n, ast.Call) for n in nodes):
        return []
    return [_call_string(n) for n in nodes]


def exact_turn_scores(entry: Mapping[str, Any], model_turns: Sequence[Sequence[Any]],
                      ground_truth: Sequence[Sequence[str]]) -> list[float]:
    """Cumulative per-turn scores (module docstring, ``exact``): ``model_turns[k]`` the model's steps of turn k,
    ``ground_truth[k]`` the calls of turn k."""
    scores, ok = [], True
    for steps, truth in zip(model_turns, ground_truth):
        calls = Counter(c for step in steps for c in parse_calls(step))
        ok = ok and calls == Counter(c for call in truth for c in parse_calls(call))
        scores.append(float(ok))
    return scores


def bfcl_turn_scores(entry: Mapping[str, Any], model_turns: Sequence[Sequence[Any]],
                     ground_truth: Sequence[Sequence[str]]) -> list[float]:
    """Cumulative per-turn scores from BFCL's ``multi_turn_checker`` on the first k+1 turns, for every k (each
    prefix executed on fresh API instances). ValueError when ``bfcl-eval`` is not installed."""
    try:
        from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker
    except ImportError as error:
        raise ValueError(f"--checker bfcl needs BFCL's checker: pip install bfcl-eval ({error})") from None
    decoded = [[parse_calls(step) for step in steps] for steps in model_turns]
    category = str(entry["id"]).rsplit("_", 1)[0]
    scores, ok = [], True
    for k in range(len(ground_truth)):
        if ok:  # a fresh model name: BFCL keeps the API instances of a (model, entry) between calls
            name = f"shiq_turns_{uuid.uuid4().hex}"
            ok = bool(multi_turn_checker(decoded[: k + 1], list(ground_truth[: k + 1]), dict(entry), category,
                                         name)["valid"])
        scores.append(float(ok))
    return scores


#: Checkers of :func:`join_results` by name.
CHECKERS: dict[str, Callable[..., list[float]]] = {"exact": exact_turn_scores, "bfcl": bfcl_turn_scores}


def entry_split(entry_id: str) -> str:
    """``"eval"`` for one BFCL entry in four (crc32 of its id), else ``"train"``."""
    return "eval" if zlib.crc32(str(entry_id).encode()) % 4 == 0 else "train"


def read_bfcl_file(path: str | Path) -> list[dict]:
    """The entries of a BFCL data file (JSON Lines, as BFCL ships its ``.json`` files, or a JSON list)."""
    from shiq_llm.data.rows import read_json_records

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file {path}")
    return read_json_records(path)[0]


def _function_docs(entry: Mapping[str, Any], func_doc_dir: Path | None) -> list | None:
    if func_doc_dir is None:
        return entry.get("function")
    docs = []
    for name in entry.get("involved_classes") or []:
        if name not in FUNC_DOC_FILES:
            raise ValueError(f"entry {entry.get('id')}: no function-doc file known for class {name!r}")
        docs += read_bfcl_file(func_doc_dir / FUNC_DOC_FILES[name])
    return docs


def join_results(entries: Sequence[Mapping], answers: Sequence[Mapping], results: Sequence[Mapping], *,
                 checker: str | Callable = "exact", split: str = "all",
                 func_doc_dir: str | Path | None = None) -> list[dict]:
    """Rows ``{id, question, function?, ground_truth, result, turn_scores}`` for the ``bfcl`` adapter
    (``format_options: {calls: result}``), one per result whose entry is in ``split`` (``train``, ``eval`` or
    ``all``, :func:`entry_split`), in the result file's order. ValueError naming an id without an entry or an
    answer, or a result whose number of turns differs from the entry's."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be train, eval or all, got {split!r}")
    score = CHECKERS[checker] if isinstance(checker, str) else checker
    by_id = {e["id"]: e for e in entries}
    truth = {a["id"]: a["ground_truth"] for a in answers}
    docs_dir = Path(func_doc_dir) if func_doc_dir is not None else None
    rows = []
    for i, result in enumerate(results):
        entry_id = result.get("id")
        if entry_id not in by_id or entry_id not in truth:
            raise ValueError(f"result {i} (id {entry_id!r}): no such id in the {'entries' if entry_id not in by_id else 'answers'}")
        if split != "all" and entry_split(entry_id) != split:
            continue
        entry, turns = by_id[entry_id], result["result"]
        if not isinstance(turns, list) or len(turns) != len(entry["question"]):
            raise ValueError(f"result {i} (id {entry_id}): {len(turns) if isinstance(turns, list) else turns!r} turns, "
                             f"the entry has {len(entry['question'])}")
        row = {"id": entry_id, "question": entry["question"], "ground_truth": truth[entry_id], "result": turns,
               "turn_scores": score(entry, turns, truth[entry_id])}
        functions = _function_docs(entry, docs_dir)
        if functions:
            row["function"] = functions
        rows.append(row)
    if not rows:
        raise ValueError(f"no result in split {split!r}")
    return rows


@functools.lru_cache(maxsize=8)
def _first_turn_truth(answers: str) -> dict[str, list[str]]:
    """First user message → the calls of the first turn, from rows of :func:`join_results` (or BFCL entries
    joined with ``ground_truth``)."""
    table = {}
    for row in read_bfcl_file(answers):
        first = next(m["content"] for turn in row["question"] for m in turn if m["role"] == "user")
        table[" ".join(first.split())] = [c for call in row["ground_truth"][0] for c in parse_calls(call)]
    return table


def first_step_reward(prompt: Any, completion: str, *, answers: str) -> float:
    """1 when the completion's calls are a non-empty prefix of the first turn's ground-truth calls (or both are
    empty), else 0; the entry is found by the prompt's first user message in ``answers``."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    first = next(m["content"] for m in messages if m["role"] == "user")
    table = _first_turn_truth(str(answers))
    key = " ".join(first.split())
    if key not in table:
        raise ValueError(f"first_step_reward: prompt {first[:40]!r} is not in {answers}")
    truth, calls = table[key], parse_calls(completion)
    if not truth:
        return float(not calls)
    return float(bool(calls) and calls == truth[: len(calls)])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shiq_llm.data.bfcl rows …``: write :func:`join_results` as JSONL (module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m shiq_llm.data.bfcl", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rows = sub.add_parser("rows", help="join BFCL entries, answers and a result file into bfcl rows with per-turn scores")
    rows.add_argument("--entries", required=True, help="BFCL test entries (e.g. BFCL_v3_multi_turn_base.json)")
    rows.add_argument("--answers", required=True, help="BFCL possible answers of those entries")
    rows.add_argument("--results", required=True, nargs="+", help="result files of `bfcl generate` (several: one row "
                      "per result of each, e.g. samples of several runs)")
    rows.add_argument("--out", required=True, help="output .jsonl")
    rows.add_argument("--checker", default="exact", choices=sorted(CHECKERS), help="per-turn checker")
    rows.add_argument("--split", default="all", choices=("train", "eval", "all"), help="entries kept (entry_split)")
    rows.add_argument("--func-doc-dir", default=None, help="BFCL's multi_turn_func_doc directory: the function docs "
                      "of each entry's classes go into the rows (the adapter's system prompt)")
    args = parser.parse_args(argv)
    try:
        results = [r for path in args.results for r in read_bfcl_file(path)]
        out = join_results(read_bfcl_file(args.entries), read_bfcl_file(args.answers), results, checker=args.checker,
                           split=args.split, func_doc_dir=args.func_doc_dir)
    except (ValueError, KeyError) as error:
        print(f"python -m shiq_llm.data.bfcl: error: {error}", file=sys.stderr)
        return 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, args.out)
    scores = [s for r in out for s in r["turn_scores"]]
    print(f"wrote {len(out)} rows to {args.out}; mean turn score {sum(scores) / len(scores):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
