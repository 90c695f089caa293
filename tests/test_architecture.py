"""Architecture rules for minidpo/, checked by reading the source with `ast` (nothing is imported).

1. Imports run one way. Every import of a package module counts, at module level, inside a
   function or under `if TYPE_CHECKING:` (a deferred import still documents a dependency).
   The import graph has no cycle, and no module imports a module of a higher layer than its
   own; the layers are the `## Layers` table of docs/ARCHITECTURE.md, which lists every module
   exactly once. `__init__.py` and `__main__.py` are exempt: they only re-export and launch.
   A cycle, or an import pointing up, means the modules cannot be read, tested or changed
   bottom-up.
2. Functions of a readable size: none longer than 80 lines (the `def` line to the last line),
   except the argument parser `cli.build_parser`, which is one long declaration.
3. Nothing pasted twice: no run of 6 or more code lines (blank lines, comments and docstrings
   left out) appears at two places; a second copy is a second place to fix every bug. Runs of
   declarations only (imports; a function's signature, which repeats by design when two
   classes implement one interface, as nn.Module's `forward`) do not count.

The checkers take the package folder (and the markdown file holding the table) as arguments,
so the tests at the bottom can run them on small fake packages written into tmp_path.
"""

from __future__ import annotations

import ast
import itertools
import re
import textwrap
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minidpo"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"

EXEMPT = {"__init__", "__main__"}
MAX_FUNCTION_LINES = 80
LONG_FUNCTIONS_ALLOWED = {("cli.py", "build_parser")}
MIN_DUPLICATE_LINES = 6
CLOSING = re.compile(r"[)\]},\s]+")


# --- 1. imports -------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Import:
    source: str  # the importing module
    line: int
    target: str  # the imported module
    where: str  # "minidpo/comparison.py:35"


def modules(pkg: Path) -> list[str]:
    """The package's modules, by name, without the exempt `__init__` and `__main__`."""
    return sorted(path.stem for path in pkg.glob("*.py") if path.stem not in EXEMPT)


def imports(pkg: Path) -> list[Import]:
    """Every import, anywhere in a module of `pkg`, of another (or the same) module of `pkg`."""
    names = set(modules(pkg))
    found = []
    for name in names:
        tree = ast.parse((pkg / f"{name}.py").read_text())
        for node in ast.walk(tree):
            for target in _imported_modules(node, pkg.name, names):
                where = f"{pkg.name}/{name}.py:{node.lineno}"
                found.append(Import(name, node.lineno, target, where))
    return sorted(found)


def _imported_modules(node: ast.AST, package: str, names: set[str]) -> list[str]:
    """The modules of `package` that one import statement imports; an import of the package
    itself (`import minidpo`, `from minidpo import __version__`) names none."""
    if isinstance(node, ast.Import):
        dotted = [alias.name.split(".") for alias in node.names]
        candidates = [parts[1] for parts in dotted if parts[0] == package and len(parts) > 1]
    elif isinstance(node, ast.ImportFrom):
        absolute = node.level == 0 and node.module is not None
        parts = node.module.split(".") if node.module else []
        if (absolute and parts == [package]) or (node.level == 1 and not parts):
            candidates = [alias.name for alias in node.names]  # from minidpo import x
        elif absolute and parts[0] == package:
            candidates = [parts[1]]  # from minidpo.x import y
        elif node.level == 1:
            candidates = [parts[0]]  # from .x import y
        else:
            return []
    else:
        return []
    return [name for name in candidates if name in names]


def cycles(found: list[Import]) -> list[list[str]]:
    """Import cycles as chains ["a", "b", "a"]: for every import on a cycle, the shortest cycle
    through it, each cycle once (so every import that closes a loop shows up in one)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in found:
        graph[edge.source].add(edge.target)
    loops = set()
    for source in sorted(graph):
        for target in sorted(graph[source]):
            path = _shortest_path(graph, target, source)
            if path:
                loop = [source, *path[:-1]]
                first = loop.index(min(loop))
                loops.add(tuple(loop[first:] + loop[:first]))
    return [[*loop, loop[0]] for loop in sorted(loops)]


def _shortest_path(graph: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """The shortest chain of imports [start, ..., goal], or None if goal cannot be reached."""
    came_from: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            path = [node]
            while came_from[path[-1]] is not None:
                path.append(came_from[path[-1]])
            return path[::-1]
        for nxt in sorted(graph.get(node, ())):
            if nxt not in came_from:
                came_from[nxt] = node
                queue.append(nxt)
    return None


class LayerTableError(Exception):
    """The `## Layers` section or its table is missing or malformed."""


def read_layers(markdown: Path) -> list[tuple[str, int]]:
    """(module, layer) for each name in the `| layer | modules |` table under `## Layers`."""
    text = markdown.read_text() if markdown.exists() else ""
    section = re.search(r"^## Layers[ \t]*$(.*?)(?=^#{1,2} |\Z)", text, re.M | re.S)
    if section is None:
        raise LayerTableError(
            f"the layer table is missing: {markdown} has no '## Layers' section "
            "(a '| layer | modules |' table, one row per layer, 0 = bottom)"
        )
    rows = [line.strip() for line in section.group(1).splitlines() if line.strip()[:1] == "|"]
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    if not cells or [cell.lower() for cell in cells[0]] != ["layer", "modules"]:
        raise LayerTableError(
            f"the '## Layers' section of {markdown} has no '| layer | modules |' table"
        )
    pairs = []
    for row in cells[1:]:
        if set("".join(row)) <= set("-: "):
            continue  # the |---|---| line
        if len(row) != 2 or not row[0].isdigit():
            raise LayerTableError(f"{markdown}: bad layer table row {'|'.join(row)!r}")
        pairs += [(name, int(row[0])) for name in re.findall(r"`([^`]+)`", row[1])]
    return pairs


def table_drift(pkg: Path, pairs: list[tuple[str, int]]) -> list[str]:
    """Every way the layer table and the package's module files disagree."""
    listed: dict[str, list[int]] = defaultdict(list)
    for name, layer in pairs:
        listed[name].append(layer)
    present = modules(pkg)
    problems = [
        f"{pkg.name}/{name}.py is not in the layer table" for name in present if name not in listed
    ]
    for name, layers in sorted(listed.items()):
        if name not in present:
            problems.append(
                f"`{name}` is in the layer table but {pkg.name}/{name}.py does not exist"
            )
        if len(layers) > 1:
            problems.append(f"`{name}` is listed {len(layers)} times (layers {layers})")
    return problems


def layer_violations(found: list[Import], pairs: list[tuple[str, int]]) -> list[str]:
    """Every import of a module from a higher layer than the importer's own."""
    layer = dict(pairs)
    problems = []
    for edge in found:
        here, there = layer.get(edge.source), layer.get(edge.target)
        if here is not None and there is not None and there > here:
            problems.append(f"{edge.where} imports {edge.target} (layer {there}) from layer {here}")
    return problems


# --- 2. function size -------------------------------------------------------------------------


def long_functions(pkg: Path, limit: int = MAX_FUNCTION_LINES, allowed=frozenset()) -> list[str]:
    """`file:line name (N lines)` for each function or method longer than `limit` lines,
    counted from the `def` line (decorators excluded) to its last line."""
    found = []
    for path in sorted(pkg.glob("*.py")):
        for name, node in _functions(ast.parse(path.read_text())):
            length = node.end_lineno - node.lineno + 1
            if length > limit and (path.name, name) not in allowed:
                found.append(f"{pkg.name}/{path.name}:{node.lineno} {name} ({length} lines)")
    return found


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) for every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if not isinstance(node, ast.ClassDef):
                yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


# --- 3. duplicated code -----------------------------------------------------------------------


def _code_lines(source: str) -> list[tuple[int, str, bool]]:
    """(line number, stripped text, is a declaration: part of an import or of a function's
    signature) for each line of code: blank lines, comment-only lines and docstrings are
    left out."""
    skip, import_lines = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            import_lines.update(range(node.lineno, node.end_lineno + 1))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            import_lines.update(range(node.lineno, node.body[0].lineno))  # def ... ):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if ast.get_docstring(node, clean=False) is not None:
                skip.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    return [
        (number, line.strip(), number in import_lines)
        for number, line in enumerate(source.splitlines(), start=1)
        if line.strip() and not line.strip().startswith("#") and number not in skip
    ]


def duplicates(pkg: Path, size: int = MIN_DUPLICATE_LINES) -> list[str]:
    """`fileA:a1-a2 == fileB:b1-b2` for each maximal run of `size` or more code lines that
    appears at two places; runs of only closing brackets, or only declarations (imports,
    function signatures), do not count."""
    code = {
        f"{pkg.name}/{path.name}": _code_lines(path.read_text())
        for path in sorted(pkg.glob("*.py"))
    }
    places = defaultdict(list)  # window text -> [(file, index of its first line in code[file])]
    for file, lines in code.items():
        for i in range(len(lines) - size + 1):
            window = lines[i : i + size]
            if all(declaration for *_, declaration in window):
                continue
            if all(CLOSING.fullmatch(text) for _, text, _ in window):
                continue
            places[tuple(text for _, text, _ in window)].append((file, i))
    pairs = {
        (a, b)
        for found in places.values()
        for a, b in itertools.combinations(found, 2)
        if a[0] != b[0] or b[1] - a[1] >= size  # not a window overlapping its own copy
    }
    runs = []
    for (file_a, i), (file_b, j) in sorted(pairs):
        if ((file_a, i - 1), (file_b, j - 1)) in pairs:
            continue  # inside a run that started earlier
        extra = 0  # windows after the first that continue the run
        while ((file_a, i + extra + 1), (file_b, j + extra + 1)) in pairs:
            extra += 1
        last = extra + size - 1  # index of the run's last line, from its first
        a, b = code[file_a], code[file_b]
        runs.append(f"{file_a}:{a[i][0]}-{a[i + last][0]} == {file_b}:{b[j][0]}-{b[j + last][0]}")
    return runs


# --- the rules, on minidpo/ -------------------------------------------------------------------


def _fail_unless_empty(problems: list[str], title: str) -> None:
    if problems:
        pytest.fail(f"{title} ({len(problems)}):\n  " + "\n  ".join(problems), pytrace=False)


def _layers() -> list[tuple[str, int]]:
    try:
        return read_layers(ARCHITECTURE)
    except LayerTableError as error:
        problem = str(error)
    pytest.fail(problem, pytrace=False)


def test_imports_have_no_cycle():
    found = imports(PACKAGE)
    sites = defaultdict(list)
    for edge in found:
        sites[edge.source, edge.target].append(str(edge.line))
    report = []
    for loop in cycles(found):
        steps = [
            f"\n      {a} -> {b} at {PACKAGE.name}/{a}.py:{', '.join(sites[a, b])}"
            for a, b in itertools.pairwise(loop)
        ]
        report.append(" -> ".join(loop) + "".join(steps))
    _fail_unless_empty(report, "import cycles")


def test_layer_table_lists_every_module_once():
    _fail_unless_empty(table_drift(PACKAGE, _layers()), "layer table out of step with minidpo/")


def test_imports_follow_the_layer_order():
    _fail_unless_empty(layer_violations(imports(PACKAGE), _layers()), "imports against the layers")


# The Hugging Face stack is the `hf` extra: the tests and lessons use it, the package never.
OPTIONAL = ("transformers", "trl", "datasets", "accelerate", "tokenizers", "safetensors")


def third_party_imports(pkg: Path, names: tuple[str, ...]) -> list[str]:
    """Every import in `pkg` of a top-level package in `names`, as "file:line name"."""
    found = []
    for path in sorted(pkg.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            found += [f"{pkg.name}/{path.name}:{node.lineno} {t}" for t in tops if t in names]
    return found


def test_the_package_never_imports_the_hf_extra():
    _fail_unless_empty(third_party_imports(PACKAGE, OPTIONAL), "imports of the optional hf extra")


def test_third_party_imports_are_found(tmp_path):
    pkg = _package(tmp_path, {"a.py": "import os\nfrom transformers import X\n",
                              "b.py": "def f():\n    import trl.trainer\n"})  # fmt: skip
    assert third_party_imports(pkg, OPTIONAL) == ["fake/a.py:2 transformers", "fake/b.py:2 trl"]


def test_functions_are_short():
    found = long_functions(PACKAGE, allowed=LONG_FUNCTIONS_ALLOWED)
    _fail_unless_empty(found, f"functions longer than {MAX_FUNCTION_LINES} lines")


def test_no_code_is_pasted_twice():
    found = duplicates(PACKAGE)
    _fail_unless_empty(found, f"runs of {MIN_DUPLICATE_LINES}+ lines that appear twice")


# --- the checkers, on fake packages -----------------------------------------------------------


def _package(tmp_path: Path, files: dict[str, str], name: str = "fake") -> Path:
    pkg = tmp_path / name
    pkg.mkdir()
    for file, source in files.items():
        (pkg / file).write_text(textwrap.dedent(source).lstrip("\n"))
    return pkg


def _table(tmp_path: Path, rows: str, after: str = "") -> Path:
    markdown = tmp_path / "ARCHITECTURE.md"
    body = "\n".join(line.strip() for line in rows.strip().splitlines())
    markdown.write_text(
        f"# Title\n\n## Layers\n\nSome prose.\n\n| layer | modules |\n|---|---|\n{body}\n{after}"
    )
    return markdown


def test_imports_are_found_everywhere_and_resolved(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "__init__.py": "from fake.a import x\n",
            "a.py": """
                from typing import TYPE_CHECKING

                import fake
                import fake.b
                from fake import __version__, c
                from fakeother import d

                if TYPE_CHECKING:
                    from fake.d import Thing

                def f():
                    from . import e
                    from .b import y

                class K:
                    def m(self):
                        from fake.e import z
            """,
            "b.py": "",
            "c.py": "",
            "d.py": "",
            "e.py": "",
        },
    )
    found = [(edge.where, edge.target) for edge in imports(pkg)]
    assert found == [
        ("fake/a.py:4", "b"),
        ("fake/a.py:5", "c"),
        ("fake/a.py:9", "d"),
        ("fake/a.py:12", "e"),
        ("fake/a.py:13", "b"),
        ("fake/a.py:17", "e"),
    ]


def test_cycle_through_a_local_import_is_reported(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "a.py": "from fake.b import x\n",
            "b.py": "def f():\n    from fake.c import y\n",
            "c.py": "import typing\nif typing.TYPE_CHECKING:\n    from fake.a import z\n",
            "d.py": "from fake.d import itself\nfrom fake.a import x\n",
            "e.py": "from fake.a import x\n",
        },
    )
    assert cycles(imports(pkg)) == [["a", "b", "c", "a"], ["d", "d"]]


def test_acyclic_package_has_no_cycle(tmp_path):
    pkg = _package(
        tmp_path, {"a.py": "import fake.b\nimport fake.c\n", "b.py": "import fake.c\n", "c.py": ""}
    )
    assert cycles(imports(pkg)) == []


def test_import_against_the_layer_order_is_reported(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "low.py": "import os\n\n\ndef f():\n    from fake.high import g\n",
            "mid.py": "from fake.low import f\nfrom fake.mid2 import h\n",
            "mid2.py": "",
            "high.py": "from fake import low, mid\n",
            "__main__.py": "from fake.high import g\n",
        },
    )
    markdown = _table(tmp_path, "| 0 | `low` |\n| 1 | `mid`, `mid2` |\n| 2 | `high` |")
    pairs = read_layers(markdown)
    assert pairs == [("low", 0), ("mid", 1), ("mid2", 1), ("high", 2)]
    assert table_drift(pkg, pairs) == []
    assert layer_violations(imports(pkg), pairs) == [
        "fake/low.py:5 imports high (layer 2) from layer 0"
    ]


def test_layer_table_drift_is_reported(tmp_path):
    pkg = _package(tmp_path, {"a.py": "", "b.py": "", "__init__.py": ""})
    markdown = _table(
        tmp_path, "| 0 | `a`, `gone` |\n| 1 | `a` |", after="\n## Next\n\n| 2 | `b` |\n"
    )
    assert table_drift(pkg, read_layers(markdown)) == [
        "fake/b.py is not in the layer table",
        "`a` is listed 2 times (layers [0, 1])",
        "`gone` is in the layer table but fake/gone.py does not exist",
    ]


def test_missing_or_malformed_layer_table_is_an_error(tmp_path):
    markdown = tmp_path / "ARCHITECTURE.md"
    markdown.write_text("# Title\n\n## Modules\n\n| layer | modules |\n|---|---|\n| 0 | `a` |\n")
    with pytest.raises(LayerTableError, match="layer table is missing"):
        read_layers(markdown)
    with pytest.raises(LayerTableError, match="layer table is missing"):
        read_layers(tmp_path / "absent.md")
    markdown.write_text("## Layers\n\n| module | layer |\n|---|---|\n| `a` | 0 |\n")
    with pytest.raises(LayerTableError, match=re.escape("no '| layer | modules |' table")):
        read_layers(markdown)
    markdown.write_text("## Layers\n\n| layer | modules |\n|---|---|\n| zero | `a` |\n")
    with pytest.raises(LayerTableError, match="bad layer table row"):
        read_layers(markdown)


def test_long_function_is_reported(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(89))
    exactly_80 = "".join(f"    y{i} = {i}\n" for i in range(79))
    pkg = _package(
        tmp_path,
        {
            "a.py": f"def long():\n{body}\n\n@decorator\n@decorator\ndef fits():\n{exactly_80}",
            "b.py": "class K:\n    def method(self):\n" + textwrap.indent(body, "    "),
            "cli.py": f"def build_parser():\n{body}",
        },
    )
    assert long_functions(pkg, allowed={("cli.py", "build_parser")}) == [
        "fake/a.py:1 long (90 lines)",
        "fake/b.py:2 K.method (90 lines)",
    ]


def test_duplicated_block_is_reported_once_as_a_maximal_run(tmp_path):
    block = "".join(f"    total = total * {i} + {i}\n" for i in range(8))
    copy = "".join(f"total = total * {i} + {i}  \n\n# a comment\n" for i in range(8))
    header = '"""Module docstring."""\n\n\ndef f(total):\n    """Docstring."""\n'
    pkg = _package(tmp_path, {"a.py": header + block, "b.py": f"x = 1\n{copy}"})
    assert duplicates(pkg) == ["fake/a.py:6-13 == fake/b.py:2-23"]


def test_duplicate_within_one_file_is_reported(tmp_path):
    block = "".join(f"v = f(v, {i})\n" for i in range(6))
    pkg = _package(tmp_path, {"a.py": f"{block}print(v)\n{block}"})
    assert duplicates(pkg) == ["fake/a.py:1-6 == fake/a.py:8-13"]


def test_a_repeated_signature_is_not_reported_but_a_repeated_body_is(tmp_path):
    signature = (
        "    def forward(\n        self,\n        x: int,\n        mask: int | None = None,\n"
        "        cache: object = None,\n    ) -> int:\n"
    )
    body = "".join(f"        x = f(x, {i})\n" for i in range(6)) + "        return x\n"
    same_signature = (
        f"class A:\n{signature}        return x\n\n\nclass B:\n{signature}        return -x\n"
    )
    (tmp_path / "s").mkdir()
    (tmp_path / "b").mkdir()
    assert duplicates(_package(tmp_path / "s", {"a.py": same_signature})) == []
    same_body = f"class A:\n{signature}{body}\n\nclass B:\n    def g(self, x):\n{body}"
    assert duplicates(_package(tmp_path / "b", {"a.py": same_body})) == [
        "fake/a.py:8-14 == fake/a.py:19-25"
    ]


def test_short_or_trivial_repeats_are_not_reported(tmp_path):
    """Each piece below is in both files, between lines that differ, and none may count:
    5 equal lines, 6 closing brackets, 7 import lines, a 6-line docstring, and (in one file)
    11 equal lines whose 6-line windows all overlap one another."""
    five = "".join(f"w = g(w, {i})\n" for i in range(5))
    closing = "ITEM = f(g(h(k([{\n'ITEM': 1\n},\n],\n" + "),\n" * 3 + ")\n"
    imports_only = (
        "import os\nimport re\nimport sys\nfrom pathlib import (\n    Path,\n    PurePath,\n)\n"
    )
    docstring = 'def NAME():\n    """One.\n    Two.\n    Three.\n    Four.\n    Five.\n    """\n'
    pieces = [imports_only, five, closing, docstring]

    def module(tag: str) -> str:
        text = "".join(f"{piece}sep_{tag}{k} = {k}\n" for k, piece in enumerate(pieces))
        return text.replace("ITEM", tag).replace("NAME", f"h_{tag}")

    pkg = _package(tmp_path, {"a.py": module("a"), "b.py": module("b") + "z = 0\n" * 11})
    assert duplicates(pkg) == []
