"""The public surface: each module's ``__all__`` is exactly what the README's table says,
and every name in it exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def documented() -> dict[str, set[str]]:
    text = README.read_text()
    section = text[text.index("## Public API"):text.index("## Layout")]
    table: dict[str, set[str]] = {}
    for row in re.findall(r"^\| `([\w.]+)` \| (.+) \|$", section, re.M):
        module, cell = row
        # Backticked names only; words in parentheses describe, they are not exports.
        table[module] = set(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", cell)))
    return table


def test_the_readme_documents_every_module_with_an_all():
    package = Path(__file__).parent.parent / "metis_stream"
    with_all = {".".join(path.relative_to(package.parent).with_suffix("").parts)
                .removesuffix(".__init__")
                for path in package.rglob("*.py") if "__all__ = [" in path.read_text()}
    assert with_all == set(documented())


@pytest.mark.parametrize("module", sorted(documented()))
def test_exports_are_what_the_readme_says(module):
    imported = importlib.import_module(module)
    assert set(imported.__all__) == documented()[module]
    assert len(imported.__all__) == len(set(imported.__all__))
    for name in imported.__all__:
        assert hasattr(imported, name), f"{module}.{name}"
