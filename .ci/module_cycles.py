#!/usr/bin/env python3
"""Fails on an import cycle between keywarden's modules.

Reads cargo-modules' graph of the library's modules and their "uses" edges
(standard input, dot format; functions, types, traits and "owns" edges
filtered out, so every edge is one module importing from another) and
reports every strongly connected component of more than one module, or a
module using itself. (`cargo modules dependencies --acyclic` itself also
counts a type and its own methods as a cycle, so it cannot be used as is.)

A module's use of what it owns (`store` using `store::audit`) is not an
edge here: cargo-modules files an inherent method under its type's module,
so `impl Store` blocks in `store::audit` read as `store` using
`store::audit`, and a parent reaching into its children is the direction
ownership already points. Every other edge counts, including a child's use
of its parent or siblings."""

import re
import sys

EDGE = re.compile(r'^\s*"([^"]+)" -> "([^"]+)" \[label="uses"')


def components(graph):
    """Tarjan's strongly connected components, iteratively."""
    index, low, on_stack, stack, result, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph.get(child, ()))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                result.append(component)
    return result


def main():
    graph = {}
    edges = 0
    for line in sys.stdin:
        match = EDGE.match(line)
        if match:
            source, target = match.groups()
            graph.setdefault(source, set())
            graph.setdefault(target, set())
            if target.startswith(source + "::"):
                continue
            graph[source].add(target)
            edges += 1
    if edges == 0:
        sys.exit("module_cycles: no 'uses' edges in the input: is it cargo-modules' dependency graph?")
    cycles = [sorted(c) for c in components(graph) if len(c) > 1]
    cycles += [[n] for n, targets in graph.items() if n in targets]
    if cycles:
        for cycle in cycles:
            members = set(cycle)
            print(f"module cycle of {len(cycle)}: " + ", ".join(cycle))
            for source in cycle:
                for target in sorted(graph[source] & members):
                    print(f"    {source} -> {target}")
        sys.exit(1)
    print(f"module_cycles: {len(graph)} modules, {edges} 'uses' edges, no cycle")


if __name__ == "__main__":
    main()
