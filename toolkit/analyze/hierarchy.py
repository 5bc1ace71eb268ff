"""The Ward tree of one clustering explained top-down: a taxonomy of the materials.

Every split of the tree (a merge of scipy's linkage read from the root down) whose two children each
hold at least ``min_split_size`` materials is labelled with the descriptors that best separate its
two children:

* 0/1 descriptors: ``effect`` = prevalence in child a minus prevalence in child b (in [-1, 1]);
  two-proportion z-test (pooled variance);
* continuous descriptors: ``effect`` = standardized mean difference (mean a - mean b) / pooled SD;
  Welch's t-test.

Materials missing a descriptor are left out of its test. The p-values of all splits x descriptors of
one clustering are Benjamini-Hochberg corrected together (``q``). ``direction`` is the child node
in which the descriptor is higher (more prevalent). Descriptors of a split are ranked, among those
with q < ``alpha``, by the standardized effect (|SMD|, counted up to ``SMD_CAP`` = 3; for 0/1
descriptors the SMD of the indicator) times ``coverage``, the share of the split's materials where
the descriptor is defined (so a bond length defined for 10 of 500 materials does not name a split),
then by q; the best ``top`` of each side are kept.

Cost: per-node counts, sums and sums of squares of every descriptor come from cumulative sums over
the tree's leaf order (every node covers a contiguous range of leaves), so all splits are tested
in a few vectorised array operations, O((L + S) x D) for L leaves, S splits, D descriptors, with no
loop over descriptors. In the scalable mode the leaves are micro-clusters: their statistics are
summed over their materials first (``leaf_of``), so the hierarchy is over the micro-cluster tree
with material counts as weights and works at 10^6 materials.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from toolkit.analyze.clustering import CHUNK_ROWS, cut_nodes, leaf_order

log = logging.getLogger(__name__)

ALPHA = 0.05
TOP = 5  # descriptors kept per side of a split in attribution.json
SMD_CAP = 3.0  # |standardized effect| counts up to this in the ranking (a bond length defined in few materials
#               with a tiny spread would otherwise name a split)


def leaf_stats(values: np.ndarray, leaf_of: np.ndarray, n_leaves: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per leaf and descriptor: (count of finite values, sum, sum of squares), float64 (L, D); chunked."""
    from scipy.sparse import csr_matrix

    n, d = values.shape
    if n == n_leaves and np.array_equal(leaf_of, np.arange(n)):  # exact mode: leaves are the materials
        fin = np.isfinite(values)
        v = np.where(fin, values, 0.0)
        return fin.astype(np.float64), v.astype(np.float64), v.astype(np.float64) ** 2
    cnt = np.zeros((n_leaves, d))
    s = np.zeros((n_leaves, d))
    s2 = np.zeros((n_leaves, d))
    for a in range(0, n, CHUNK_ROWS):
        b = min(n, a + CHUNK_ROWS)
        blk = np.asarray(values[a:b], dtype=np.float64)
        fin = np.isfinite(blk)
        blk = np.where(fin, blk, 0.0)
        ind = csr_matrix((np.ones(b - a), (leaf_of[a:b], np.arange(b - a))), shape=(n_leaves, b - a))
        cnt += ind @ fin.astype(np.float64)
        s += ind @ blk
        s2 += ind @ (blk * blk)
    return cnt, s, s2


def _bh(p: np.ndarray) -> np.ndarray:
    from scipy.stats import false_discovery_control

    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = false_discovery_control(np.clip(p[ok], 0.0, 1.0), method="bh")
    return q


def split_tests(cnt: np.ndarray, s: np.ndarray, s2: np.ndarray, a_rng: tuple[np.ndarray, np.ndarray],
                b_rng: tuple[np.ndarray, np.ndarray], categorical: np.ndarray) -> dict[str, np.ndarray]:
    """Vectorised child-vs-child tests of S splits x D descriptors from cumulative leaf statistics
    ``cnt, s, s2`` ((L+1, D), rows = prefix sums over the leaf order) and the leaf-order ranges
    ``[start, stop)`` of the two children. Returns arrays (S, D): p, effect, std_effect, mean_a, mean_b,
    n (materials with the descriptor defined in the two children)."""
    from scipy.stats import norm, t as student_t

    def node(rng):
        lo, hi = rng
        return cnt[hi] - cnt[lo], s[hi] - s[lo], s2[hi] - s2[lo]

    na, sa, qa = node(a_rng)
    nb, sb, qb = node(b_rng)
    with np.errstate(divide="ignore", invalid="ignore"):
        ma, mb = sa / na, sb / nb
        va = np.clip((qa - na * ma ** 2) / (na - 1), 0.0, None)
        vb = np.clip((qb - nb * mb ** 2) / (nb - 1), 0.0, None)
        ok = (na >= 2) & (nb >= 2)
        # 0/1: two-proportion z-test, effect = prevalence difference, std effect = diff / pooled sd
        pool = (sa + sb) / (na + nb)
        var_p = pool * (1 - pool)
        z_cat = (ma - mb) / np.sqrt(var_p * (1 / na + 1 / nb))
        p_cat = 2 * norm.sf(np.abs(z_cat))
        std_cat = (ma - mb) / np.sqrt(var_p)
        # continuous: Welch t, effect = standardized mean difference (pooled SD)
        se2 = va / na + vb / nb
        t = (ma - mb) / np.sqrt(se2)
        df = se2 ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
        p_cont = 2 * student_t.sf(np.abs(t), df)
        sd = np.sqrt(((na - 1) * va + (nb - 1) * vb) / (na + nb - 2))
        smd = (ma - mb) / sd
    cat = np.broadcast_to(categorical[None, :], ma.shape)
    p = np.where(cat, p_cat, p_cont)
    effect = np.where(cat, ma - mb, smd)
    std = np.where(cat, std_cat, smd)
    bad = ~ok | ~np.isfinite(p) | ~np.isfinite(effect) | (np.where(cat, var_p, se2) <= 0)
    p = np.where(bad, np.nan, p)
    return {"p": p, "effect": np.where(bad, np.nan, effect), "std_effect": np.where(bad, np.nan, std),
            "mean_a": ma, "mean_b": mb, "n": na + nb}


def explain_tree(z: np.ndarray, leaf_of: np.ndarray, leaf_sizes: np.ndarray, values: np.ndarray, names: list[str],
                 categorical: np.ndarray, min_split_size: int = 10, max_splits: int = 500,
                 alpha: float = ALPHA, top: int = TOP) -> dict[str, Any]:
    """``hierarchy.<layer>`` without ``levels``: the explained splits, top-down (see module doc).

    ``z`` linkage over L leaves, ``leaf_of`` (N,) leaf of each material, ``leaf_sizes`` (L,) materials
    per leaf, ``values`` (N, D) descriptors (NaN = missing), ``categorical`` (D,) bool."""
    from toolkit.analyze.descriptors import descriptor_family

    m = z.shape[0] + 1
    order, start, stop = leaf_order(z)
    size = np.zeros(2 * m - 1, dtype=np.int64)
    size[:m] = leaf_sizes
    for j in range(m - 1):
        size[m + j] = size[int(z[j, 0])] + size[int(z[j, 1])]
    # splits top-down (largest first: breadth over the tree by node size), both children big enough
    # (a split with a child below min_split_size is skipped: its bigger child is explored instead)
    import heapq

    sel: list[int] = []
    parent_of: dict[int, tuple[int | None, int | None]] = {}  # split -> (split above it, that split's child holding it)
    frontier = [(-size[2 * m - 2], 2 * m - 2, None, None)]
    while frontier and len(sel) < max_splits:
        _, nd, up, side = heapq.heappop(frontier)
        if nd < m:
            continue
        a, b = int(z[nd - m, 0]), int(z[nd - m, 1])
        if min(size[a], size[b]) < min_split_size:
            big = a if size[a] >= size[b] else b
            heapq.heappush(frontier, (-size[big], big, up, side))
            continue
        sel.append(nd)
        parent_of[nd] = (up, side)
        for c in (a, b):
            heapq.heappush(frontier, (-size[c], c, nd, c))
    out: dict[str, Any] = {"n_leaves": int(m), "n_materials": int(size[-1]), "min_split_size": int(min_split_size),
                           "max_splits": int(max_splits), "alpha": alpha, "n_splits": len(sel), "n_tests": 0,
                           "splits": []}
    if not sel or not names:
        return out
    cnt, s, s2 = leaf_stats(values, leaf_of, m)

    def cum(x):
        c = np.zeros((m + 1, x.shape[1]))
        np.cumsum(x[order], axis=0, out=c[1:])
        return c

    ccnt, cs, cs2 = cum(cnt), cum(s), cum(s2)
    kids = np.array([[int(z[nd - m, 0]), int(z[nd - m, 1])] for nd in sel])
    # child a = the one first in leaf order (left in the dendrogram)
    swap = start[kids[:, 0]] > start[kids[:, 1]]
    kids[swap] = kids[swap][:, ::-1]
    r = split_tests(ccnt, cs, cs2, (start[kids[:, 0]], stop[kids[:, 0]]), (start[kids[:, 1]], stop[kids[:, 1]]),
                    np.asarray(categorical, bool))
    q = _bh(r["p"])
    out["n_tests"] = int(np.isfinite(q).sum())
    fam = [descriptor_family(n) for n in names]
    depth: dict[int, int] = {}
    for i, nd in enumerate(sel):
        a, b = int(kids[i, 0]), int(kids[i, 1])
        up, side = parent_of[nd]
        depth[nd] = 0 if up is None else depth[up] + 1
        qi, ei, si = q[i], r["effect"][i], r["std_effect"][i]
        cover = r["n"][i] / max(1, size[nd])  # share of the split's materials where the descriptor is defined
        score = np.minimum(np.abs(si), SMD_CAP) * cover
        ok = np.flatnonzero(np.isfinite(qi))
        sig = ok[qi[ok] < alpha]
        rank = sig[np.lexsort((qi[sig], -score[sig]))] if len(sig) else ok[np.argsort(qi[ok], kind="stable")]
        higher_a = ei[rank] > 0  # the best ``top`` of each side, in rank order
        rank = rank[(np.cumsum(higher_a) <= top) & higher_a | (np.cumsum(~higher_a) <= top) & ~higher_a]
        descs = []
        for j in rank:
            descs.append({"descriptor": names[j], "family": fam[j], "kind": "categorical" if categorical[j] else "continuous",
                          "effect": round(float(ei[j]), 4), "std_effect": round(float(si[j]), 4),
                          "direction": a if ei[j] > 0 else b,
                          "mean": [_r(r["mean_a"][i, j]), _r(r["mean_b"][i, j])], "coverage": round(float(cover[j]), 4),
                          "q": float(qi[j])})
        out["splits"].append({"node": int(nd), "parent": up, "parent_side": side, "depth": depth[nd], "size": int(size[nd]),
                              "children": [a, b], "sizes": [int(size[a]), int(size[b])],
                              "distance": round(float(z[nd - m, 2]), 6), "descriptors": descs})
    return out


def node_members(z: np.ndarray, leaf_of: np.ndarray, leaf_sizes: np.ndarray):
    """A function ``node -> row indices`` (into ``leaf_of``) of the materials under a tree node: the
    materials sorted once by their leaf's position in the dendrogram order, so every node is a
    contiguous range of them (O(N log N) once, O(size) per node)."""
    order, start, stop = leaf_order(z)
    pos = np.empty(len(order), dtype=np.int64)
    pos[order] = np.arange(len(order))
    rows = np.argsort(pos[np.asarray(leaf_of, dtype=np.int64)], kind="stable")
    cw = np.concatenate([[0], np.cumsum(np.asarray(leaf_sizes, dtype=np.int64)[order])])

    def members(node: int) -> np.ndarray:
        return rows[cw[start[node]]:cw[stop[node]]]

    return members


def clusters_under(z: np.ndarray, hier: dict[str, Any], nodes: list[int]) -> dict[str, list[int]]:
    """For every child of an explained split, the default-level clusters it holds (``nodes[c]`` is
    cluster c's tree node): those whose node lies under the child, or, for a child below the cut, the
    one cluster that contains it. Keys are node ids as strings (JSON)."""
    _, start, stop = leaf_order(z)
    ns = np.asarray(nodes, dtype=np.int64)
    out: dict[str, list[int]] = {}
    for sp in hier.get("splits", []):
        for ch in sp["children"]:
            inside = np.flatnonzero((start[ns] >= start[ch]) & (stop[ns] <= stop[ch]))
            if not inside.size:
                inside = np.flatnonzero((start[ns] <= start[ch]) & (stop[ns] >= stop[ch]))
            out[str(int(ch))] = [int(c) for c in inside]
    return out


def levels(z: np.ndarray, leaf_sizes: np.ndarray, ks: list[int], default_k: int) -> list[dict[str, Any]]:
    """``hierarchy.<layer>.levels``: for each k (sorted, unique, the default level included) the k
    cluster nodes and their sizes; cluster c of a level is the subtree of ``nodes[c]``."""
    m = z.shape[0] + 1
    order, start, stop = leaf_order(z)
    cw = np.concatenate([[0], np.cumsum(np.asarray(leaf_sizes, dtype=np.int64)[order])])
    out = []
    for k in sorted({min(max(1, int(k)), m) for k in [*ks, default_k]}):
        nodes = cut_nodes(z, k)
        out.append({"k": int(k), "default": k == min(default_k, m), "nodes": [int(n) for n in nodes],
                    "sizes": [int(cw[stop[n]] - cw[start[n]]) for n in nodes]})
    return out


def paths(z: np.ndarray, hier: dict[str, Any], nodes: list[int], n: int = 2) -> dict[int, list[str]]:
    """Taxonomy path of each tree node: from the root down, at every explained split above it, the
    top ``n`` significant descriptors (q < alpha) that are higher on its side, as short words."""
    from toolkit.analyze.report import split_phrase

    m = z.shape[0] + 1
    up = np.full(2 * m - 1, -1, dtype=np.int64)
    up[z[:, 0].astype(np.int64)] = np.arange(m, 2 * m - 1)
    up[z[:, 1].astype(np.int64)] = np.arange(m, 2 * m - 1)
    alpha = hier.get("alpha", ALPHA)
    splits = {sp["node"]: sp for sp in hier.get("splits", [])}
    out: dict[int, list[str]] = {}
    for nd in nodes:
        steps, cur = [], int(nd)
        while up[cur] >= 0:
            par = int(up[cur])
            sp = splits.get(par)
            if sp is not None:
                side = sp["children"][0] if cur == sp["children"][0] else sp["children"][1]
                ds = [d for d in sp["descriptors"] if d["direction"] == side and d["q"] < alpha][:n]
                if ds:
                    steps.append(", ".join(split_phrase(d) for d in ds))
            cur = par
        seen: set[str] = set()  # the same words at two levels (e.g. tellurides, then tellurides again): once
        out[int(nd)] = [st for st in steps[::-1] if not (st in seen or seen.add(st))]
    return out


def _r(v: float) -> float | None:
    return None if not np.isfinite(v) else round(float(v), 4)
