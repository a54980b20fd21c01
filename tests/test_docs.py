"""The documentation site builds with warnings as errors and documents every public name.

The site is built once for this module, as the README's docs command builds it
(``sphinx-build -W``), in a subprocess so that Sphinx's imports and warning filters stay
out of the test process.
"""

import importlib
import pkgutil
import posixpath
import subprocess
import sys
from pathlib import Path

import pytest
from sphinx.util.inventory import InventoryFile

import pyro_amortized

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))
PAGES = sorted(DOCS.glob("*.md"))
BENCHMARKS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
# importing it warns; its names are perdatapoint's, documented there
DEPRECATED_MODULES = {"local"}
MODULES = sorted(
    info.name
    for info in pkgutil.iter_modules(pyro_amortized.__path__)
    if not info.name.startswith("_") and info.name not in DEPRECATED_MODULES
)

pytestmark = pytest.mark.slow  # the build takes about 10 s


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs") / "html"
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    result = subprocess.run(
        [*command, str(DOCS), str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="module")
def inventory(site):
    with open(site / "objects.inv", "rb") as stream:
        by_type = InventoryFile.load(stream, "", posixpath.join)
    return {name for objects in by_type.values() for name in objects}


def test_there_are_modules_tutorials_and_pages():
    assert {"guides", "objectives", "training"} <= set(MODULES)
    assert TUTORIALS and PAGES and BENCHMARKS


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_is_in_the_api_reference(module_name, inventory):
    module = importlib.import_module(f"pyro_amortized.{module_name}")
    assert f"pyro_amortized.{module_name}" in inventory
    missing = [
        name for name in module.__all__ if f"pyro_amortized.{module_name}.{name}" not in inventory
    ]
    assert not missing, f"not in docs/api/{module_name}.rst: {missing}"


def test_every_name_of_the_package_is_documented_where_it_is_defined(inventory):
    assert "pyro_amortized" in inventory
    for name in pyro_amortized.__all__:
        homes = [
            m for m in MODULES if name in importlib.import_module(f"pyro_amortized.{m}").__all__
        ]
        assert homes, f"pyro_amortized.{name} is in no module's __all__"
        assert any(f"pyro_amortized.{m}.{name}" in inventory for m in homes), name


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_every_tutorial_is_rendered(path, site):
    page = site / "tutorials" / f"{path.stem}.html"
    assert page.is_file()
    # rendered from the notebook: its code cells are on the page
    assert 'class="cell docutils container"' in page.read_text()


@pytest.mark.parametrize("path", PAGES, ids=[p.stem for p in PAGES])
def test_every_page_is_rendered(path, site):
    assert (site / f"{path.stem}.html").is_file()


@pytest.mark.parametrize("path", BENCHMARKS, ids=[p.stem for p in BENCHMARKS])
def test_every_benchmark_has_a_page(path, site):
    """Each script of benchmarks/ is named, with its measurements, on a page of the site."""
    pages = [
        p.stem for p in PAGES if p.stem != "index" and f"benchmarks/{path.name}" in p.read_text()
    ]
    assert pages, f"no page of docs/ names benchmarks/{path.name}"
    assert all((site / f"{page}.html").is_file() for page in pages)
