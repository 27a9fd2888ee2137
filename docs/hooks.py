"""MkDocs hooks of the documentation site (mkdocs.yml ``hooks:``).

* The notebooks live in ``notebooks/`` at the repository root (the test suite runs them there): each
  ``notebooks/*.ipynb`` is added to the site's files before mkdocs-jupyter executes and renders it, and appended to
  the nav's "Notebooks" section in file-name order, so a new notebook appears without editing mkdocs.yml.
* The kernels that execute the notebooks draw figures inline (``MPLBACKEND`` set for the build: a non-interactive
  backend such as Agg in the environment would leave the notebook pages without their figures).
* README.md's sections are included as they are (pymdownx.snippets, which expands them while the page is
  converted); its links into ``docs/`` (``docs/shiq-math.md``, ``docs/figures/x.png``) are rewritten to the site's
  own pages by a Markdown tree processor that runs before MkDocs checks and relativises the links.
"""

from __future__ import annotations

import os
from pathlib import Path

import markdown
import mkdocs.plugins
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = "notebooks"


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
    return files

