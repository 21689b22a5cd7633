"""Benchmark: Annoy against exact (numpy) search, and the end-to-end latency of a query by audio file.

For each size, synthetic clustered vectors of the model's dimension (low intrinsic dimension and
non-negative, like the models' softplus / ReLU embeddings; unit norm) are indexed with
:func:`pipeline.index.build_annoy` and the index stage's defaults (50 trees, search_k -1); held-out vectors
of the same clusters are the queries. Per query it times Annoy's ``get_nns_by_vector`` and
:func:`pipeline.index.exact_neighbours` (one query at a time, as the query helper runs), and reports
p50/p95 latency and Annoy's recall@10 against the exact answer.

With ``--workdir`` (a work directory with a built index) it also times ``MusicSearch.query`` on audio files
of the index (decode, log-mel, model, search; the model is loaded before the clock starts) and by track id.
Prints figures, asserts nothing.

    python bench/query.py                          # 1k and 100k vectors, 512-d
    python bench/query.py --sizes 1000,100000,1000000 --workdir data/work
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.index import build_annoy, effective_search_k, exact_neighbours, read_ids  # noqa: E402
from pipeline.vectors import l2_normalise  # noqa: E402

_CHUNK = 50_000  # vectors generated per step (bounded memory while filling the array)


def clustered_vectors(n: int, dim: int, *, latent: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """(n, dim) float32 unit vectors like a network's embeddings: few degrees of freedom, non-negative.

    Gaussian clusters in a ``latent``-dimensional space, mapped by one fixed random (latent, dim) matrix,
    then ReLU, plus 0.05 of non-negative noise in every dimension. (Clusters with full-dimensional noise
    would have no near neighbours to find: every approximate method fails on them, as on random data.)
    """
    rng, fixed = np.random.default_rng(seed), np.random.default_rng(12345)
    centres = 2 * fixed.standard_normal((clusters, latent), dtype=np.float32)
    mixing = fixed.standard_normal((latent, dim), dtype=np.float32) / np.sqrt(latent)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        z = centres[rng.integers(0, clusters, m)] + spread * rng.standard_normal((m, latent), dtype=np.float32)
        noise = np.abs(rng.standard_normal((m, dim), dtype=np.float32))
        out[start : start + m] = l2_normalise(np.maximum(z @ mixing, 0) + 0.05 * noise)
    return out


def _percentiles_ms(seconds: list[float]) -> str:
    p50, p95 = np.percentile(np.asarray(seconds) * 1e3, [50, 95])
    return f"p50 {p50:8.3f} ms  p95 {p95:8.3f} ms"


def bench_vectors(size: int, args: argparse.Namespace, tmp: Path) -> None:
    started = time.perf_counter()
    shape = {"latent": args.latent_dim, "clusters": args.clusters, "spread": args.spread}
    vectors = clustered_vectors(size, args.dim, seed=0, **shape)
    queries = clustered_vectors(args.queries, args.dim, seed=1, **shape)
    made = time.perf_counter() - started
    started = time.perf_counter()
    index = build_annoy(vectors, tmp / f"bench-{size}.ann", n_trees=args.n_trees, n_jobs=-1)
    built = time.perf_counter() - started
    size_mib = (tmp / f"bench-{size}.ann").stat().st_size / 2**20
    search_k = effective_search_k(args.search_k, args.n_trees, args.top_k)

    annoy_s, exact_s, found = [], [], 0
    for query in queries:
        t0 = time.perf_counter()
        approx = index.get_nns_by_vector(query, args.top_k, search_k=search_k)
        t1 = time.perf_counter()
        exact, _ = exact_neighbours(vectors, query[None], args.top_k)
        t2 = time.perf_counter()
        annoy_s.append(t1 - t0)
        exact_s.append(t2 - t1)
        found += len(set(approx) & set(exact[0].tolist()))
    index.unload()
    os.remove(tmp / f"bench-{size}.ann")
    print(f"{size:>9,} x {args.dim}  vectors {made:6.1f} s  build {built:7.1f} s ({args.n_trees} trees, "
          f"{size_mib:,.0f} MiB)  search_k {search_k}")
    print(f"{'':>11}annoy  {_percentiles_ms(annoy_s)}   recall@{args.top_k} {found / (args.top_k * len(queries)):.4f}")
    print(f"{'':>11}exact  {_percentiles_ms(exact_s)}")


def bench_end_to_end(args: argparse.Namespace) -> None:
    from pipeline.query import MusicSearch

    search = MusicSearch.load(args.workdir)
    started = time.perf_counter()
    search.classifier  # noqa: B018 (load the model before the clock starts)
    loaded = time.perf_counter() - started
    items = read_ids(search.index_dir)
    paths = [Path(row["path"]) for row in items if Path(row["path"]).is_file()][: args.files]
    search.query_file(paths[0], top_k=args.top_k)  # warm-up: first forward pass, page cache
    by_file, by_track = [], []
    for path, row in zip(paths, items, strict=False):
        t0 = time.perf_counter()
        search.query_file(path, top_k=args.top_k)
        t1 = time.perf_counter()
        search.query_track(row["track_id"], top_k=args.top_k)
        t2 = time.perf_counter()
        by_file.append(t1 - t0)
        by_track.append(t2 - t1)
    print(f"end to end: index {search.index_dir} ({len(items)} tracks, {search.meta['dim']}-d, "
          f"model {search.meta['model_key']} loaded in {loaded:.2f} s), {len(paths)} files")
    print(f"  query by audio file  {_percentiles_ms(by_file)}")
    print(f"  query by track id    {_percentiles_ms(by_track)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,100000", help="comma-separated index sizes (add 1000000 for 1M)")
    parser.add_argument("--dim", type=int, default=512, help="vector dimension (cifar10: 512, resnet_v2: 128)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--n-trees", type=int, default=50)
    parser.add_argument("--search-k", type=int, default=-1)
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--latent-dim", type=int, default=16, help="degrees of freedom of the synthetic vectors")
    parser.add_argument("--spread", type=float, default=1.0, help="cluster width in the latent space (centres ~2)")
    parser.add_argument("--workdir", help="a work directory with a built index: also time queries by audio file")
    parser.add_argument("--files", type=int, default=30, help="audio files to query end to end")
    args = parser.parse_args()

    import torch

    print(f"CPU: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="bench-query-") as tmp:
        for size in (int(s) for s in args.sizes.split(",") if s):
            bench_vectors(size, args, Path(tmp))
    if args.workdir:
        bench_end_to_end(args)


if __name__ == "__main__":
    main()
