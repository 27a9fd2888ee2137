"""MkDocs hooks of the documentation site (mkdocs.yml ``hooks:``).

* The notebooks live in ``notebooks/`` at the repository root (the test suite runs them there): each
  ``notebooks/*.ipynb`` is added to the site's files before mkdocs-jupyter executes and renders it, and appended to
  the nav's "Notebooks" section in file-name order, so a new notebook appears without editing mkdocs.yml.
* The kernels that execute the notebooks draw figures inline (``MPLBACKEND`` set for the build: a non-interactive
  backend such as Agg in the environment would leave the notebook pages without their figures).
* README.md's sections are included as they are (pymdownx.snippets, which expands them while the page is
  converted); its links into ``docs/`` (``docs/shiq-math.md``, ``docs/figures/x.png``) are rewritten to the site's
  own pages by a Markdown tree processor that runs before MkDocs checks and relativises the links.
* ``cli.md``, the command-line reference, is generated at build time: every command of ``shiq-toy`` and
  ``shiq-llm`` is taken from the programs' command tables (``commands()``: the one option dialect of
  ``shiq_toy.options``, nested commands such as ``shiq-llm experiment multiturn`` included) and its section is what
  ``PROGRAM COMMAND --help`` prints, run in this process through the program's ``main``. A ``--help`` that fails
  fails the build, so the page cannot go stale. A preview build (``SHIQ_DOCS_EXECUTE=false``: no notebook
  executed) runs no command either: its ``cli.md`` says so.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
from pathlib import Path

import markdown
import mkdocs.plugins
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = "notebooks"
CLI_PAGE = "cli.md"
#: (program, module with ``commands()`` and ``main(argv)``), in the order of the page.
PROGRAMS = (("shiq-toy", "shiq_toy.cli"), ("shiq-llm", "shiq_llm.cli"))
HELP_WIDTH = "110"  # argparse wraps to $COLUMNS: a fixed width gives the same page on every machine
FENCE = "`" * 3


def _notebooks() -> list[Path]:
    return sorted((ROOT / NOTEBOOK_DIR).glob("*.ipynb"))


class _ReadmeLinks(markdown.treeprocessors.Treeprocessor):
    """href / src "docs/PATH" (README.md's view of the repository) -> "PATH" (the site's view of docs/)."""

    def run(self, root):
        for element in root.iter():
            for attribute in ("href", "src"):
                value = element.get(attribute)
                if value and value.startswith("docs/"):
                    element.set(attribute, value[len("docs/") :])


class _ReadmeLinksExtension(markdown.Extension):
    def extendMarkdown(self, md):
        md.treeprocessors.register(_ReadmeLinks(md), "readme_links", 10)  # MkDocs' "relpath" runs at 0, after it


def command_help(main, argv: list[str]) -> str:
    """What ``PROGRAM *argv`` prints on stdout (argv ends with --help); an exit status other than 0 is an error."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            status = main(argv)
        except SystemExit as exit_:
            status = exit_.code
    if status not in (0, None):
        raise RuntimeError(f"`{' '.join(argv)}` exited with status {status}: the CLI reference cannot be built")
    return out.getvalue().rstrip()


def cli_reference() -> str:
    """The command-line reference page: every command's ``--help``, discovered from the parsers."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        lines = ["# Command-line reference", "",
                 "Generated when this site is built: every subcommand of `shiq-toy` and `shiq-llm` is found from the "
                 "programs' own command tables and shown with what its `--help` prints, so this page matches the code it "
                 "was built from.", ""]
        for program, module_name in PROGRAMS:
            module = importlib.import_module(module_name)
            lines += [f"## {program}", "", FENCE + "text", command_help(module.main, ["--help"]), FENCE, ""]
            for name, command in module.commands().items():  # every command, from the one option dialect
                path, help_line = name.split(), command.help
                text = command_help(module.main, [*path, "--help"])
                lines += [f"### {program} {name}", ""]
                if help_line:
                    lines += [help_line[:1].upper() + help_line[1:] + ".", ""]
                lines += [FENCE + "text", text.replace(FENCE, "'''"), FENCE, ""]
        return "\n".join(lines)
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous


def on_config(config):
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # inherited by the notebook kernels
    config.markdown_extensions.append(_ReadmeLinksExtension())
    for entry in config.nav or []:
        if isinstance(entry, dict) and "Notebooks" in entry:
            entry["Notebooks"] = [*entry["Notebooks"], *(f"{NOTEBOOK_DIR}/{path.name}" for path in _notebooks())]
    return config


@mkdocs.plugins.event_priority(100)  # before mkdocs-jupyter turns the .ipynb files into pages
def on_files(files, config):
    for path in _notebooks():
        files.append(File(f"{NOTEBOOK_DIR}/{path.name}", str(ROOT), config.site_dir, config.use_directory_urls))
    preview = os.environ.get("SHIQ_DOCS_EXECUTE", "true").strip().lower() in ("false", "0", "no")
    content = ("# Command-line reference\n\nThis preview was built with `SHIQ_DOCS_EXECUTE=false`, which runs no "
               "command: a full build (`mkdocs build`) writes every command's `--help` here.\n") if preview else cli_reference()
    files.append(File.generated(config, CLI_PAGE, content=content))
    return files
