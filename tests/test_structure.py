"""The package's shape: the public names, the documented module paths, the old paths as deprecated aliases,
and the layering contract in pyproject.toml (import-linter: each layer imports only the layers below it)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# what `from llama3 import ...` offers (the public API contract) and where each name lives
PUBLIC = {
    "ChatFormat": "llama3.text.chat_format",
    "ChatMLFormat": "llama3.text.chat_format",
    "JinjaChatFormat": "llama3.text.template",
    "Llama": "llama3.generate.llama",
    "ModelArgs": "llama3.model.config",
    "RopeScaling": "llama3.model.config",
    "SamplingParams": "llama3.generate.params",
    "StreamDecoder": "llama3.text.tokenizer",
    "Tokenizer": "llama3.text.tokenizer",
    "Transformer": "llama3.model.transformer",
    "default_model": "llama3.weights.hub",
}

# module paths the docs show, and a name each must offer
DOCUMENTED = [
    ("llama3.serve", "create_app"),
    ("llama3.serve", "run"),
    ("llama3.model", "Transformer"),
    ("llama3.cli", "main"),
    ("llama3.eval.perplexity", "perplexity"),
    ("llama3.model.lora", "load_adapter"),
    ("llama3.train.finetune", "TrainConfig"),
    ("llama3.train.pretrain", "PretrainConfig"),
    ("llama3.weights.save", "save_quantized"),
    ("llama3.guard", "classify"),
    ("llama3.model.hooks", "logit_lens"),
]

# the flat modules of 0.1 and a name each offered: kept as deprecated aliases for one release
OLD_PATHS = [
    ("llama3.config", "ModelArgs"),
    ("llama3.config", "SamplingParams"),
    ("llama3.backends", "get_ops"),
    ("llama3.quantize", "Int4Linear"),
    ("llama3.gguf_quants", "dequantize"),
    ("llama3.checkpoint", "load_model"),
    ("llama3.checkpoint", "save_quantized"),
    ("llama3.gguf", "load_gguf_tokenizer"),
    ("llama3.tokenizer", "Tokenizer"),
    ("llama3.chat_format", "JinjaChatFormat"),
    ("llama3.generation", "Llama"),
    ("llama3.generation", "sample"),
    ("llama3.speculative", "speculative_decode"),
    ("llama3.tp", "TensorParallel"),
    ("llama3.engine", "Engine"),
    ("llama3.protocol", "ChatCompletionRequest"),
    ("llama3.lora", "add_lora"),
    ("llama3.finetune", "finetune"),
    ("llama3.perplexity", "perplexity"),
]


def test_the_public_names_are_exactly_the_contract():
    import llama3

    assert sorted(llama3.__all__) == sorted(PUBLIC)
    for name, module in PUBLIC.items():
        assert getattr(llama3, name) is getattr(importlib.import_module(module), name), name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        llama3.Nope  # noqa: B018


@pytest.mark.parametrize("module, name", DOCUMENTED)
def test_documented_module_paths_import(module, name):
    assert callable(getattr(importlib.import_module(module), name)) or getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("module, name", OLD_PATHS)
def test_old_module_paths_are_deprecated_aliases_of_the_same_objects(module, name):
    sys.modules.pop(module, None)  # the warning is given when the alias is first imported
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module(module)
    assert any(issubclass(w.category, DeprecationWarning) and module in str(w.message) for w in caught), caught
    new_modules = [m for m in (old.__doc__ or "").split("`") if m.startswith("llama3.") and m != module]
    assert any(getattr(importlib.import_module(m), name, None) is getattr(old, name) for m in new_modules), name


def test_importing_the_package_imports_no_torch():
    # `llama3 --help` must stay fast: the package and the CLI's parser import nothing heavy
    code = "import sys, llama3, llama3.cli; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_layers_contract_holds():
    """import-linter's contracts in pyproject.toml: layers import only downward, function-level imports
    included, and nothing inside the library uses the deprecated aliases."""
    pytest.importorskip("importlinter")
    r = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def _imports(path: Path) -> set[str]:
    """Every llama3 module a file imports, at any depth of the code (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llama3"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("llama3"))
    return found


def test_no_import_circle_between_the_librarys_modules():
    """A second look, independent of import-linter: the graph of module -> imported module over llama3/
    (aliases of the old paths left out) has no cycle."""
    package = ROOT / "llama3"
    old = {m.split(".")[-1] for m, _ in OLD_PATHS}
    graph = {}
    for f in package.rglob("*.py"):
        rel = f.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        if rel.parent == Path("llama3") and rel.name in old:
            continue
        graph[name] = {m for m in _imports(f) if m != name}

    def resolve(m: str) -> str | None:  # `from llama3.weights import gguf` names the module llama3.weights
        return m if m in graph else None

    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(filter(None, map(resolve, graph[node]))):
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join([*path[path.index(nxt) :], nxt]) if nxt in path else nxt)
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_no_module_is_over_about_500_lines():
    # a reader holds one file in their head; serve/app.py is still over it until it is split along its seams
    allowed = {
        "llama3/serve/app.py": 700,
    }
    long = {}
    for f in sorted((ROOT / "llama3").rglob("*.py")):
        rel = str(f.relative_to(ROOT))
        n = len(f.read_text().splitlines())
        if n > allowed.get(rel, 560):
            long[rel] = n
    assert not long, long
