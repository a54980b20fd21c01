"""Sphinx configuration of the pyro_amortized documentation.

Build it with ``sphinx-build -W -b html docs docs/_build/html`` from the repository root
(``pip install -e ".[docs]"`` installs what it needs). The pages are the Markdown files in
this folder (MyST), the notebooks of ``tutorials/`` (through the ``tutorials`` symlink,
rendered as committed: they are never executed here) and one API page per module in
``api/``.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)  # the package without installing it, and models/

import pyro_amortized  # noqa: E402

project = "pyro_amortized"
author = "the pyro_amortized authors"
release = version = pyro_amortized.__version__
copyright = "the pyro_amortized authors"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]

root_doc = "index"
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = [
    "_build",
    "Thumbs.db",
    ".DS_Store",
    "**/.ipynb_checkpoints",
    # what running the notebooks writes beside them (gitignored)
    "tutorials/figures",
]

# The notebooks are committed without outputs and rendered as they are.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3  # links such as flows.md#quality-on-binarized-mnist

# autodoc: each module's page documents the names of its __all__, once, where they are
# defined; the package's re-exports link there (see _resolve_reexport below).
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autoclass_content = "class"
# Only our own docstrings: a hook of Lightning's or a method of Pyro's that a class
# overrides without a docstring is not re-documented here with its base's text.
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Torch and Pyro have no inventory here (no intersphinx offline); their names stay text.
nitpicky = False

html_theme = "furo"
html_title = f"pyro_amortized {release}"
html_static_path: list[str] = []
html_show_sourcelink = False

# pyro_amortized.local is a deprecated shim that warns when imported; it has no page, but
# keep a stray import (viewcode, autodoc's walk) quiet.
warnings.filterwarnings("ignore", "pyro_amortized.local is deprecated", FutureWarning)


def _defining_module(name: str) -> str | None:
    """The submodule of pyro_amortized whose ``__all__`` holds a re-exported name."""
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(f"pyro_amortized.{module_name}")
        if name in getattr(module, "__all__", ()):
            return module.__name__
    return None


# The modules that get a page in api/, in the order of the reference's table of contents.
PUBLIC_MODULES = [
    "guides",
    "flows",
    "encoders",
    "objectives",
    "pathgrad",
    "refinement",
    "perdatapoint",
    "diagnostics",
    "training",
    "schedules",
    "optim",
    "lightning",
    "plotting",
    "checks",
]


def _described_fields() -> set[int]:
    """The field properties of the NamedTuples whose docstring has an ``Attributes:`` section."""
    fields = set()
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(f"pyro_amortized.{module_name}")
        for name in module.__all__:
            cls = getattr(module, name)
            if isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields"):
                if "Attributes:" in (cls.__doc__ or ""):
                    fields.update(id(cls.__dict__[field]) for field in cls._fields)
    return fields


def _select_members(app, what, name, obj, skip, options):
    """Which members autodoc documents, beyond its defaults.

    - Every name of a module's ``__all__``, with a docstring or not (the reference lists
      every public name; tests/test_docs.py checks it).
    - Not the field properties ("Alias for field number 0") of a NamedTuple whose
      ``Attributes:`` section documents its fields (napoleon turns the section into
      attribute entries; the properties would describe each field twice).
    """
    if what == "module":
        module = sys.modules.get(app.env.temp_data.get("autodoc:module") or "")
        if name in getattr(module, "__all__", ()):
            return False
    if id(obj) in DESCRIBED_FIELDS:
        return True
    return None


_ATTRIBUTES = ("attribute", "data", "property")
_attribute_docstrings: dict[str, list[str]] = {}


def _keep_attribute_docstring(app, what, name, obj, options, lines):
    """Before napoleon: keep an attribute's docstring as written.

    Napoleon reads the first line of an attribute's docstring as ``type: description``;
    ours carry their types as annotations, so a colon there is prose
    (``#: The families of per-datapoint posterior: a diagonal Normal, ...``).
    """
    if what in _ATTRIBUTES:
        _attribute_docstrings[name] = list(lines)


def _restore_attribute_docstring(app, what, name, obj, options, lines):
    """After napoleon: put the attribute's docstring back as written."""
    if what in _ATTRIBUTES and name in _attribute_docstrings:
        lines[:] = _attribute_docstrings.pop(name)


def _package_exports(app, docname, source):
    """Append to api/index the table of the package's re-exported names, with links."""
    if docname != "api/index":
        return
    lines = [
        "",
        ".. list-table:: Names exported by ``pyro_amortized``",
        "   :header-rows: 1",
        "",
        "   * - name",
        "     - defined in",
    ]
    for name in pyro_amortized.__all__:
        module = _defining_module(name)
        lines.append(f"   * - :py:obj:`~{module}.{name}`")
        lines.append(f"     - :py:mod:`{module}`")
    source[0] += "\n".join(lines) + "\n"


def _resolve_reexport(app, env, node, contnode):
    """Resolve ``pyro_amortized.X`` (a re-export) to ``pyro_amortized.<module>.X``.

    Docstrings refer to the package's names (e.g. :func:`~pyro_amortized.fit`), which
    are documented once, in their defining module.
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    head, _, attribute = target.removeprefix("pyro_amortized.").partition(".")
    if not target.startswith("pyro_amortized.") or head not in pyro_amortized.__all__:
        return None
    module = _defining_module(head)
    if module is None:
        return None
    new_target = ".".join(filter(None, [module, head, attribute]))
    domain = env.get_domain("py")
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], new_target, node, contnode
    )


DESCRIBED_FIELDS: set[int] = set()


def setup(app):
    global DESCRIBED_FIELDS
    DESCRIBED_FIELDS = _described_fields()
    app.connect("autodoc-skip-member", _select_members)
    # napoleon processes docstrings at the default priority, 500
    app.connect("autodoc-process-docstring", _keep_attribute_docstring, priority=400)
    app.connect("autodoc-process-docstring", _restore_attribute_docstring, priority=600)
    app.connect("source-read", _package_exports)
    app.connect("missing-reference", _resolve_reexport)
