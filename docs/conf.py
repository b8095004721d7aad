"""Sphinx configuration of the torchbip documentation.

Build (offline, warnings are errors)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

or ``tox -e docs``. Nothing is downloaded at build time: links into the torch documentation come
from ``docs/_inv/torch.inv``, a small inventory written by ``docs/_inv/make_torch_inventory.py``.
Set ``TORCHBIP_DOCS_ONLINE=1`` to use the full inventories of torch and Python instead (this
fetches them).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document the source tree even when torchbip is not installed

import torchbip  # noqa: E402

# -- Project -----------------------------------------------------------------------------------

project = "torchbip"
author = "torchbip developers"
copyright = "torchbip developers, MIT licence"  # noqa: A001
release = torchbip.__version__
version = ".".join(release.split(".")[:2])

# The defaults of BiPConfig, for the pages: |default_upper_lr| and so on, always current.
_DEFAULTS = torchbip.BiPConfig()
rst_epilog = "\n".join(
    [f".. |default_{name}| replace:: ``{value!r}``" for name, value in _DEFAULTS.to_dict().items()]
    + [f".. |inv_default_gamma| replace:: {1 / _DEFAULTS.gamma:g}"]
)

# -- Extensions --------------------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "sphinx_autodoc_typehints",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_inv", "snippets", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
nitpicky = False

# -- autodoc, napoleon, type hints -------------------------------------------------------------

autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
    "show-inheritance": True,
}
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True
autoclass_content = "class"
autodoc_inherit_docstrings = False  # torch's own docstrings are not in Google style

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_include_init_with_doc = False
napoleon_use_rtype = False
napoleon_use_ivar = False
napoleon_attr_annotations = True

# hypothesis' @composite wraps the strategies of torchbip.testing.strategies, so their
# annotations are evaluated in hypothesis' namespace, where they cannot be resolved; the
# signatures in the pages are right, only the extra type fields are missing for those.
suppress_warnings = ["sphinx_autodoc_typehints.forward_reference"]
# sphinx-autodoc-typehints still calls an API that Sphinx 10 removes (a Python warning, not a
# documentation problem).
warnings.filterwarnings("ignore", message=".*set_application.*")

typehints_fully_qualified = False
always_document_param_types = False
typehints_document_rtype = True
typehints_document_rtype_none = False  # no "Return type: None"
typehints_use_rtype = False  # the type goes into the Returns field
typehints_use_signature = False
typehints_defaults = None

# -- Links into torch's documentation (offline) ------------------------------------------------

TORCH_DOCS = "https://docs.pytorch.org/docs/stable/"
TORCH_INVENTORY = DOCS / "_inv" / "torch.inv"

if os.environ.get("TORCHBIP_DOCS_ONLINE") == "1":
    intersphinx_mapping = {
        "torch": (TORCH_DOCS, None),
        "python": ("https://docs.python.org/3", None),
    }
elif TORCH_INVENTORY.is_file():
    intersphinx_mapping = {"torch": (TORCH_DOCS, str(TORCH_INVENTORY))}
else:  # no inventory shipped: no links into torch, and nothing to fetch
    intersphinx_mapping = {}
intersphinx_timeout = 5
intersphinx_disabled_reftypes = ["std:doc"]

# -- Math ---------------------------------------------------------------------------------------

# MathJax 3 ships with the docs (the sphinx-mathjax-offline extension copies it into
# _static/mathjax), so the formulas render without network access.

# -- MyST (markdown pages: the changelog and the benchmark results) ----------------------------

myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# -- HTML --------------------------------------------------------------------------------------

html_theme = "furo"
html_title = f"torchbip {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
pygments_style = "friendly"
pygments_dark_style = "monokai"

# -- Benchmark results: whatever benchmarks/ holds when the docs are built ---------------------

BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
_HEADING = re.compile(r"^(#{1,5}) ", re.MULTILINE)
_IMAGE = re.compile(r"!\[([^\]]*)\]\((?!https?://)([^)\s]+)\)")
_LINK = re.compile(r"(?<!!)\[([^\]]*)\]\((?!https?://|#)([^)\s]+)\)")


def _embed_markdown(path: Path, levels: int = 1) -> str:
    """A markdown file of the source tree as part of a page: headings ``levels`` down, images
    pointing at the file's folder, links to other files of the tree shown as their paths."""
    text = path.read_text(encoding="utf-8")
    text = _HEADING.sub(lambda m: "#" * levels + m.group(1) + " ", text)
    where = path.parent

    def image(m: re.Match[str]) -> str:
        return f"![{m.group(1)}]({os.path.relpath(where / m.group(2), DOCS)})"

    def link(m: re.Match[str]) -> str:
        target = os.path.relpath(where / m.group(2), ROOT)
        return f"{m.group(1)} (`{target}`)"

    return _LINK.sub(link, _IMAGE.sub(image, text)).rstrip() + "\n"


def _results_markdown() -> str:
    """MyST source for every ``*.md`` result (the README first) and its plot."""
    files = sorted(RESULTS.glob("*.md"), key=lambda p: (p.name != "README.md", p.name))
    if not files:
        return (
            "\n```{note}\nNo benchmark results are in `benchmarks/results/` in this build. Run the "
            "benchmarks (see above) and build the docs again to see their tables here.\n```\n"
        )
    parts = []
    readme = RESULTS / "README.md"
    shown = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    for md in files:
        if not md.read_text(encoding="utf-8").lstrip().startswith("#"):
            parts.append(f"### {md.stem}\n")
        parts.append(_embed_markdown(md, levels=2))
        parts.append(f"Source: `benchmarks/results/{md.name}`.\n")
        png = md.with_suffix(".png")
        if png.is_file() and png.name not in shown:  # not twice on the page
            rel = os.path.relpath(png, DOCS)
            parts.append(f"```{{image}} {rel}\n:alt: {md.stem}\n:width: 100%\n```\n")
    return "\n" + "\n".join(parts)


def _add_results(app: Any, docname: str, source: list[str]) -> None:
    if docname != "benchmarks":
        return
    readme = BENCHMARKS / "README.md"
    text = _embed_markdown(readme) if readme.is_file() else ""
    # The README's own title would repeat the page's.
    text = re.sub(r"\A\s*## [^\n]*\n", "", text)
    source[0] = source[0].replace("<!-- readme -->", text)
    source[0] = source[0].replace("<!-- results -->", _results_markdown())
    for path in [readme, *sorted(RESULTS.glob("*"))]:
        if path.is_file():
            app.env.note_dependency(str(path))


# -- The module docstring of a script (the examples), rendered as part of a page --------------


def _module_docstring_directive() -> Any:
    import ast

    from docutils import nodes
    from docutils.statemachine import StringList
    from sphinx.util.docutils import SphinxDirective

    class ModuleDocstring(SphinxDirective):
        """``.. module-docstring:: ../examples/x.py``: the script's docstring, parsed as rST."""

        required_arguments = 1

        def run(self) -> list[Any]:
            rel, path = self.env.relfn2path(self.arguments[0])
            try:
                source = Path(path).read_text(encoding="utf-8")
            except OSError:
                para = nodes.paragraph(text=f"({self.arguments[0]} is not in this source tree.)")
                return [para]
            self.env.note_dependency(rel)
            doc = ast.get_docstring(ast.parse(source)) or ""
            container = nodes.container(classes=["module-docstring"])
            self.state.nested_parse(StringList(doc.splitlines(), source=path), self.content_offset, container)
            return [container]

    return ModuleDocstring


# -- Check that every public name of torchbip is documented ------------------------------------


def _check_public_api(app: Any, env: Any) -> None:
    from sphinx.util import logging

    objects = env.get_domain("py").objects
    missing = [
        name
        for name in torchbip.__all__
        if not name.startswith("__") and f"torchbip.{name}" not in objects
    ]
    if missing:
        logging.getLogger(__name__).warning(
            "torchbip.__all__ names without an API entry (add them to docs/api/): %s",
            ", ".join(missing),
        )


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("module-docstring", _module_docstring_directive())
    app.connect("source-read", _add_results)
    app.connect("env-check-consistency", _check_public_api)
    return {"parallel_read_safe": True}
