#!/usr/bin/env python3
"""Fails when one of keywarden's top-level modules imports from another
that .ci/module_edges.txt does not allow it to: the direction of the
Layout in src/lib.rs, where module_cycles.py only forbids cycles.

Edges come from two sources, joined: cargo-modules' dependency graph on
standard input (the dot output module_cycles.py reads), which sees `use`
items resolved to where each item is defined; and a scan of src/ for
`crate::` paths, which also sees paths written inline (`crate::x::f()`)
and the module a re-export is reached through. Each edge is collapsed to
the top-level modules at its ends; a module using its own submodules is
not an edge. Also fails on an allowed edge that no code uses (the file
would drift from the code) and on a module the file does not name.

`--self-test` checks the checker: a graph with an edge upwards must fail."""

import re
import sys
from pathlib import Path

EDGE = re.compile(r'^\s*"([^"]+)" -> "([^"]+)" \[label="uses"')
CRATE = "keywarden"


def top(path):
    """The top-level module of a path such as keywarden::api::convert."""
    parts = path.split("::")
    if parts and parts[0] == CRATE:
        parts = parts[1:]
    return parts[0] if parts else None


def read_rules(text):
    allowed, debt = {}, {}
    for number, raw in enumerate(text.splitlines(), 1):
        line, _, why = raw.partition("#")
        if not line.strip():
            continue
        kind = "allow"
        if line.startswith("debt "):
            kind, line = "debt", line[len("debt "):]
        source, sep, targets = line.partition(":")
        if not sep:
            sys.exit(f"module_edges.txt:{number}: expected '<module>: <modules>'")
        source = source.strip()
        for target in targets.split():
            if kind == "debt":
                if not why.strip():
                    sys.exit(f"module_edges.txt:{number}: a debt edge says why after '#'")
                debt[(source, target)] = why.strip()
            else:
                allowed.setdefault(source, set()).add(target)
        if kind == "allow":
            allowed.setdefault(source, set())
    return allowed, debt


def edges_of(lines):
    edges = set()
    for line in lines:
        match = EDGE.match(line)
        if match:
            source, target = (top(p) for p in match.groups())
            if source and target and source != target:
                edges.add((source, target))
    return edges


def crate_paths(text):
    """The top-level modules named by `crate::` paths in Rust source: use
    trees (`crate::{a, b::c}`) and inline paths alike, unit tests
    included (they are code of the module too). Comments are dropped."""
    text = re.sub(r"//[^\n]*", "", text)
    names = set()
    for match in re.finditer(r"crate::(\{|\w+)", text):
        if match.group(1) != "{":
            names.add(match.group(1))
            continue
        depth, current = 0, ""
        for ch in text[match.end():]:
            if ch == "{":
                depth += 1
            elif ch == "}":
                if depth == 0:
                    break
                depth -= 1
            elif ch == "," and depth == 0:
                names.add(current.strip().split("::")[0])
                current = ""
                continue
            if depth == 0 and ch != "}":
                current += ch
        names.add(current.strip().split("::")[0])
    return {n for n in names if n}


def scanned_edges(src):
    """Edges between top-level modules from `crate::` paths under `src`."""
    modules = {p.stem for p in src.iterdir() if p.stem not in ("lib", "main")}
    edges = set()
    for path in src.rglob("*.rs"):
        relative = path.relative_to(src).parts
        if relative in (("lib.rs",), ("main.rs",)):
            continue
        source = Path(relative[0]).stem
        for target in crate_paths(path.read_text()) & modules:
            if target != source:
                edges.add((source, target))
    return edges


def check(edges, allowed, debt):
    """Problems found, as lines; empty when the graph keeps the rules."""
    problems = []
    modules = {m for edge in edges for m in edge}
    for module in sorted(modules - set(allowed)):
        problems.append(f"module {module} is not in module_edges.txt: say what it may import")
    for source, target in sorted(edges):
        if source in allowed and target not in allowed[source] and (source, target) not in debt:
            problems.append(f"{source} imports from {target}, which module_edges.txt does not allow")
    for source, targets in sorted(allowed.items()):
        for target in sorted(targets):
            if (source, target) not in edges:
                problems.append(f"{source} -> {target} is allowed but unused: remove it from module_edges.txt")
    for edge in sorted(debt):
        if edge not in edges:
            problems.append(f"debt {edge[0]} -> {edge[1]} is paid: remove it from module_edges.txt")
    return problems


def self_test():
    allowed, debt = read_rules("api: keys\nkeys:\n")
    assert check({("api", "keys")}, allowed, debt) == []
    assert check({("api", "keys"), ("keys", "api")}, allowed, debt), "an upward edge must fail"
    assert check(set(), allowed, debt), "an unused allowance must fail"
    assert check({("api", "keys"), ("cli", "api")}, allowed, debt), "an unnamed module must fail"
    assert edges_of(['  "keywarden::keys::x" -> "keywarden::api::y" [label="uses", color="gray"];']) == {
        ("keys", "api")
    }
    source = "use crate::{\n    a::x,\n    b::{c, d},\n};\n// crate::e\nfn f() { crate::g::h(); }\n"
    assert crate_paths(source) == {"a", "b", "g"}, crate_paths(source)
    assert crate_paths("fn f() {}\n#[cfg(test)]\nmod tests {\n    use crate::z;\n}\nuse crate::y;\n") == {"z", "y"}
    print("module_edges: self-test passed")


def main():
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    rules = Path(__file__).with_name("module_edges.txt").read_text()
    allowed, debt = read_rules(rules)
    graph = edges_of(sys.stdin)
    if not graph:
        sys.exit("module_edges: no 'uses' edges between top-level modules in the input")
    edges = graph | scanned_edges(Path(__file__).resolve().parent.parent / "src")
    problems = check(edges, allowed, debt)
    for (source, target), why in sorted(debt.items()):
        print(f"module_edges: debt {source} -> {target}: {why}")
    if problems:
        for problem in problems:
            print(f"module_edges: {problem}")
        sys.exit(1)
    print(f"module_edges: {len(edges)} edges between top-level modules ({len(graph)} in cargo-modules' graph), all allowed")


if __name__ == "__main__":
    main()
