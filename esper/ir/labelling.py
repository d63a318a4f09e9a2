"""Canonical labelling of a blueprint DAG: a node order that depends only on the
graph's structure, never on ids or file order.

Vertices are the graph inputs (``0..I-1``, fixed by position) and the nodes
(``I..V-1``). Each node has a label (op + resolved attrs), ordered operands
(a multiset for commutative ops) and consumers; the outputs are ordered.

1. Merkle colours, one topological sweep: a node's colour ranks (label,
   operand colours) within its depth level. When all colours differ — the usual
   case — sorting by colour is the canonical order.
2. Otherwise (identical sub-graphs, e.g. a shared node vs. two duplicates) the
   colours are refined with consumer information too (colour refinement on an
   ordered partition), then ties are broken by individualisation-refinement
   search, keeping the smallest serialisation; automorphisms found on the way
   prune symmetric branches (as in nauty). Shared and duplicated nodes thus
   serialise differently, and equivalent presentations identically.

A work budget bounds the search on pathologically symmetric graphs; past it the
remaining ties are broken by file position. The result is then still a complete
description of the graph (no two different graphs can share it) but may differ
between two presentations of the same graph.
"""

from __future__ import annotations

from collections.abc import Sequence

Serial = tuple[object, ...]

WORK_BUDGET = 200_000  # ~vertex visits per labelling (~0.25 s); then ties go by file order
MAX_SEARCH_DEPTH = 200


class _Search:
    def __init__(self, n_in: int, *, labels: Sequence[int], commutative: Sequence[bool],
                 args: Sequence[tuple[int, ...]], depth: Sequence[int],
                 outputs: Sequence[int]) -> None:
        self.n_in = n_in
        self.v = n_in + len(args)
        self.labels = labels
        self.depth = depth
        self.comm = [False] * n_in + list(commutative)
        self.args: list[tuple[int, ...]] = [()] * n_in + list(args)
        self.uses: list[list[tuple[int, int]]] = [[] for _ in range(self.v)]
        for j, a in enumerate(args):
            c = n_in + j
            for port, t in enumerate(a):
                self.uses[t].append((c, -1 if commutative[j] else port))
        self.neighbours = [
            set(self.args[x]) | {c for c, _ in self.uses[x]} for x in range(self.v)
        ]
        self.outputs = tuple(outputs)
        self.work = 0
        self.best: tuple[Serial, list[int]] | None = None
        self.first: tuple[Serial, list[int], tuple[int, ...]] | None = None
        self.generators: list[dict[int, int]] = []

    # -- refinement on an ordered partition: colour = start of its cell ----------

    def _key(self, x: int, color: list[int]) -> tuple[object, ...]:
        a = [color[t] for t in self.args[x]]
        if self.comm[x]:
            a.sort()
        return (tuple(a), tuple(sorted([(color[c], p) for c, p in self.uses[x]])))

    def refine(self, color: list[int], cells: dict[int, list[int]], dirty: set[int]) -> None:
        while dirty:
            touched: set[int] = set()
            for s in sorted(dirty):
                members = cells.get(s)
                if members is None or len(members) < 2:
                    continue
                self.work += len(members)
                keyed = sorted((self._key(x, color), x) for x in members)
                if keyed[0][0] == keyed[-1][0]:
                    continue
                groups: list[list[int]] = [[keyed[0][1]]]
                for (k, x), (prev, _) in zip(keyed[1:], keyed, strict=False):
                    if k != prev:
                        groups.append([])
                    groups[-1].append(x)
                start = s
                for group in groups:
                    cells[start] = group
                    for x in group:
                        if color[x] != start:
                            color[x] = start
                            touched.add(x)
                    start += len(group)
            dirty = set()
            for x in touched:
                for y in self.neighbours[x]:
                    if len(cells[color[y]]) > 1:
                        dirty.add(color[y])

    # -- leaves and automorphisms ------------------------------------------------

    def _serial(self, order: list[int]) -> Serial:
        pos = list(range(self.v))
        for k, x in enumerate(order):
            pos[x] = self.n_in + k
        rows: list[object] = []
        for x in order:
            refs = [pos[t] for t in self.args[x]]
            if self.comm[x]:
                refs.sort()
            rows.append((self.labels[x - self.n_in], tuple(refs)))
        rows.append(tuple(pos[o] for o in self.outputs))
        return tuple(rows)

    def _generator(self, ref: list[int], order: list[int]) -> None:
        """Two leaves with equal serialisations give an automorphism (sparse: moved points)."""
        self.generators.append({a: b for a, b in zip(ref, order, strict=True) if a != b})

    def _leaf(self, color: list[int], path: tuple[int, ...]) -> int | None:
        """Record a leaf. If it is equivalent to the first leaf, return the depth of the
        first-path node to resume at: the rest of this subtree mirrors one already seen."""
        self.work += self.v
        order = sorted(range(self.n_in, self.v), key=lambda x: (self.depth[x], color[x]))
        serial = self._serial(order)
        jump = None
        if self.first is None:
            self.first = (serial, order, path)
        elif serial == self.first[0]:
            self._generator(self.first[1], order)
            first_path = self.first[2]
            jump = 0
            while jump < min(len(path), len(first_path)) and path[jump] == first_path[jump]:
                jump += 1
        if self.best is None or serial < self.best[0]:
            self.best = (serial, order)
        elif serial == self.best[0] and self.best[1] is not self.first[1]:
            self._generator(self.best[1], order)
        return jump

    def _break_ties(self, color: list[int], cells: dict[int, list[int]]) -> list[int]:
        """Past the budget: split every remaining cell by file position (not canonical)."""
        color = color.copy()
        for s, members in cells.items():
            for k, x in enumerate(sorted(members)):
                color[x] = s + k
        return color

    # -- individualisation-refinement search ---------------------------------------

    def _individualise(self, color: list[int], cells: dict[int, list[int]], x: int
                       ) -> tuple[list[int], dict[int, list[int]]]:
        self.work += self.v
        s = color[x]
        color2 = color.copy()
        cells2 = dict(cells)
        rest = [y for y in cells[s] if y != x]
        cells2[s] = [x]
        cells2[s + 1] = rest
        for y in rest:
            color2[y] = s + 1
        dirty = {
            color2[y] for m in cells[s] for y in self.neighbours[m] if len(cells2[color2[y]]) > 1
        }
        self.refine(color2, cells2, dirty)
        return color2, cells2

    def search(self, color: list[int], cells: dict[int, list[int]],
               prefix: tuple[int, ...]) -> int | None:
        """Explore below one search node; returns a depth to jump back to, or None."""
        open_cells = [s for s, m in cells.items() if len(m) > 1]
        if not open_cells:
            return self._leaf(color, prefix)
        if self.work > WORK_BUDGET or len(prefix) >= MAX_SEARCH_DEPTH:
            self._leaf(self._break_ties(color, cells), prefix)
            return None
        parent: dict[int, int] = {}

        def find(x: int) -> int:
            while parent.get(x, x) != x:
                x = parent[x]
            return x

        absorbed = 0
        explored: list[int] = []
        for x in sorted(cells[min(open_cells)]):
            # Automorphisms fixing this node's prefix map its children onto each other.
            for g in self.generators[absorbed:]:
                if all(g.get(p, p) == p for p in prefix):
                    for a, b in g.items():
                        ra, rb = find(a), find(b)
                        if ra != rb:
                            parent[ra] = rb
            absorbed = len(self.generators)
            if explored and find(x) in {find(e) for e in explored}:
                continue
            if explored and self.work > WORK_BUDGET:
                return None
            explored.append(x)
            c2, k2 = self._individualise(color, cells, x)
            jump = self.search(c2, k2, (*prefix, x))
            if jump is not None and jump < len(prefix):
                return jump
        return None


def canonical_order(n_in: int, *, labels: Sequence[int], commutative: Sequence[bool],
                    args: Sequence[tuple[int, ...]], topo: Sequence[int],
                    outputs: Sequence[int]) -> list[int]:
    """Node positions (file order) in canonical order; the order is topological.

    ``labels`` are canonical ranks of each node's op+attrs; ``args`` name operand
    vertices (inputs ``0..n_in-1``, node ``j`` is ``n_in + j``); ``topo`` is any
    topological order of node positions.
    """
    n = len(args)
    v = n_in + n
    depth = [0] * v
    levels: dict[int, list[int]] = {}
    for j in topo:
        d = 1 + max([depth[t] for t in args[j]])
        depth[n_in + j] = d
        levels.setdefault(d, []).append(j)
    color = list(range(n_in)) + [0] * n
    nxt = n_in
    for d in sorted(levels):
        level = levels[d]
        if len(level) == 1:
            color[n_in + level[0]] = nxt
            nxt += 1
            continue
        keys = []
        for j in level:
            a = [color[t] for t in args[j]]
            if commutative[j]:
                a.sort()
            keys.append((labels[j], tuple(a)))
        distinct = sorted(set(keys))
        rank = {k: nxt + i for i, k in enumerate(distinct)}
        nxt += len(distinct)
        for j, k in zip(level, keys, strict=True):
            color[n_in + j] = rank[k]
    if nxt == v:  # every node structurally distinct: Merkle colours are canonical
        return sorted(range(n), key=lambda j: color[n_in + j])
    search = _Search(
        n_in, labels=labels, commutative=commutative, args=args, depth=depth, outputs=outputs
    )
    return _search_order(search, color)


def _search_order(search: _Search, merkle: list[int]) -> list[int]:
    n_in = search.n_in
    # Output positions join the initial colour; then colours become cell starts.
    outpos: dict[int, list[int]] = {}
    for i, o in enumerate(search.outputs):
        outpos.setdefault(o, []).append(i)
    keys = [(merkle[x], tuple(outpos.get(x, ()))) for x in range(search.v)]
    ranked = sorted(range(search.v), key=lambda x: keys[x])
    color = [0] * search.v
    cells: dict[int, list[int]] = {}
    start = 0
    for i, x in enumerate(ranked):
        if i and keys[x] != keys[ranked[i - 1]]:
            start = i
        color[x] = start
        cells.setdefault(start, []).append(x)
    search.refine(color, cells, {s for s, m in cells.items() if len(m) > 1})
    search.search(color, cells, ())
    if search.best is None:  # pragma: no cover - search always reaches a leaf
        raise RuntimeError("canonical labelling found no leaf")
    return [x - n_in for x in search.best[1]]
