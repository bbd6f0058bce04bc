"""Evaluation speed: our protocol vs the classic per-query numpy argsort evaluation, same run.

COCO-5K-sized random embeddings (5,000 images x 25,000 captions, d=1024, 5 captions per image). The
classic implementation is the VSE++ `i2t`/`t2i` loop (one matrix-vector product and one argsort per
query). Each runs in a fresh process after an untimed warm-up on 100 images. Both must give identical
ranks; the script prints each one's seconds and peak RSS, and last the speed ratio (target >= 20x).

    .venv/bin/python benchmarks/eval.py [--images 5000] [--dim 1024]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import numpy as np
import torch

from pipeline.eval.metrics import recall_metrics, retrieval_ranks

PER_IMAGE = 5
NOISE = 8.0  # caption = image + noise: R@1 well below 100, so the ranks carry information


def make_embeddings(n_images: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Returns L2-normalised float32 (N, dim) images and (5N, dim) captions, caption j of image j // 5."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n_images, dim), dtype=np.float32)
    captions = np.repeat(images, PER_IMAGE, axis=0) + NOISE * rng.standard_normal((n_images * PER_IMAGE, dim),
                                                                                 dtype=np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    return images, captions


def classic(images: np.ndarray, captions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The VSE++ evaluation loops: per image, rank of its best caption; per caption, rank of its image."""
    n = len(images)
    i2t = np.zeros(n, dtype=np.int64)
    for index in range(n):
        order = np.argsort(images[index] @ captions.T)[::-1]
        i2t[index] = min(np.where(order == i)[0][0] for i in range(PER_IMAGE * index, PER_IMAGE * index + PER_IMAGE))
    t2i = np.zeros(n * PER_IMAGE, dtype=np.int64)
    for index in range(n):
        scores = captions[PER_IMAGE * index:PER_IMAGE * index + PER_IMAGE] @ images.T
        for i in range(PER_IMAGE):
            t2i[PER_IMAGE * index + i] = np.where(np.argsort(scores[i])[::-1] == index)[0][0]
    return i2t, t2i


def ours(images: np.ndarray, captions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pipeline.eval: chunked matrix products with bounded memory."""
    owner = np.repeat(np.arange(len(images)), PER_IMAGE)
    return retrieval_ranks(torch.from_numpy(images), torch.from_numpy(captions), owner)


def _child(name: str, n_images: int, dim: int, queue) -> None:
    images, captions = make_embeddings(n_images, dim)
    fn = {"ours": ours, "classic": classic}[name]
    fn(images[:100], captions[:500])  # warm-up (thread pools, kernel selection), not timed, for both
    t0 = time.perf_counter()
    ranks = fn(images, captions)
    seconds = time.perf_counter() - t0
    queue.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, ranks))


def measure(name: str, n_images: int, dim: int) -> tuple[float, float, tuple]:
    """Runs one implementation in a fresh process; returns (seconds, peak RSS MiB, ranks)."""
    queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_child, args=(name, n_images, dim, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=1024)
    args = parser.parse_args()
    ours_s, ours_mb, ours_ranks = measure("ours", args.images, args.dim)
    print(f"ours     {ours_s:8.2f} s   peak RSS {ours_mb:7.0f} MiB")
    classic_s, classic_mb, classic_ranks = measure("classic", args.images, args.dim)
    print(f"classic  {classic_s:8.2f} s   peak RSS {classic_mb:7.0f} MiB")
    same = all(np.array_equal(a, b) for a, b in zip(ours_ranks, classic_ranks))
    m = recall_metrics(*ours_ranks)
    print(f"identical ranks: {same}   (t2i R@1 {m['t2i_R@1']:.2f}, i2t R@1 {m['i2t_R@1']:.2f}, rsum {m['rsum']:.2f})")
    if not same:
        raise SystemExit("ranks differ")
    print(f"ratio {classic_s / ours_s:.1f}x (target >= 20)")


if __name__ == "__main__":
    main()
