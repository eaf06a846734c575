"""RFC 9420 Appendix C tree arithmetic against tree-math.json."""

from __future__ import annotations

from typing import Any

import pytest

from mls import tree_math as tm
from tests.vectors import vector_cases


def _or_none(f: Any, *args: int) -> int | None:
    try:
        return f(*args)  # type: ignore[no-any-return]
    except ValueError:
        return None


@pytest.mark.parametrize("case", vector_cases("mls/tree-math.json"))
def test_tree_math_vector(case: dict[str, Any]) -> None:
    n = case["n_leaves"]
    assert tm.node_width(n) == case["n_nodes"]
    assert tm.root(n) == case["root"]
    width = case["n_nodes"]
    for field in ("left", "right", "parent", "sibling"):
        assert len(case[field]) == width, field
    assert [_or_none(tm.left, i) for i in range(width)] == case["left"]
    assert [_or_none(tm.right, i) for i in range(width)] == case["right"]
    assert [_or_none(tm.parent, i, n) for i in range(width)] == case["parent"]
    assert [_or_none(tm.sibling, i, n) for i in range(width)] == case["sibling"]


def _direct_path_by_parent(x: int, n: int) -> list[int]:
    out = []
    while x != tm.root(n):
        x = tm.parent(x, n)
        out.append(x)
    return out


def test_rfc_figure_direct_path_and_copath() -> None:
    # RFC 9420 §4.1, Table 2 (8 leaves A..H at nodes 0..14; T=1, U=3, V=5, W=7, X=9, Y=11, Z=13).
    assert tm.direct_path(0, 8) == [1, 3, 7]
    assert tm.copath(0, 8) == [2, 5, 11]
    assert tm.direct_path(8, 8) == [9, 11, 7]
    assert tm.copath(8, 8) == [10, 13, 3]
    assert tm.direct_path(12, 8) == [13, 11, 7]
    assert tm.copath(12, 8) == [14, 9, 3]
    assert tm.direct_path(7, 8) == [] and tm.copath(7, 8) == []


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32])
def test_paths_and_common_ancestor_agree_with_parent_chain(n: int) -> None:
    width = tm.node_width(n)
    for x in range(width):
        path = _direct_path_by_parent(x, n)
        assert tm.direct_path(x, n) == path
        assert tm.copath(x, n) == [tm.sibling(y, n) for y in [x, *path][:-1]]
        lo, hi = tm.subtree_range(x)
        assert lo <= x <= hi and hi - lo + 1 == (1 << (tm.level(x) + 1)) - 1
        for p in path:
            plo, phi = tm.subtree_range(p)
            assert plo <= lo and hi <= phi
    # common_ancestor is the lowest node of both direct paths (Appendix C, the semantic version).
    for x in range(0, width, 2 if n > 8 else 1):
        for y in range(width):
            both = ({x, *tm.direct_path(x, n)}) & ({y, *tm.direct_path(y, n)})
            assert tm.common_ancestor(x, y) == min(both, key=tm.level)


def test_large_tree_and_leaf_conversions() -> None:
    n = 1 << 31
    assert tm.node_width(n) == (1 << 32) - 1
    assert tm.root(n) == (1 << 31) - 1
    last = tm.leaf_to_node(n - 1)
    path = tm.direct_path(last, n)
    assert len(path) == 31 and path[-1] == tm.root(n)
    assert tm.node_to_leaf(last) == n - 1
    assert tm.is_leaf(last) and not tm.is_leaf(tm.root(n))
    assert tm.log2(0) == 0 and tm.log2(1) == 0 and tm.log2(9) == 3
    assert tm.level(0) == 0 and tm.level(7) == 3 and tm.level(11) == 2


def test_invalid_nodes_raise_value_error() -> None:
    with pytest.raises(ValueError):
        tm.node_to_leaf(3)
    with pytest.raises(ValueError):
        tm.parent(7, 8)  # the root
    with pytest.raises(ValueError):
        tm.parent(15, 8)  # outside the tree
    with pytest.raises(ValueError):
        tm.direct_path(16, 8)
    with pytest.raises(ValueError):
        tm.node_width((1 << 31) + 1)
