"""Run documented ``shiq-toy`` / ``shiq-llm`` commands as their console scripts do, each in a forked child of one
process that imported the two programs once (``tests/test_readme.py``).

    python tests/run_commands.py REPO LOG_DIR < commands.json > statuses.json

``commands.json`` is a list of ``[argv, expected exit status]`` (``[["shiq-llm", "train", ...], 0]``), run in
order with ``REPO`` as the working directory; each child calls the program's ``main(argv)`` — the function the
console script calls — with its stdout and stderr in ``LOG_DIR/N.log``, and exits with its status. The output is
the list of ``[exit status, wall seconds]``, up to the first status that is not the expected one (the later
commands may need its output).
Importing torch and transformers takes seconds of CPU per process; forking one process that already holds them
removes that cost from every command, which is what keeps the documented commands within the test budget while
they run at their own (short) settings. The parent does no torch work before forking (no thread pool to inherit).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message"): printed, status 1, as the interpreter does
    return 1


def main() -> int:
    repo, log_dir = sys.argv[1], sys.argv[2]
    commands = json.load(sys.stdin)
    sys.path[0] = os.path.dirname(sys.executable)  # a console script's path starts with its own folder, not tests/
    import shiq_llm.cli
    import shiq_toy.cli

    shiq_llm.cli.commands()  # imports every subcommand's module (and transformers) once, before the forks
    shiq_toy.cli.commands()
    programs = {"shiq-toy": shiq_toy.cli.main, "shiq-llm": shiq_llm.cli.main}
    statuses = []
    for number, (argv, expected) in enumerate(commands):
        sys.stdout.flush()
        sys.stderr.flush()
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: run one command and leave without running the parent's clean-up
            code = 1
            try:
                os.chdir(repo)
                log = os.open(os.path.join(log_dir, f"{number}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                sys.argv = list(argv)
                code = _exit_code(programs[argv[0]](list(argv[1:])))
            except SystemExit as exit_:
                code = _exit_code(exit_.code)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        statuses.append((os.waitstatus_to_exitcode(status), round(time.perf_counter() - start, 1)))
        if statuses[-1][0] != expected:
            break
    json.dump(statuses, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
