"""Index stage: exact search, Annoy recall against it, figures, files, the side table and reruns (synthetic vectors)."""

from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.embeddings import INFO_COLUMNS, read_embeddings, write_embedding_rows
from pipeline.errors import MelsearchError
from pipeline.index import (
    AUTO,
    IDS_FILE,
    INDEX_FILE,
    MAP_FILE,
    META_FILE,
    IndexConfig,
    angular_distance,
    auto_index_params,
    build_annoy_index,
    effective_search_k,
    exact_neighbours,
    load_annoy,
    read_ids,
)
from pipeline.layout import added_table_path
from pipeline.vectors import l2_normalise

META = {"model": "cifar10", "model_key": "cifar10-0123456789", "feature_key": "featkey"}


def clustered(rng: np.random.Generator, n: int, dim: int, n_genres: int, spread: float) -> tuple[np.ndarray, ...]:
    """Non-negative (ReLU-like) unit vectors around ``n_genres`` centres; larger ``spread``: more overlap."""
    centres = rng.standard_normal((n_genres, dim))
    genre = rng.integers(0, n_genres, n)
    vectors = np.maximum(centres[genre] + spread * rng.standard_normal((n, dim)), 0)
    return l2_normalise(vectors.astype(np.float32)), genre


def write_vectors(path, vectors: np.ndarray, genre: np.ndarray, *, unlabelled: int = 0) -> list[dict]:
    rows = [
        {"track_id": f"g{g}.{i:05d}", "path": f"/audio/g{g}/{i}.wav", "label": "" if i < unlabelled else f"g{g}",
         "split": "train", "predicted_label": f"g{g}"}
        for i, g in enumerate(genre)
    ]
    write_embedding_rows(rows, vectors, path, metadata=META)
    return rows


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.mark.parametrize("k", [1, 5, 10])
@pytest.mark.parametrize("leave_one_out", [False, True])
def test_exact_neighbours_match_a_full_sort(rng, k, leave_one_out):
    vectors, _ = clustered(rng, 300, 24, 4, 1.0)
    queries = np.arange(0, 300, 7)
    ids, dist = exact_neighbours(vectors, vectors[queries], k, exclude=queries if leave_one_out else None)
    full = np.sqrt(np.maximum(((vectors[queries, None, :] - vectors[None]) ** 2).sum(-1), 0))  # Euclidean on unit
    if leave_one_out:
        full[np.arange(len(queries)), queries] = np.inf
    expected = np.argsort(full, axis=1, kind="stable")[:, :k]
    assert ids.shape == dist.shape == (len(queries), k)
    np.testing.assert_array_equal(ids, expected)
    # float32 cosines near 1 carry ~6e-8 error, so sqrt(2 - 2 cos) is ~5e-4 off at distance 0 (as in Annoy)
    np.testing.assert_allclose(dist, np.take_along_axis(full, expected, axis=1), atol=1e-3)
    assert (np.diff(dist, axis=1) >= 0).all()
    if not leave_one_out:
        np.testing.assert_array_equal(ids[:, 0], queries)


def test_angular_distance_is_euclidean_on_unit_vectors(rng):
    a, b = l2_normalise(rng.standard_normal((2, 50, 16)).reshape(100, 16)).reshape(2, 50, 16)
    np.testing.assert_allclose(angular_distance((a * b).sum(1)), np.linalg.norm(a - b, axis=1), atol=1e-5)


def test_effective_search_k():
    assert effective_search_k(1234, 50, 10) == 1234
    assert effective_search_k(-1, 50, 10) == 5000


@pytest.mark.parametrize("dim, spread", [(64, 3.0), (256, 3.0), (512, 1.0)])
def test_default_index_recall_at_10_vs_exact_on_gtzan_sized_sets(tmp_path, rng, dim, spread):
    # spread 3.0 is where Annoy's own default search_k falls to 0.88-0.97: the defaults must still give 0.99
    vectors, genre = clustered(rng, 1000, dim, 10, spread)
    write_vectors(tmp_path / "emb" / "embeddings.parquet", vectors, genre)
    figures = build_annoy_index(tmp_path / "emb" / "embeddings.parquet", tmp_path / "index" / "m")
    assert figures["recall_at_10"] >= 0.99
    assert figures["recall_queries"] == 500

    # recomputed here for every item, with a full sort as the reference rather than the library's exact search
    meta = json.loads((tmp_path / "index" / "m" / META_FILE).read_text())
    index = load_annoy(tmp_path / "index" / "m" / INDEX_FILE, dim)
    search_k = effective_search_k(meta["search_k"], meta["n_trees"], 10)
    found = 0
    for item in range(0, 1000, 2):
        truth = [j for j in np.argsort(-(vectors @ vectors[item]), kind="stable")[:11] if j != item][:10]
        approx = [j for j in index.get_nns_by_vector(vectors[item], 11, search_k=search_k) if j != item][:10]
        found += len(set(truth) & set(approx))
    assert found / 5000 >= 0.98


def test_index_files_meta_and_id_map(tmp_path, rng):
    vectors, genre = clustered(rng, 200, 32, 4, 0.5)
    rows = write_vectors(tmp_path / "emb" / "embeddings.parquet", vectors, genre, unlabelled=20)
    out = tmp_path / "index" / "cifar10-abc"
    figures = build_annoy_index(tmp_path / "emb" / "embeddings.parquet", out, n_trees=10, search_k=500)

    assert sorted(p.name for p in out.iterdir()) == sorted([INDEX_FILE, IDS_FILE, META_FILE, MAP_FILE])
    meta = json.loads((out / META_FILE).read_text())
    assert {k: meta[k] for k in ("dim", "metric", "n_trees", "search_k", "count", "model", "model_key",
                                 "feature_key", "embeddings_key")} == {
        "dim": 32, "metric": "angular", "n_trees": 10, "search_k": 500, "count": 200, "model": "cifar10",
        "model_key": META["model_key"], "feature_key": "featkey", "embeddings_key": "emb"}
    assert meta["figures"] == figures
    ids = read_ids(out)
    assert [r["item"] for r in ids] == list(range(200))
    assert [r["track_id"] for r in ids] == [r["track_id"] for r in rows]
    assert [r["label"] for r in ids] == [r["label"] for r in rows]
    assert {r["split"] for r in ids} == {"train"}
    index = load_annoy(out / INDEX_FILE, 32)
    assert index.get_n_items() == 200 and index.get_n_trees() == 10
    np.testing.assert_allclose(index.get_item_vector(17), vectors[17], atol=1e-6)
    picture = matplotlib.image.imread(out / MAP_FILE)
    assert picture.ndim == 3 and picture.shape[0] > 200 and picture.shape[1] > 200
    # well-separated clusters: neighbours share the genre; only labelled tracks are queries
    assert figures["genre_precision_at_10"] > 0.95
    assert figures["precision_queries"] == 180
    assert set(figures["genre_precision_by_genre"]) == {f"g{g}" for g in set(genre[20:].tolist())}


def test_genre_precision_is_at_chance_for_random_labels(tmp_path, rng):
    vectors, _ = clustered(rng, 600, 32, 6, 0.5)
    shuffled = rng.integers(0, 6, 600)
    write_vectors(tmp_path / "embeddings.parquet", vectors, shuffled)
    figures = build_annoy_index(tmp_path / "embeddings.parquet", tmp_path / "index" / "m", n_trees=5)
    assert abs(figures["genre_precision_at_10"] - 1 / 6) < 0.06


def test_rebuild_is_byte_identical(tmp_path, rng):
    vectors, genre = clustered(rng, 300, 32, 5, 1.0)
    write_vectors(tmp_path / "embeddings.parquet", vectors, genre)
    a, b = tmp_path / "index" / "a", tmp_path / "index" / "b"
    assert build_annoy_index(tmp_path / "embeddings.parquet", a) == build_annoy_index(
        tmp_path / "embeddings.parquet", b
    )
    for name in (INDEX_FILE, IDS_FILE, MAP_FILE):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_added_songs_are_folded_into_the_next_build(tmp_path, rng):
    vectors, genre = clustered(rng, 100, 16, 3, 0.5)
    rows = write_vectors(tmp_path / "embeddings.parquet", vectors, genre)
    out = tmp_path / "index" / "m"
    build_annoy_index(tmp_path / "embeddings.parquet", out, n_trees=5)
    extra = l2_normalise(rng.standard_normal((2, 16)).astype(np.float32))
    added_rows = [{"track_id": "added/new.flac", "path": "/new.flac", "label": "", "split": "added"},
                  {"track_id": rows[0]["track_id"], "path": "/dup.wav", "label": "", "split": "added"}]  # indexed
    write_embedding_rows(added_rows, extra, added_table_path(out, META["model_key"]), metadata=META)

    figures = build_annoy_index(tmp_path / "embeddings.parquet", out, n_trees=5,
                                added=added_table_path(out, META["model_key"]))
    assert figures["count"] == 101 and figures["added"] == 1
    ids = read_ids(out)
    assert ids[-1]["track_id"] == "added/new.flac" and ids[-1]["split"] == "added"
    np.testing.assert_allclose(load_annoy(out / INDEX_FILE, 16).get_item_vector(100), extra[0], atol=1e-6)
    assert added_table_path(out, META["model_key"]).is_file()  # kept: a --rerun index removes only the index folder


def test_side_table_of_another_model_is_ignored(tmp_path, rng):
    vectors, genre = clustered(rng, 50, 16, 2, 0.5)
    write_vectors(tmp_path / "embeddings.parquet", vectors, genre)
    out = tmp_path / "index" / "m"
    write_embedding_rows([{"track_id": "x"}], vectors[:1], added_table_path(out, META["model_key"]),
                         metadata={**META, "model_key": "resnet_v2-999"})
    assert build_annoy_index(tmp_path / "embeddings.parquet", out, n_trees=2,
                             added=added_table_path(out, META["model_key"]))["count"] == 50


def test_failed_build_leaves_the_previous_index(tmp_path, rng, monkeypatch):
    vectors, genre = clustered(rng, 50, 16, 2, 0.5)
    write_vectors(tmp_path / "embeddings.parquet", vectors, genre)
    out = tmp_path / "index" / "m"
    build_annoy_index(tmp_path / "embeddings.parquet", out, n_trees=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("pipeline.index.plot_embedding_map", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        build_annoy_index(tmp_path / "embeddings.parquet", out, n_trees=7)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["m"]


def test_embeddings_roundtrip_keeps_rows_and_vectors(tmp_path, rng):
    vectors, genre = clustered(rng, 40, 8, 2, 0.5)
    rows = write_vectors(tmp_path / "e.parquet", vectors, genre)
    back_rows, back = read_embeddings(tmp_path / "e.parquet")
    assert back_rows == [{**row, **dict.fromkeys(INFO_COLUMNS)} for row in rows]  # names and tags not given: null
    assert back.dtype == np.float32 and back.shape == (40, 8)
    np.testing.assert_array_equal(back, vectors)
    assert pq.read_schema(tmp_path / "e.parquet").field("embedding").type.list_size == 8


def test_errors_are_one_line(tmp_path, rng):
    with pytest.raises(MelsearchError, match="no embeddings here") as missing:
        build_annoy_index(tmp_path / "nope.parquet", tmp_path / "index" / "m")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(MelsearchError, match="unreadable embeddings") as junk:
        build_annoy_index(tmp_path / "junk.parquet", tmp_path / "index" / "m")
    vectors, genre = clustered(rng, 10, 4, 2, 0.5)
    write_vectors(tmp_path / "e.parquet", vectors, genre)
    with pytest.raises(MelsearchError, match="n_trees"):
        build_annoy_index(tmp_path / "e.parquet", tmp_path / "index" / "m", n_trees=0)
    for exc in (missing, junk):
        assert "\n" not in str(exc.value)
    assert not (tmp_path / "index" / "m").exists()


@pytest.mark.parametrize(("count", "expected"), [
    (1, (50, 5000)), (1000, (50, 5000)), (15_000, (50, 5000)),  # the per-tree default up to ~16k items
    (20_000, (50, 5400)), (26_999, (50, 5800)), (27_000, (50, 6000)),  # 20 * k * floor(cbrt(N)), exact at cubes
    (100_000, (50, 9200)), (100_001, (25, 9200)), (1_000_000, (25, 20_000)),
])
def test_auto_index_params_by_size(count, expected):
    assert auto_index_params(count) == expected
    assert auto_index_params(count, n_trees=AUTO, search_k=AUTO, k=10) == expected


def test_explicit_index_params_are_kept(tmp_path, rng):
    assert auto_index_params(1_000_000, n_trees=10, search_k=1234) == (10, 1234)
    assert auto_index_params(1_000_000, n_trees=10) == (10, 20_000)
    assert auto_index_params(1000, n_trees=80) == (80, 8000)  # the per-tree floor follows the trees given
    assert auto_index_params(1_000_000, search_k=777) == (25, 777)
    assert IndexConfig() == IndexConfig(n_trees=AUTO, search_k=AUTO)
    assert IndexConfig(n_trees=7, search_k=99).n_trees == 7
    for bad in ({"n_trees": 0}, {"n_trees": -2}, {"search_k": -5}):
        with pytest.raises(MelsearchError):
            IndexConfig(**bad)

    vectors, genre = clustered(rng, 120, 16, 3, 0.5)
    write_vectors(tmp_path / "e.parquet", vectors, genre)
    figures = build_annoy_index(tmp_path / "e.parquet", tmp_path / "index" / "x", n_trees=3, search_k=70)
    meta = json.loads((tmp_path / "index" / "x" / META_FILE).read_text())
    assert (figures["n_trees"], figures["search_k"], meta["n_trees"], meta["search_k"]) == (3, 70, 3, 70)
    with pytest.raises(MelsearchError, match="search_k"):
        build_annoy_index(tmp_path / "e.parquet", tmp_path / "index" / "y", search_k=0)


def low_rank_clustered(rng: np.random.Generator, n: int, dim: int, *, latent: int = 16) -> np.ndarray:
    """Unit vectors with few degrees of freedom, like bench/query.py's (clusters in a latent space, ReLU)."""
    centres = 2 * rng.standard_normal((10, latent))
    mixing = rng.standard_normal((latent, dim)) / np.sqrt(latent)
    z = centres[rng.integers(0, 10, n)] + rng.standard_normal((n, latent))
    return l2_normalise((np.maximum(z @ mixing, 0) + 0.05 * np.abs(rng.standard_normal((n, dim)))).astype(np.float32))


def test_auto_sized_index_keeps_recall_at_10_on_20k_vectors_and_records_its_values(tmp_path, rng):
    vectors = low_rank_clustered(rng, 20_000, 64)
    genre = rng.integers(0, 10, len(vectors))
    write_vectors(tmp_path / "e.parquet", vectors, genre)
    out = tmp_path / "index" / "m"
    figures = build_annoy_index(tmp_path / "e.parquet", out)
    assert (figures["n_trees"], figures["search_k"]) == auto_index_params(20_000) == (50, 5400)
    assert figures["recall_at_10"] >= 0.99 and figures["recall_queries"] == 500
    # the query helper asks effective_search_k with the recorded values: it gets what the figures measured
    meta = json.loads((out / META_FILE).read_text())
    assert (meta["n_trees"], meta["search_k"]) == (50, 5400)
    assert effective_search_k(meta["search_k"], meta["n_trees"], 11) == 5400
