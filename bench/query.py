"""Benchmark: Annoy against exact (numpy) search, and the end-to-end latency of a query by audio file.

For each size and dimension, synthetic clustered vectors of the model's dimension (low intrinsic dimension and
non-negative, like the models' softplus / ReLU embeddings; unit norm) are indexed with
:func:`pipeline.index.build_annoy` (Annoy's on-disk build) and the index stage's defaults (n_trees and
search_k -1: sized by :func:`pipeline.index.auto_index_params`); held-out vectors of the same clusters are the
queries. It reports build time, the file's size, p50/p95 of Annoy's ``get_nns_by_vector`` (one query at a time,
as the query helper runs, after a few warm-up queries) and recall@10 against exact search, which runs on all
queries at once in blocks (:func:`pipeline.index.exact_neighbours`) so 1M vectors need no more than their own
array; the exact search's own p50/p95 is timed on ``--exact-timed`` single queries. The load average is printed
with each size, since the figures are only as quiet as the machine.

With ``--workdir`` (a work directory with a built index) it also times ``MusicSearch.query`` on audio files
of the index (decode, log-mel, model, search; the model is loaded before the clock starts) and by track id.
Prints figures, asserts nothing.

    python bench/query.py                                             # 10k and 100k vectors, 512-d
    python bench/query.py --sizes 10000,100000,1000000 --dim 512,200  # the README table (1M x 512: 4.2 GB)
    python bench/query.py --sizes "" --workdir data/work
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

from pipeline.index import auto_index_params, build_annoy, exact_neighbours, read_ids  # noqa: E402
from pipeline.vectors import l2_normalise  # noqa: E402

_CHUNK = 50_000  # vectors generated per step (bounded memory while filling the array)
_WARM_UP = 20  # queries run before the clock starts


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


def bench_vectors(size: int, dim: int, args: argparse.Namespace, tmp: Path) -> None:
    started = time.perf_counter()
    shape = {"latent": args.latent_dim, "clusters": args.clusters, "spread": args.spread}
    vectors = clustered_vectors(size, dim, seed=0, **shape)
    queries = clustered_vectors(args.queries + _WARM_UP, dim, seed=1, **shape)
    warm_up, queries = queries[:_WARM_UP], queries[_WARM_UP:]
    exact, _ = exact_neighbours(vectors, queries, args.top_k)  # blocks of queries: memory stays at (block, N)
    made = time.perf_counter() - started
    n_trees, search_k = auto_index_params(size, n_trees=args.n_trees, search_k=args.search_k, k=args.top_k)
    path = tmp / f"bench-{size}-{dim}.ann"
    load = os.getloadavg()[0]
    started = time.perf_counter()
    index = build_annoy(vectors, path, n_trees=n_trees, n_jobs=-1)
    built = time.perf_counter() - started
    size_mib = path.stat().st_size / 2**20

    for query in warm_up:  # first touches of the freshly written file's pages are not what a server sees
        index.get_nns_by_vector(query, args.top_k, search_k=search_k)
    annoy_s, found = [], 0
    for query, truth in zip(queries, exact, strict=True):
        t0 = time.perf_counter()
        approx = index.get_nns_by_vector(query, args.top_k, search_k=search_k)
        annoy_s.append(time.perf_counter() - t0)
        found += len(set(approx) & set(truth.tolist()))
    exact_s = []
    for query in queries[: args.exact_timed]:
        t0 = time.perf_counter()
        exact_neighbours(vectors, query[None], args.top_k)
        exact_s.append(time.perf_counter() - t0)
    index.unload()
    os.remove(path)
    print(f"{size:>9,} x {dim}  load {load:.1f}  vectors+exact {made:6.1f} s  build {built:7.1f} s  "
          f"n_trees {n_trees}  search_k {search_k}  {size_mib:,.0f} MiB")
    print(f"{'':>11}annoy  {_percentiles_ms(annoy_s)}   recall@{args.top_k} {found / exact.size:.4f} "
          f"({len(queries)} queries)")
    if exact_s:
        print(f"{'':>11}exact  {_percentiles_ms(exact_s)}   ({len(exact_s)} queries)")


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
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated index sizes (add 1000000 for 1M)")
    parser.add_argument("--dim", default="512", help="comma-separated vector dimensions (cifar10: 512, "
                        "resnet_v2: 128, musicnn: 200)")
    parser.add_argument("--queries", type=int, default=500, help="held-out queries for latency and recall")
    parser.add_argument("--exact-timed", type=int, default=20, help="of them, timed with exact search too")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--n-trees", type=int, default=-1, help="-1: the index stage's rule for the size")
    parser.add_argument("--search-k", type=int, default=-1, help="-1: the index stage's rule for the size")
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--latent-dim", type=int, default=16, help="degrees of freedom of the synthetic vectors")
    parser.add_argument("--spread", type=float, default=1.0, help="cluster width in the latent space (centres ~2)")
    parser.add_argument("--workdir", help="a work directory with a built index: also time queries by audio file")
    parser.add_argument("--files", type=int, default=30, help="audio files to query end to end")
    args = parser.parse_args()

    import torch

    print(f"CPU: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="bench-query-") as tmp:
        for dim in (int(d) for d in args.dim.split(",") if d):
            for size in (int(s) for s in args.sizes.split(",") if s):
                bench_vectors(size, dim, args, Path(tmp))
    if args.workdir:
        bench_end_to_end(args)


if __name__ == "__main__":
    main()
