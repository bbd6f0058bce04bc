"""Search speed: the faiss IVF index of `itr search` against exact top-k, same run, same gallery and queries.

100,000 random 512-d embeddings (L2-normalised), drawn around 1,000 random directions: embeddings of a real
collection cluster (captions and images of similar scenes lie close together). With isotropic i.i.d. vectors every
point is about as far from a query as every other, so no index can find "nearest" neighbours faster than a scan
(`--iid` shows it: recall@10 collapses). Queries are drawn the same way and answered one at a time, as `itr search`
and `itr serve` answer them; both paths are `pipeline.search`'s own (`exact_top_k`: one matrix-vector product and a
top-k in torch; `build_index` + `index_top_k`: faiss `IndexIVFFlat` with 4 sqrt(N) lists, probing 1/64 of them).
Prints the build time, queries/s of each and recall@10 of the index against exact search; last, the speed ratio.

    .venv/bin/python benchmarks/search.py [--size 100000] [--dim 512] [--queries 300] [--iid]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from pipeline.search import build_index, exact_top_k, index_top_k, normalise

K = 10


def embeddings(n: int, dim: int, centres: int, rng: np.random.Generator, centre_vectors: np.ndarray | None,
               iid: bool) -> np.ndarray:
    """Returns `n` L2-normalised (n, dim) float32 rows: around `centre_vectors` (noise of twice a centre's norm),
    or i.i.d. Gaussian with `iid`."""
    noise = rng.standard_normal((n, dim), dtype=np.float32)
    if iid:
        return normalise(noise)
    which = rng.integers(0, centres, n)
    return normalise(centre_vectors[which] + 2.0 * noise / np.sqrt(dim))


def per_query(search, queries: np.ndarray) -> tuple[np.ndarray, float]:
    """Returns (rows (Q, K), queries per second) answering the queries one at a time."""
    rows = []
    t0 = time.perf_counter()
    for q in queries:
        rows.append(search(q[None, :])[1][0])
    return np.stack(rows), len(queries) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--centres", type=int, default=1000)
    parser.add_argument("--iid", action="store_true", help="i.i.d. Gaussian vectors: no neighbourhood structure")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    centre_vectors = rng.standard_normal((args.centres, args.dim), dtype=np.float32) / np.sqrt(args.dim)
    gallery = embeddings(args.size, args.dim, args.centres, rng, centre_vectors, args.iid)
    queries = embeddings(args.queries + 20, args.dim, args.centres, rng, centre_vectors, args.iid)
    warm, queries = queries[:20], queries[20:]
    print(f"gallery {args.size} x {args.dim} ({'i.i.d.' if args.iid else f'{args.centres} clusters'}), "
          f"{len(queries)} queries one at a time, top {K}")

    t0 = time.perf_counter()
    index = build_index(gallery)
    build_s = time.perf_counter() - t0
    print(f"faiss IVF index: {index.nlist} lists, probing {index.nprobe}, built in {build_s:.1f} s")

    def exact(q):
        return exact_top_k(gallery, q, K)

    def indexed(q):
        return index_top_k(index, q, K)

    for search in (exact, indexed):  # warm-up: first-call allocations, thread pools
        per_query(search, warm)
    exact_rows, exact_qps = per_query(exact, queries)
    index_rows, index_qps = per_query(indexed, queries)
    recall = float(np.mean([len(set(a) & set(e)) / K for a, e in zip(index_rows, exact_rows)]))
    print(f"exact top-k  {exact_qps:9.1f} queries/s")
    print(f"faiss IVF    {index_qps:9.1f} queries/s")
    print(f"speedup {index_qps / exact_qps:.1f} (target >= 5); recall@{K} {recall:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
