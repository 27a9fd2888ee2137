"""The documentation site: ``mkdocs build --strict`` succeeds (notebooks executed), fails on a broken link, a
missing page or a notebook that raises, and the built pages render in a real headless browser.

The browser is Debian's Chromium driven by Selenium through Debian's chromedriver (``apt-get install chromium
chromium-driver``; ``.ci/run`` installs both). The site is served from 127.0.0.1 by ``http.server``, as
``mkdocs serve`` would. Checked in the browser: the home page (title, nav with every notebook), one notebook page
(a figure produced at build time, decoded and laid out), one API page (mkdocstrings' entry of
``shiq_toy.losses.shiq`` with its equation), and the README figures on the toy-experiment page.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _mkdocs_build(site: Path, cwd: Path = ROOT, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=cwd, env=environment, capture_output=True, text=True
    )


class _Server:
    """The built site on http://127.0.0.1:PORT/ (a thread of ``http.server``), closed on exit."""

    def __init__(self, directory: Path):
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("headless Chromium is needed for this test: apt-get install chromium chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


IMAGES = """return Array.from(document.querySelectorAll('article img')).map(img => ({
    src: img.getAttribute('src').slice(0, 40), complete: img.complete, width: img.naturalWidth,
    shown: img.getBoundingClientRect().width}))"""


def test_site_builds_strictly_and_renders_in_a_headless_browser(tmp_path):
    site = tmp_path / "site"
    build = _mkdocs_build(site)
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stdout[-3000:]}\n{build.stderr[-6000:]}"
    assert NOTEBOOKS, "no notebook in notebooks/"
    driver = _browser()
    try:
        with _Server(site) as server:
            driver.get(server.url)
            assert "shiq" in driver.title
            assert "fine-tunes a language model with Q-learning" in driver.find_element("css selector", "article").text
            nav = driver.find_element("css selector", "nav.md-nav--primary").get_attribute("textContent")
            assert "Notebooks" in nav and "API reference" in nav
            links = [a.get_attribute("href") for a in driver.find_elements("css selector", "nav.md-nav--primary a")]
            for notebook in NOTEBOOKS:  # every notebook is in the nav (globbed by docs/hooks.py)
                assert any(link.endswith(f"/notebooks/{notebook.stem}/") for link in links), (notebook.name, links)

            driver.get(f"{server.url}notebooks/{NOTEBOOKS[0].stem}/")
            text = driver.find_element("css selector", "article").text
            assert "Traceback" not in text and "Error" not in text.split("\n")[0]
            figures = [img for img in driver.execute_script(IMAGES) if img["src"].startswith("data:image/png")]
            assert figures, f"no figure on the notebook page {NOTEBOOKS[0].name}"
            assert all(img["complete"] and img["width"] > 100 and img["shown"] > 100 for img in figures), figures

            driver.get(f"{server.url}api/shiq_toy/")
            entry = driver.find_element("css selector", '[id="shiq_toy.losses.shiq"]')
            assert entry.text.startswith("shiq")
            assert "residual_t = β (vℓ_t − vref_t) + β disc_t(ρ) − disc_t(r)" in driver.find_element("css selector", "article").text

            driver.get(f"{server.url}toy/")  # README figures, included by snippet, links rewritten by docs/hooks.py
            figures = driver.execute_script(IMAGES)
            assert {img["src"] for img in figures} >= {"../figures/bandit_regret.png", "../figures/tree_ablation.png"}, figures
            assert all(img["complete"] and img["width"] > 100 for img in figures), figures
            driver.save_screenshot(str(tmp_path / "toy.png"))
    finally:
        driver.quit()


def _copy_site_sources(tmp_path: Path) -> Path:
    """mkdocs.yml, docs/ and README.md in a scratch folder (notebooks/ left empty) to break on purpose."""
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", work / "docs")
    shutil.copy(ROOT / "mkdocs.yml", work)
    shutil.copy(ROOT / "README.md", work)
    (work / "notebooks").mkdir()
    return work


def test_strict_build_fails_on_a_broken_link_and_a_missing_page(tmp_path):
    work = _copy_site_sources(tmp_path)
    (work / "docs" / "loss.md").write_text("# The loss\n\nSee [the theory](no_such_page.md).\n")
    config = (work / "mkdocs.yml").read_text().replace("  - Benchmarks: benchmarks.md", "  - Benchmarks: benchmarks.md\n      - Gone: gone.md")
    (work / "mkdocs.yml").write_text(config)
    build = _mkdocs_build(tmp_path / "site", cwd=work, SHIQ_DOCS_EXECUTE="false")
    assert build.returncode != 0
    assert "contains a link 'no_such_page.md', but the target is not found" in build.stderr, build.stderr[-3000:]
    assert "A reference to 'gone.md' is included in the 'nav' configuration" in build.stderr, build.stderr[-3000:]
    assert "Aborted with 2 warnings in strict mode" in build.stdout


def test_strict_build_fails_on_a_notebook_that_raises(tmp_path):
    import nbformat

    work = _copy_site_sources(tmp_path)
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise RuntimeError('this notebook is broken')")])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, work / "notebooks" / "99_broken.ipynb")
    build = _mkdocs_build(tmp_path / "site", cwd=work)
    assert build.returncode != 0
    assert "this notebook is broken" in build.stdout + build.stderr
