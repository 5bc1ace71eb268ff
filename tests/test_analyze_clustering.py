"""Ward clustering: the weighted (micro-cluster) Ward equals scipy's exact Ward, and the scalable
mode agrees with exact Ward on a few thousand points, also when reading a chunked Zarr array."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from scipy.cluster.hierarchy import fcluster, ward
from sklearn.metrics import adjusted_rand_score

from toolkit.analyze.clustering import FeatureTransform, cluster, weighted_ward


def _blobs(n: int, d: int, k: int, seed: int, spread: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """k Gaussian blobs (unit variance) with centres N(0, spread^2), float32."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=spread, size=(k, d))
    truth = rng.integers(0, k, n)
    return (centres[truth] + rng.normal(size=(n, d))).astype(np.float32), truth


def test_weighted_ward_with_unit_weights_is_scipy_ward():
    x = np.random.default_rng(1).normal(size=(400, 6))
    z = weighted_ward(x, np.ones(len(x)))
    ref = ward(x)
    np.testing.assert_allclose(z[:, 2], ref[:, 2], rtol=1e-10)
    np.testing.assert_array_equal(z[:, 3], ref[:, 3])
    for k in (2, 5, 12):
        assert adjusted_rand_score(fcluster(z, k, "maxclust"), fcluster(ref, k, "maxclust")) == 1.0


def test_weighted_ward_weights_equal_duplicated_points():
    """A centroid of weight w behaves like w coincident points (Ward's merge cost of two clusters)."""
    rng = np.random.default_rng(2)
    pts = rng.normal(size=(30, 4))
    w = rng.integers(1, 4, size=30)
    z_w = weighted_ward(pts, w)
    z_dup = ward(np.repeat(pts, w, axis=0))
    # merging duplicates costs 0; the last 29 merges of the duplicated data are the weighted merges
    np.testing.assert_allclose(np.sort(z_w[:, 2]), np.sort(z_dup[:, 2])[-29:], rtol=1e-8)


def test_weighted_ward_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        weighted_ward(np.zeros((1, 3)), np.ones(1))
    with pytest.raises(ValueError, match="positive"):
        weighted_ward(np.zeros((3, 3)), np.array([1.0, 0.0, 2.0]))


def test_scalable_mode_agrees_with_exact_ward(tmp_path):
    x, truth = _blobs(3000, 32, 8, seed=0, spread=1.2)
    exact = cluster(x, n_clusters=8, seed=0)
    assert exact.mode == "exact"
    # the same data as a chunked Zarr array (how embeddings.zarr is read), scalable mode forced
    za = zarr.create_array(tmp_path / "x.zarr", shape=x.shape, chunks=(500, 32), dtype="float32")
    za[:] = x
    scal = cluster(za, n_clusters=8, scalable_threshold=100, n_micro=300, seed=0)
    assert scal.mode == "scalable" and scal.linkage.shape[0] + 1 <= 300
    assert scal.leaf_sizes.sum() == len(x)
    ari = adjusted_rand_score(exact.labels, scal.labels)
    assert ari >= 0.9, ari
    assert adjusted_rand_score(truth, exact.labels) > 0.5  # the blobs overlap but are recoverable


def test_auto_k_by_silhouette_finds_separated_blobs():
    x, truth = _blobs(600, 8, 5, seed=3, spread=6.0)
    res = cluster(x, n_clusters="auto", max_clusters=10)
    assert res.n_clusters == 5
    assert set(res.scores) == set(range(2, 11)) and max(res.scores, key=res.scores.get) == 5
    assert adjusted_rand_score(truth, res.labels) > 0.95
    assert res.coords.shape == (600, 2) and np.isfinite(res.coords).all()


def test_preprocessing_imputes_and_records():
    x, _ = _blobs(200, 6, 3, seed=4)
    x[::7, 2] = np.nan
    x[:, 5] = 1.0  # constant column: left at 0 by standardisation, not a division by zero
    tf = FeatureTransform(standardize=True, pca_components=3).fit(x)
    out = tf.transform(x)
    assert out.shape == (200, 3) and np.isfinite(out).all() and out.dtype == np.float32
    assert tf.info["imputed_values"] == int(np.isnan(x).sum()) and tf.info["pca_components"] == 3
    res = cluster(x, n_clusters=3, pca_components=3)
    assert res.summary()["preprocessing"]["pca_components"] == 3


def test_umap_map_is_display_only():
    """analyze.map_projection = umap (umap-learn): the 2-D map changes, the clustering does not; the
    interactive map and the figure name their axes after the projection."""
    pytest.importorskip("umap")
    from toolkit.analyze import interactive
    from toolkit.analyze.clustering import cluster

    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(c, 0.3, (40, 6)) for c in (0.0, 3.0, 6.0)]).astype(np.float32)
    pca = cluster(x, n_clusters=3, seed=0)
    um = cluster(x, n_clusters=3, seed=0, projection="umap")
    assert np.array_equal(pca.labels, um.labels) and um.preprocessing["map"] == "umap"
    assert um.coords.shape == (120, 2) and np.isfinite(um.coords).all() and not np.allclose(um.coords, pca.coords)
    # UMAP keeps the three groups apart: every material is nearer its own group's centre than any other's
    centres = np.stack([um.coords[um.labels == c].mean(0) for c in range(3)])
    nearest = np.argmin(((um.coords[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    assert np.array_equal(nearest, um.labels)
    d = interactive.map_data("gcn_1", [f"m{i}" for i in range(120)], ["X"] * 120, um.coords, um.labels, {},
                             np.linspace(0, 15, 31), projection="umap")
    assert "2-D map (UMAP)" in interactive._figure_html(d, "map-gcn_1") and "UMAP 1" in interactive._figure_html(d, "x")
