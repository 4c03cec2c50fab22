"""Walks of the autograd graph: how many times a parameter is used, and what a call's outputs reach.

The fast path never assumes which parameters a recorded call uses: it counts the graph edges into
each parameter's gradient accumulator (``AccumulateGrad`` node), over the whole loss graph and
inside each call (from its outputs back to its inputs). A parameter is covered by a set of calls
only if the two counts agree (:mod:`.plan`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

GRAPH_LIMIT = 2_000_000  # nodes; a local traversal longer than this gives up (-> next path)


def graph_edge_counts(
    roots: list[Any],
    targets: set[int],
    stop: set[int],
    limit: int | None = None,
    parents: dict[int, list[tuple[Any, int]]] | None = None,
) -> tuple[dict[int, int], set[int]] | None:
    """Count graph edges into the targets: ``AccumulateGrad`` nodes of leaf tensors, or other nodes.

    ``targets`` holds ids of leaf tensors (an edge into their ``AccumulateGrad`` node counts) and of
    graph nodes (an edge into the node counts, and the walk does not enter it: FSDP1 hands a module
    a view of its flat parameter, whose view node stands for the parameter). Walks
    ``next_functions`` from ``roots`` (each node once), not entering nodes whose id is in ``stop``.
    Returns ``(counts by target id, ids of visited nodes)``, or None past ``limit`` nodes. Given
    ``parents``, also records for each leaf target the ``(node, input index)`` of every counted edge.
    """
    counts: dict[int, int] = defaultdict(int)
    seen: dict[int, Any] = {}  # holds the node objects so that their ids stay unique
    stack = []
    for r in roots:
        if r is not None and id(r) not in seen:
            seen[id(r)] = r
            stack.append(r)
    while stack:
        node = stack.pop()
        for k, (nxt, _) in enumerate(node.next_functions):
            if nxt is None:
                continue
            if type(nxt).__name__ == "AccumulateGrad":
                pid = id(nxt.variable)
                if pid in targets:
                    counts[pid] += 1
                    if parents is not None:
                        parents.setdefault(pid, []).append((node, k))
                continue
            key = id(nxt)
            if key in targets:
                counts[key] += 1
                continue
            if key in stop or key in seen:
                continue
            seen[key] = nxt
            stack.append(nxt)
            if limit is not None and len(seen) > limit:
                return None
    return dict(counts), set(seen)


def node_parents(root: Any, limit: int = GRAPH_LIMIT) -> dict[int, list[tuple[Any, int]]] | None:
    """For every node reachable from ``root`` (by id), the ``(parent, input index)`` of each edge into
    it; None past ``limit`` nodes. The lists hold the parent nodes, so the ids stay unique."""
    parents: dict[int, list[tuple[Any, int]]] = defaultdict(list)
    seen = {id(root): root}
    stack = [root]
    while stack:
        node = stack.pop()
        for k, (nxt, _) in enumerate(node.next_functions):
            if nxt is None:
                continue
            parents[id(nxt)].append((node, k))
            if id(nxt) not in seen and type(nxt).__name__ != "AccumulateGrad":
                seen[id(nxt)] = nxt
                stack.append(nxt)
                if len(seen) > limit:
                    return None
    return dict(parents)


def ancestors(root: Any, nodes: set[int], limit: int = GRAPH_LIMIT) -> set[int] | None:
    """Ids of the nodes below ``root`` that have a node of ``nodes`` (ids) strictly below them: the
    walk of :func:`node_parents`, then upwards from ``nodes``. None past ``limit`` nodes."""
    parents = node_parents(root, limit)
    if parents is None:
        return None
    found: set[int] = set()
    stack = list(nodes)
    while stack:
        for parent, _ in parents.get(stack.pop(), []):
            if id(parent) not in found:
                found.add(id(parent))
                stack.append(id(parent))
    return found
