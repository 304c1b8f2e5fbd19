"""The package's shape: no import circles (counting imports inside functions too), and each subpackage imports
only the layers below it (the rule its `__init__` docstring states)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "unisteer"
BASE = {"unisteer.errors", "unisteer.config", "unisteer.files"}
# What each part may import besides itself and BASE (the top-level workflow, pipeline and cli may import all).
ALLOWED = {
    "engine": set(),
    "data": set(),
    "generation": {"engine", "data"},
    "training": {"engine", "data"},
    "analysis": {"engine", "data"},
    "evaluation": {"engine", "data", "generation"},
    "serving": {"engine", "data", "generation"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every unisteer module `path` imports, wherever the import statement stands."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("unisteer"):
                for alias in node.names:  # `from .x import module` imports a module too
                    candidate = f"{target}.{alias.name}"
                    found.add(candidate if _exists(candidate) else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("unisteer")}
    found.discard(name)
    return {m for m in found if _exists(m)}


def _exists(module: str) -> bool:
    path = PACKAGE.parent / Path(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_no_import_circles():
    edges = {m: {t for t in targets if t != "unisteer"} for m, targets in graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_subpackages_import_only_the_layers_below():
    problems = []
    for module, targets in graph().items():
        parts = module.split(".")
        if len(parts) < 3 or parts[1] not in ALLOWED:
            continue
        allowed = {parts[1], *ALLOWED[parts[1]]}
        for target in targets:
            if target in BASE:
                continue
            if target.split(".")[1] not in allowed:
                problems.append(f"{module} imports {target}")
    assert not problems, "layering broken: " + "; ".join(sorted(problems))


def test_every_subpackage_says_what_lives_there_and_what_it_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc, f"{init}: the docstring should state what the subpackage may import"


def test_every_dtype_option_shares_one_default():
    """`--dtype` (and `dtype=` of the server) default to engine.models.DEFAULT_DTYPE everywhere: the server once
    defaulted to float32 while every other command picked the hardware's fast dtype."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and node.args[0].value == "--dtype":
                default = next((k.value for k in node.keywords if k.arg == "default"), None)
                if not (isinstance(default, ast.Name) and default.id == "DEFAULT_DTYPE"):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                arguments = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults \
                    + node.args.kw_defaults
                for argument, default in zip(arguments, defaults, strict=True):
                    if argument.arg == "dtype" and isinstance(default, ast.Constant) and isinstance(default.value, str) \
                            and default.value != "auto":
                        offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}(dtype=...)")
    assert not offenders, "dtype defaults other than DEFAULT_DTYPE ('auto'): " + ", ".join(offenders)


def test_append_only_logs_go_through_one_writer():
    """Generations, sweep rows, judge replies and training metrics once had four append rules (fsync or not,
    torn-line repair or not); files.JsonlLog is now the only place a file is opened for appending."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "files.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            is_open = isinstance(node, ast.Call) and (
                (isinstance(node.func, ast.Name) and node.func.id == "open")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "open"))
            if is_open:
                index = 0 if isinstance(node.func, ast.Attribute) else 1  # path.open(mode) / open(path, mode)
                modes = [a for a in node.args[index:index + 1] if isinstance(a, ast.Constant)]
                modes += [k.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
                if any(isinstance(m.value, str) and m.value.startswith("a") for m in modes):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, "files opened for appending outside files.JsonlLog: " + ", ".join(offenders)


def test_no_module_imports_another_modules_private_names():
    """A name one module imports from another is that module's public API: no `from .x import _name` seams."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("unisteer")):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {', '.join(private)}")
    assert not offenders, "private names imported across modules: " + "; ".join(offenders)


def _calls(name: str) -> list[tuple[Path, ast.Call]]:
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if called == name:
                    found.append((path, node))
    return found


def test_kv_cache_methods_are_called_only_in_hf_compat():
    """Cache classes change between transformers releases; every call into one lives in engine/hf_compat.py."""
    methods = ("batch_select_indices", "batch_repeat_interleave", "crop", "reorder_cache", "get_seq_length",
               "DynamicCache")
    offenders = [f"{path.relative_to(PACKAGE)}:{node.lineno}" for method in methods for path, node in _calls(method)
                 if path.name != "hf_compat.py"]
    assert not offenders, "KV-cache calls outside engine/hf_compat.py: " + ", ".join(offenders)



def _enclosing_functions(tree: ast.AST) -> dict[ast.AST, str]:
    """Each node of `tree` → the name of the innermost function around it ("" at module level)."""
    owner: dict[ast.AST, str] = {}

    def visit(node: ast.AST, function: str) -> None:
        owner[node] = function
        inner = node.name if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) else function
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, "")
    return owner


def _string_constants(node: ast.AST) -> list[str]:
    items = node.elts if isinstance(node, ast.Tuple | ast.List | ast.Set) else [node]
    return [i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)]


def test_dataset_family_names_are_compared_only_in_the_registry():
    """Which family a dataset is of was decided in three places (load_builtin's if-chain, list_builtins, and
    workflow.preset_family, which silently gave anything unknown the power-seeking row); the registry in
    data/builtin.py (`FAMILIES`) is now the one home. No other module compares a name with a family name or
    alias (==, in, startswith), except the places below, each for its own reason."""
    from unisteer.data.builtin import FAMILIES

    names = {name for family in FAMILIES.values() for name in (family.name, *family.aliases)}
    allowed = {
        ("workflow.py", "load_data"): "axbench pairs need the model's own answers, which the data layer never makes",
        ("judged.py", "resolve_rubric"): "the judge's `auto` rubric, a rubric choice and not a training row",
        ("evaluation/judging.py", "judge_generations"): "'axbench' there names the AxBench rubric",
    }
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        where = str(path.relative_to(PACKAGE))
        if where == "data/builtin.py":
            continue
        tree = ast.parse(path.read_text())
        owner = _enclosing_functions(tree)
        for node in ast.walk(tree):
            strings = []
            if isinstance(node, ast.Compare):
                strings = [s for operand in (node.left, *node.comparators) for s in _string_constants(operand)]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("startswith", "endswith", "removeprefix"):
                strings = [s for argument in node.args for s in _string_constants(argument)]
            found = sorted({s for s in strings if s.strip("/") in names})
            if found and (where, owner[node]) not in allowed:
                offenders.append(f"{where}:{node.lineno} {owner[node]}() compares with {found}")
    assert not offenders, "dataset family names outside data/builtin.py's FAMILIES: " + "; ".join(offenders)


def test_stop_token_ids_is_the_one_stop_rule():
    """Which tokens end an answer was once decided twice: `generate` stopped at eos and the template's
    end-of-turn token, the server at eos only. generation/sampling.stop_token_ids is the rule; outside it an
    eos id is read only to pick a padding id (padding is masked, so any id serves)."""
    allowed = {
        ("data/rendering.py", "pad_token_id"): "PairEncoder's padding id",
        ("serving/batching.py", "_pad_token_id"): "the server's padding id",
    }
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        where = str(path.relative_to(PACKAGE))
        if where == "generation/sampling.py":
            continue
        tree = ast.parse(path.read_text())
        owner = _enclosing_functions(tree)
        for node in ast.walk(tree):
            reads = (isinstance(node, ast.Attribute) and node.attr == "eos_token_id"
                     and isinstance(node.ctx, ast.Load))
            reads |= isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and "eos_token_id" in [s for argument in node.args for s in _string_constants(argument)]
            if reads and (where, owner[node]) not in allowed:
                offenders.append(f"{where}:{node.lineno} {owner[node]}()")
    assert not offenders, "eos ids read outside generation/sampling.stop_token_ids: " + ", ".join(offenders)
    # Every caller says which turn end its text was rendered with ("" for raw text), never leaving it out.
    without = [f"{path.relative_to(PACKAGE)}:{node.lineno}" for path, node in _calls("stop_token_ids")
               if len(node.args) < 2 and not any(k.arg == "turn_end" for k in node.keywords)]
    assert not without, "stop_token_ids called without the rendering's turn end: " + ", ".join(without)


def test_the_recipe_builds_the_encoders_of_the_top_floor():
    """The run's settings were once carried by hand and `PairEncoder(...)` built in a dozen places of the
    CLI, workflow, pipeline and API, some forgetting `max_length` (`--set max_length=N` reached training only,
    and the sweep and evaluation of a run scored whole sequences). In the modules on top of the subpackages an
    encoder now comes from `Recipe.encoder` (`recipe.encoder(tokenizer)`), except the candidates that
    `choose_rendering` measures. Library functions below keep their `encoder=None` defaults for direct callers."""
    allowed = {
        ("recipe.py", "encoder"): "the recipe's one encoder: its rendering, its max_length",
        ("workflow.py", "choose_rendering"): "the candidate renderings measured before there is a recipe",
    }
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        owner = _enclosing_functions(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if called == "PairEncoder" and (path.name, owner[node]) not in allowed:
                    offenders.append(f"{path.name}:{node.lineno} {owner[node] or '<module>'}()")
    assert not offenders, "PairEncoder built outside the recipe: " + ", ".join(offenders)
