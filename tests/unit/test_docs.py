"""The documentation builds without warnings, and its runnable snippets run.

The snippets (seconds) run in the default suite; the build is slow (``tox -e slow`` or
``pytest -m slow``) and is skipped when Sphinx or the other documentation dependencies are not
installed (``pip install -e ".[docs]"``).
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import pytest

import torchbip

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SNIPPETS = sorted((DOCS / "snippets").glob("*.py"))


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::PendingDeprecationWarning")
def test_docs_build_without_warnings(tmp_path: Path) -> None:
    pytest.importorskip("sphinx")
    for extension in ("furo", "myst_parser", "sphinx_autodoc_typehints"):
        pytest.importorskip(extension)
    from sphinx.cmd.build import build_main

    out = tmp_path / "html"
    log = tmp_path / "warnings.log"
    env = {k: os.environ.pop(k) for k in ("TORCHBIP_DOCS_ONLINE",) if k in os.environ}
    try:
        status = build_main(
            ["-W", "--keep-going", "-q", "-b", "html", "-w", str(log), "-d", str(tmp_path / "doctrees"),
             str(DOCS), str(out)]
        )  # fmt: skip
    finally:
        os.environ.update(env)
    assert status == 0, log.read_text()
    assert log.read_text().strip() == ""

    for page in ("index", "quickstart", "concepts", "failure_modes", "differences", "benchmarks"):
        assert (out / f"{page}.html").is_file(), page
    api = out / "api"
    pages = {p.stem for p in api.glob("*.html")}
    assert {"index", "global_prune", "config", "method", "report", "bilevel", "masks"} <= pages
    assert {"baselines", "datasets", "testing", "structured", "export"} <= pages
    html = "".join(p.read_text(encoding="utf-8") for p in api.glob("*.html"))
    for name in torchbip.__all__:
        if not name.startswith("__"):
            assert f'id="torchbip.{name}"' in html or f'id="module-torchbip.{name}"' in html, name
    for module in ("bilevel", "masks", "baselines", "datasets", "testing.contract", "testing.strategies"):
        assert f'id="module-torchbip.{module}"' in html, module
    # The formulas are there for MathJax, and links into torch's docs come from the inventory.
    concepts = (out / "concepts.html").read_text(encoding="utf-8")
    assert 'src="_static/mathjax/tex-chtml.js"' in concepts  # shipped, no CDN
    assert (out / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert "docs.pytorch.org/docs/stable/generated/torch.nn.utils.prune.remove.html" in (
        out / "quickstart.html"
    ).read_text(encoding="utf-8")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("snippet", SNIPPETS, ids=[p.stem for p in SNIPPETS])
def test_doc_snippet_runs(snippet: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every ``docs/snippets/*.py`` (the code shown in the guides) runs as shown."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(snippet)])
    runpy.run_path(str(snippet), run_name="__main__")


def test_there_are_snippets() -> None:
    assert {p.stem for p in SNIPPETS} >= {"quickstart", "own_model", "choose_parameters", "iterative"}
