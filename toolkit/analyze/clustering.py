"""Hierarchical Ward clustering of per-material feature matrices (layer activations or spectra).

Two modes, one interface (:func:`cluster`):

* **exact** (N <= ``scalable_threshold``): ``scipy.cluster.hierarchy.linkage(method="ward")``.
  Memory is dominated by the condensed distance matrix, 8 * N * (N - 1) / 2 bytes (1.6 GB at
  N = 20,000).
* **scalable** (N > ``scalable_threshold``): chunked mini-batch k-means (``sklearn.cluster.
  MiniBatchKMeans.partial_fit`` on float32 chunks) into ``micro_clusters`` micro-clusters, exact
  centroids and sizes from a second chunked pass, then Ward on the *weighted* centroids
  (:func:`weighted_ward`). Memory is O(chunk * micro_clusters + N) besides the input, which may be
  any array-like supporting row slicing (numpy, numpy.memmap, zarr.Array). The per-chunk passes
  (feature statistics, micro-cluster assignment) go through :func:`map_chunks`: in this process, or
  as Dask tasks under ``analyze.engine = dask`` (:mod:`toolkit.analyze.engine`), reduced in chunk
  order either way; the mini-batch fit is sequential by nature and stays in the calling process.

Weighted Ward: for clusters A, B with sizes n and centroids c, Ward's merge distance (scipy's
convention) is ``d(A, B) = sqrt(2 nA nB / (nA + nB)) * ||cA - cB||``; merging keeps the size-weighted
centroid. This is exactly the Lance-Williams Ward update with sizes as weights, evaluated from
centroids instead of a stored distance matrix. With every weight equal to 1 it reproduces
``scipy.cluster.hierarchy.ward`` (tested). The linkage of the scalable mode is over micro-clusters
(leaves = micro-clusters, column 3 = number of materials), see ``ClusterResult.leaf_of``.

The number of clusters is given, follows from a target cluster size (``"size"``: k = round(N /
target_cluster_size) clipped to [2, max_clusters], the default of the analyze stage: clusters of the
size people read, ~25 materials, as the study's 100 clusters of 2,681 materials), or is chosen by the
mean silhouette score (``"auto"``; Euclidean, on the prepared features of at most
``silhouette_sample`` materials) over k = 2..max_clusters; ties go to the larger k.

A cut at k is a set of k tree nodes (:func:`cut_nodes`: the children of the last k-1 merges that
are not themselves among them); cluster c is the subtree of ``ClusterResult.nodes[c]`` and clusters
are numbered in the dendrogram's leaf order (:func:`leaf_order`), so every cluster is a node of the
Ward tree that :mod:`toolkit.analyze.hierarchy` explains.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform
from sklearn.metrics import silhouette_score

log = logging.getLogger(__name__)

CHUNK_ROWS = 16384


@dataclass
class ClusterResult:
    """Outcome of clustering one feature matrix.

    ``labels`` (N,) int32 in 0..k-1; ``linkage`` scipy format (L-1, 4) over L leaves;
    ``leaf_of`` (N,) int32 leaf index of each material (identity in exact mode); ``leaf_sizes`` (L,)
    materials per leaf; ``coords`` (N, 2)
    float32 first two principal components of the prepared features (for the 2-D map)."""

    labels: np.ndarray
    linkage: np.ndarray
    leaf_of: np.ndarray
    leaf_sizes: np.ndarray
    n_clusters: int
    mode: str
    criterion: str
    scores: dict[int, float] = field(default_factory=dict)
    coords: np.ndarray | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    nodes: list[int] = field(default_factory=list)  # tree node (scipy id) of each cluster 0..k-1

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (no per-material arrays)."""
        return {"n_clusters": int(self.n_clusters), "mode": self.mode, "criterion": self.criterion,
                "silhouette": {str(k): float(v) for k, v in self.scores.items()},
                "n_leaves": int(self.linkage.shape[0] + 1), "preprocessing": self.preprocessing}


# ---------------------------------------------------------------- feature preparation
def _chunks(n: int, size: int = CHUNK_ROWS):
    for s in range(0, n, size):
        yield s, min(n, s + size)


def column_stats(x: Any, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """NaN-aware column mean and standard deviation (float64) of an (N, H) array-like, in chunks
    (per-chunk sums through :func:`map_chunks`, added in chunk order: the same figures on every engine).

    Returns (mean, std, number of non-finite entries). Columns without any finite value get mean 0."""
    n, h = x.shape
    s = np.zeros(h)
    s2 = np.zeros(h)
    cnt = np.zeros(h)
    bad = 0
    for cs, cs2, ccnt, cbad in map_chunks(_chunk_sums, x, list(_chunks(n, chunk or chunk_rows()))):
        s += cs
        s2 += cs2
        cnt += ccnt
        bad += cbad
    mean = np.divide(s, cnt, out=np.zeros(h), where=cnt > 0)
    var = np.divide(s2, cnt, out=np.zeros(h), where=cnt > 0) - mean ** 2
    return mean, np.sqrt(np.clip(var, 0.0, None)), bad


def _chunk_sums(x: Any, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Column sums, sums of squares and finite counts of rows a:b (NaN/inf skipped), and the non-finite count."""
    blk = np.asarray(x[a:b], dtype=np.float64)
    fin = np.isfinite(blk)
    blk = np.where(fin, blk, 0.0)
    return blk.sum(0), (blk * blk).sum(0), fin.sum(0).astype(np.float64), int(blk.size - fin.sum())


# ---------------------------------------------------------------- chunk map (engine hook, issue 20)
_CHUNK_MAP: ContextVar[Callable | None] = ContextVar("spectrolens_chunk_map", default=None)
_CHUNK_ROWS: ContextVar[int | None] = ContextVar("spectrolens_chunk_rows", default=None)


def chunk_rows() -> int:
    """Rows per chunk of the chunked passes: ``analyze.chunk_rows`` inside :func:`use_chunk_map`, else CHUNK_ROWS."""
    return _CHUNK_ROWS.get() or CHUNK_ROWS


def map_chunks(fn: Callable, x: Any, ranges: list[tuple[int, int]]) -> Iterator[Any]:
    """``fn(x, a, b)`` for each row range, results in range order. Sequential in this process unless an
    engine installed a mapper with :func:`use_chunk_map` (``toolkit.analyze.engine``: Dask tasks over
    the chunks of a Zarr array). The caller reduces the results in order, so every engine gives the
    same numbers."""
    m = _CHUNK_MAP.get()
    if m is None:
        return (fn(x, a, b) for a, b in ranges)
    return m(fn, x, ranges)


@contextmanager
def use_chunk_map(mapper: Callable | None, rows: int | None = None):
    """Route :func:`map_chunks` through ``mapper(fn, x, ranges) -> iterator`` (None: in turn, here) and
    use chunks of ``rows`` rows (None: CHUNK_ROWS) inside the block."""
    token, token_rows = _CHUNK_MAP.set(mapper), _CHUNK_ROWS.set(rows)
    try:
        yield
    finally:
        _CHUNK_MAP.reset(token)
        _CHUNK_ROWS.reset(token_rows)


class FeatureTransform:
    """Impute (column mean), optionally standardise (z-score; constant columns left at 0) and
    optionally project on principal components. Fitted on the whole matrix in chunks (PCA: on a
    random sample of at most ``pca_sample`` rows). Output float32."""

    def __init__(self, standardize: bool = True, pca_components: int | None = None, seed: int = 0,
                 pca_sample: int = 50_000):
        self.standardize = standardize
        self.pca_components = pca_components
        self.seed = seed
        self.pca_sample = pca_sample
        self.info: dict[str, Any] = {}

    def fit(self, x: Any) -> "FeatureTransform":
        n, h = x.shape
        self.mean_, std, bad = column_stats(x)
        self.scale_ = np.where(std > 0, std, 1.0) if self.standardize else np.ones(h)
        self.pca_ = None
        self.info = {"standardize": self.standardize, "imputed_values": bad, "imputation": "column mean",
                     "input_dim": int(h), "pca_components": None}
        if self.pca_components:
            from sklearn.decomposition import PCA

            rng = np.random.default_rng(self.seed)
            rows = np.sort(rng.choice(n, size=min(n, self.pca_sample), replace=False))
            sample = self._scale(np.asarray(x[rows] if not hasattr(x, "oindex") else x.oindex[rows]))
            k = min(self.pca_components, sample.shape[0], sample.shape[1])
            self.pca_ = PCA(n_components=k, random_state=self.seed).fit(sample)
            self.info.update({"pca_components": int(k), "pca_fit_rows": int(len(rows)),
                              "pca_explained_variance": float(self.pca_.explained_variance_ratio_.sum())})
        return self

    def _scale(self, blk: np.ndarray) -> np.ndarray:
        blk = np.asarray(blk, dtype=np.float32)
        blk = np.where(np.isfinite(blk), blk, self.mean_.astype(np.float32))
        return (blk - self.mean_.astype(np.float32)) / self.scale_.astype(np.float32)

    def transform(self, blk: Any) -> np.ndarray:
        out = self._scale(np.asarray(blk))
        if self.pca_ is not None:
            out = self.pca_.transform(out).astype(np.float32)
        return out

    @property
    def out_dim(self) -> int:
        return int(self.pca_.n_components_) if self.pca_ is not None else int(self.mean_.shape[0])


# ---------------------------------------------------------------- weighted Ward
def weighted_ward(centroids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Ward linkage of weighted points (nearest-neighbour chain; O(M) memory besides the input).

    ``centroids`` (M, D), ``weights`` (M,) > 0 (number of original points each stands for).
    Returns a valid scipy linkage matrix (M-1, 4): merged ids, Ward distance (scipy convention) and
    the number of *leaves* of the new cluster (scipy requires leaf counts; the weights are the
    caller's, e.g. ``ClusterResult.leaf_sizes``). Unit weights give ``scipy.cluster.hierarchy.ward``."""
    c = np.array(centroids, dtype=np.float64)
    w = np.array(weights, dtype=np.float64)
    m = c.shape[0]
    if m < 2:
        raise ValueError("weighted_ward needs at least 2 points")
    if np.any(w <= 0):
        raise ValueError("weighted_ward: weights must be positive")
    sq = np.einsum("ij,ij->i", c, c)
    active = np.ones(m, dtype=bool)
    merges = np.empty((m - 1, 3), dtype=np.float64)  # slot x, slot y (kept), distance
    chain: list[int] = []
    nm = 0

    def dist2_to_all(a: int) -> np.ndarray:
        d2 = sq + sq[a] - 2.0 * (c @ c[a])
        np.clip(d2, 0.0, None, out=d2)
        d2 *= 2.0 * w * w[a] / (w + w[a])
        d2[~active] = np.inf
        d2[a] = np.inf
        return d2

    while nm < m - 1:
        if not chain:
            chain.append(int(np.flatnonzero(active)[0]))
        a = chain[-1]
        d2 = dist2_to_all(a)
        b = int(np.argmin(d2))
        if len(chain) > 1 and d2[chain[-2]] <= d2[b]:
            b = chain[-2]
        if len(chain) > 1 and b == chain[-2]:
            chain.pop()
            chain.pop()
            diff = c[a] - c[b]
            dist = np.sqrt(2.0 * w[a] * w[b] / (w[a] + w[b]) * float(diff @ diff))
            lo, hi = min(a, b), max(a, b)
            merges[nm] = (lo, hi, dist)
            nm += 1
            wt = w[a] + w[b]
            c[hi] = (w[a] * c[a] + w[b] * c[b]) / wt
            w[hi] = wt
            sq[hi] = c[hi] @ c[hi]
            active[lo] = False
        else:
            chain.append(b)
    return _label_merges(merges, m)


def _label_merges(merges: np.ndarray, m: int) -> np.ndarray:
    """Sort merges by distance and give clusters scipy ids with a union-find (as scipy's nn_chain)."""
    order = np.argsort(merges[:, 2], kind="stable")
    parent = np.arange(2 * m - 1)
    size = np.concatenate([np.ones(m), np.zeros(m - 1)])

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    z = np.empty((m - 1, 4), dtype=np.float64)
    for k, row in enumerate(merges[order]):
        rx, ry = find(int(row[0])), find(int(row[1]))
        new = m + k
        parent[rx] = parent[ry] = new
        size[new] = size[rx] + size[ry]
        z[k] = (min(rx, ry), max(rx, ry), row[2], size[new])
    return z


# ---------------------------------------------------------------- micro-clusters
def micro_clusters(x: Any, transform: FeatureTransform, n_micro: int, seed: int = 0,
                   epochs: int = 2, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chunked mini-batch k-means of the transformed rows of ``x``.

    Returns (centroids (M, D) float64 exact means of their members, counts (M,), leaf_of (N,) int32);
    empty micro-clusters are dropped and leaves renumbered 0..M-1."""
    from sklearn.cluster import MiniBatchKMeans

    n = x.shape[0]
    chunk = chunk or max(chunk_rows(), 4 * n_micro)
    km = MiniBatchKMeans(n_clusters=n_micro, random_state=seed, batch_size=min(chunk, 4096), n_init=1,
                         reassignment_ratio=0.0)
    rng = np.random.default_rng(seed)
    starts = np.arange(0, n, chunk)
    for _ in range(epochs):
        for s in rng.permutation(starts):
            blk = transform.transform(x[s:s + chunk])
            if blk.shape[0] < n_micro and not hasattr(km, "cluster_centers_"):
                continue  # the first partial_fit needs at least n_micro rows
            km.partial_fit(blk)
    d = transform.out_dim
    sums = np.zeros((n_micro, d))
    counts = np.zeros(n_micro, dtype=np.int64)
    leaf = np.empty(n, dtype=np.int32)
    ranges = list(_chunks(n, chunk))
    assign = partial(_assign_chunk, transform=transform, km=km, n_micro=n_micro)
    for (a, b), (lab, cnt, sm) in zip(ranges, map_chunks(assign, x, ranges)):
        leaf[a:b] = lab
        counts += cnt
        sums += sm
    keep = counts > 0
    renum = np.full(n_micro, -1, dtype=np.int32)
    renum[keep] = np.arange(int(keep.sum()), dtype=np.int32)
    return sums[keep] / counts[keep, None], counts[keep], renum[leaf]


def _assign_chunk(x: Any, a: int, b: int, transform: FeatureTransform, km: Any, n_micro: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Micro-cluster of rows a:b, members per micro-cluster and their (n_micro, D) float64 row sums."""
    blk = transform.transform(x[a:b])
    lab = km.predict(blk).astype(np.int32)
    return lab, np.bincount(lab, minlength=n_micro).astype(np.int64), _group_sum(lab, blk, n_micro)


def _group_sum(lab: np.ndarray, blk: np.ndarray, k: int) -> np.ndarray:
    """Per-label row sums (k, D) in float64, vectorised via a sparse indicator matrix."""
    from scipy.sparse import csr_matrix

    ind = csr_matrix((np.ones(len(lab)), (lab, np.arange(len(lab)))), shape=(k, len(lab)))
    return np.asarray(ind @ blk.astype(np.float64))


# ---------------------------------------------------------------- cuts of the tree
def leaf_order(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dendrogram leaf order of linkage ``z`` over L leaves: (order (L,) leaf ids left to right,
    start (2L-1,), stop (2L-1,)): node i covers the leaves ``order[start[i]:stop[i]]`` (scipy node
    ids: leaves 0..L-1, merge j is node L+j)."""
    from scipy.cluster.hierarchy import leaves_list

    m = z.shape[0] + 1
    order = leaves_list(z)
    start = np.empty(2 * m - 1, dtype=np.int64)
    stop = np.empty(2 * m - 1, dtype=np.int64)
    start[order] = np.arange(m)
    stop[:m] = start[:m] + 1
    a, b = z[:, 0].astype(np.int64), z[:, 1].astype(np.int64)
    for j in range(m - 1):  # children precede their parent
        start[m + j] = min(start[a[j]], start[b[j]])
        stop[m + j] = max(stop[a[j]], stop[b[j]])
    return order, start, stop


def cut_nodes(z: np.ndarray, k: int) -> list[int]:
    """The k tree nodes of the cut into k clusters (children of the last k-1 merges that are not
    merges among them), in dendrogram leaf order. ``k`` is clipped to [1, L]."""
    m = z.shape[0] + 1
    k = max(1, min(int(k), m))
    top = set(range(2 * m - k, 2 * m - 1))  # the last k-1 merges
    nodes = [int(c) for j in range(m - k, m - 1) for c in z[j, :2] if int(c) not in top] if k > 1 else [2 * m - 2]
    _, start, _ = leaf_order(z)
    return sorted(nodes, key=lambda n: start[n])


def leaf_labels(z: np.ndarray, nodes: list[int]) -> np.ndarray:
    """(L,) int32 label of every leaf: the index in ``nodes`` of the node containing it."""
    order, start, stop = leaf_order(z)
    lab = np.full(z.shape[0] + 1, -1, dtype=np.int32)
    for c, nd in enumerate(nodes):
        lab[order[start[nd]:stop[nd]]] = c
    return lab


def size_k(n: int, target: int, max_clusters: int, n_leaves: int | None = None) -> int:
    """k of the ``"size"`` rule: round(n / target) clipped to [2, max_clusters] (and to the leaves)."""
    k = int(np.clip(int(round(n / max(1, target))), 2, max(2, max_clusters)))
    return min(k, n_leaves) if n_leaves else k


# ---------------------------------------------------------------- the interface
def _cut(z: np.ndarray, k: int) -> np.ndarray:
    return (fcluster(z, t=k, criterion="maxclust") - 1).astype(np.int32)


def choose_k(z: np.ndarray, leaf_of: np.ndarray, feats_sample: np.ndarray, rows: np.ndarray,
             max_clusters: int) -> tuple[int, dict[int, float]]:
    """Mean silhouette of the cut for k = 2..max_clusters on the sampled rows; best k (ties: larger)."""
    d = squareform(pdist(feats_sample.astype(np.float64)))
    scores: dict[int, float] = {}
    n_leaves = z.shape[0] + 1
    for k in range(2, min(max_clusters, n_leaves) + 1):
        lab = _cut(z, k)[leaf_of[rows]]
        if len(np.unique(lab)) < 2 or len(np.unique(lab)) >= len(rows):
            continue
        scores[k] = float(silhouette_score(d, lab, metric="precomputed"))
    if not scores:
        return 2, scores
    best = max(scores.values())
    return max(k for k, v in scores.items() if v >= best - 1e-12), scores


def cluster(x: Any, n_clusters: int | str = "auto", max_clusters: int = 20, standardize: bool = True,
            pca_components: int | None = None, scalable_threshold: int = 20_000, n_micro: int = 2000,
            seed: int = 0, silhouette_sample: int = 3000, threads: int | None = None,
            target_cluster_size: int = 25, projection: str = "pca") -> ClusterResult:
    """Cluster the rows of ``x`` (N, H) (float32 array-like; NaN = missing, imputed) with Ward;
    ``n_clusters``: a number, ``"size"`` (round(N / target_cluster_size) in [2, max_clusters]) or
    ``"auto"`` (silhouette).

    ``threads`` caps BLAS/OpenMP threads of the k-means step (None: the libraries' default). On a
    shared, oversubscribed node threaded small GEMMs were measured 8x slower than one thread.
    ``projection``: the 2-D map (``coords``), ``"pca"`` or ``"umap"`` (umap-learn; display only, the
    clustering does not use it)."""
    n = int(x.shape[0])
    if n < 3:
        raise ValueError(f"clustering needs at least 3 materials, got {n}")
    tf = FeatureTransform(standardize, pca_components, seed).fit(x)
    rng = np.random.default_rng(seed)
    if n <= scalable_threshold:
        feats = tf.transform(x[:])
        z = linkage(feats.astype(np.float64), method="ward")
        leaf_of = np.arange(n, dtype=np.int32)
        sizes = np.ones(n, dtype=np.int64)
        mode = "exact"
        rows = np.sort(rng.choice(n, size=min(n, silhouette_sample), replace=False))
        sample = feats[rows]
    else:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(threads):
            centroids, sizes, leaf_of = micro_clusters(x, tf, min(n_micro, n), seed)
        z = weighted_ward(centroids, sizes)
        mode = "scalable"
        feats = None
        rows = np.sort(rng.choice(n, size=min(n, silhouette_sample), replace=False))
        sample = tf.transform(x.oindex[rows] if hasattr(x, "oindex") else np.asarray(x[rows]))
    if n_clusters == "auto":
        k, scores = choose_k(z, leaf_of, sample, rows, max_clusters)
        criterion = f"silhouette over k=2..{max_clusters}"
    elif n_clusters == "size":
        k, scores = size_k(n, target_cluster_size, max_clusters, z.shape[0] + 1), {}
        criterion = f"size: round(N / {target_cluster_size}) clipped to [2, {max_clusters}]"
    else:
        k, scores, criterion = int(n_clusters), {}, "user"
    nodes = cut_nodes(z, k)
    labels = leaf_labels(z, nodes)[leaf_of]
    coords = _umap2(feats, x, tf, seed) if projection == "umap" else _pca2(feats, x, tf, seed)
    info = dict(tf.info)
    info["map"] = projection
    if mode == "scalable":
        info.update({"micro_clusters": int(z.shape[0] + 1), "micro_method": "MiniBatchKMeans (chunked)"})
    return ClusterResult(labels=labels.astype(np.int32), linkage=z, leaf_of=leaf_of, leaf_sizes=sizes, n_clusters=int(len(np.unique(labels))),
                         mode=mode, criterion=criterion, scores=scores, coords=coords, preprocessing=info,
                         nodes=nodes)


UMAP_FIT_MAX = 20_000  # materials the UMAP map is fitted on (a seeded sample above; the rest are transformed)


def _umap2(feats: np.ndarray | None, x: Any, tf: FeatureTransform, seed: int) -> np.ndarray:
    """2-D UMAP (umap-learn, 15 neighbours, min_dist 0.1, seeded) of the prepared features, for the
    map: fitted on at most UMAP_FIT_MAX materials, the others placed with ``transform`` in chunks."""
    try:
        import umap
    except ImportError:
        raise ValueError("analyze.map_projection = umap needs the umap-learn package (pip install umap-learn)") from None
    n = x.shape[0]
    rows = np.arange(n) if n <= UMAP_FIT_MAX else np.sort(np.random.default_rng(seed).choice(n, UMAP_FIT_MAX, replace=False))
    fit_on = feats[rows] if feats is not None else tf.transform(x.oindex[rows] if hasattr(x, "oindex") else np.asarray(x[rows]))
    reducer = umap.UMAP(n_components=2, n_neighbors=min(15, max(2, len(rows) - 1)), min_dist=0.1, random_state=seed)
    emb = reducer.fit_transform(np.asarray(fit_on, dtype=np.float32))
    out = np.zeros((n, 2), dtype=np.float32)
    out[rows] = emb
    if len(rows) < n:
        rest = np.setdiff1d(np.arange(n), rows)
        for a in range(0, len(rest), CHUNK_ROWS):
            r = rest[a:a + CHUNK_ROWS]
            part = feats[r] if feats is not None else tf.transform(x.oindex[r] if hasattr(x, "oindex") else np.asarray(x[r]))
            out[r] = reducer.transform(np.asarray(part, dtype=np.float32))
    return out


def _pca2(feats: np.ndarray | None, x: Any, tf: FeatureTransform, seed: int) -> np.ndarray:
    """First two principal components (float32) of the prepared features, for the 2-D map."""
    from sklearn.decomposition import PCA

    n = x.shape[0]
    if feats is None:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=min(n, 50_000), replace=False))
        fit_on = tf.transform(x.oindex[rows] if hasattr(x, "oindex") else np.asarray(x[rows]))
    else:
        fit_on = feats
    k = min(2, fit_on.shape[1], fit_on.shape[0])
    pca = PCA(n_components=k, random_state=seed).fit(fit_on)
    out = np.zeros((n, 2), dtype=np.float32)
    if feats is not None:
        out[:, :k] = pca.transform(feats)
    else:
        for a, b in _chunks(n):
            out[a:b, :k] = pca.transform(tf.transform(x[a:b]))
    return out
