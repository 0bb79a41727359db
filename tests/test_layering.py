"""Package layering: ``fae_pipe.data`` reads caches, so ``fae_pipe.cache`` must never import it.

Checked on the source with ``ast`` (function-local imports included), so an import
hidden inside a function cannot bring the cycle back unnoticed.
"""

import ast
from pathlib import Path

import fae_pipe.cache

FORBIDDEN = "fae_pipe.data"


def _imports(tree: ast.AST, package: str):
    """(line, module) of every import in ``tree``, relative imports resolved against ``package``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:  # ``from fae_pipe import data``
                yield node.lineno, f"{module}.{alias.name}"


def test_cache_never_imports_data():
    root = Path(fae_pipe.cache.__file__).parent
    files = sorted(root.glob("*.py"))
    assert len(files) > 3, f"no modules found under {root}"
    bad = [f"{f.name}:{line} imports {module}" for f in files
           for line, module in _imports(ast.parse(f.read_text(), str(f)), "fae_pipe.cache")
           if module == FORBIDDEN or module.startswith(FORBIDDEN + ".")]
    assert not bad, "fae_pipe.cache must not import fae_pipe.data (data imports cache): " + "; ".join(bad)


def test_the_check_sees_function_local_and_relative_imports():
    src = "def f():\n    from fae_pipe.data.index import read_index\nfrom .. import data\n"
    found = {m for _, m in _imports(ast.parse(src), "fae_pipe.cache")}
    assert {"fae_pipe.data.index", "fae_pipe.data"} <= found
