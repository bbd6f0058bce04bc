"""Two-stage retrieval (TGDT): global top-k then local rescoring of the candidates, against full local scoring of
every pair, same run, same model, same queries.

Gallery: COCO-5K-sized, synthetic: 5,000 images of 36 regions (with boxes) and 25,000 captions (5 per image) of
up to 32 tokens ([SOT], words, [EOT]). Each image holds a few "concepts" (random prototypes in region space); a
region is one of them plus noise; a caption's words name some of its image's concepts (the prototype mapped into
token space by a fixed random linear map, plus noise) mixed with filler words. A TGDT model is briefly trained on
a separate train split of the same generator (phase `local`, then phase `cmc`, through the engine's `train_step`;
by default every epoch's hinges sum over the negatives: in a brief training from scratch the hardest-negative hinge
left the global space weak, candidate recall 47% at k = 50 after 6 `cmc` epochs, and the benchmark is about
inference, not the training recipe).

Both sides start from the same encoded gallery (`TGDT.split_tokens`: every image's and caption's global embedding
and local tokens, encoded once; its seconds are printed apart and counted on neither side):
- two-stage: the engine's `two_stage_ranks` (global scores over the gallery, top-k: 50 for i2t, 100 for t2i,
  `TGDT.rerank` of the candidates by S_loc + S_glob);
- full local: S_loc + S_glob of every gallery item, scored directly over the float32 gallery tokens in blocks
  (`pipeline.nn.matching.grouped_local_scores`, no candidate gather), ranked as `retrieval_ranks` does.
Full scoring costs ~(gallery / k) times more, so it is timed on a random sample of queries per direction
(`--sample`); two-stage runs on the same queries (and, for its per-query time, on every query too).

Last line: `speedup X (target >= 10); r1 ratio Y (target >= 0.99)`, X = per-query seconds of full local / two-stage
(both directions together), Y = two-stage R@1 / full-local R@1 over the same sampled queries (both directions).

    .venv/bin/python benchmarks/two_stage.py [--images 5000] [--train-images 2000] [--sample 100] [--epochs 16] [--local-epochs 1]
    .venv/bin/python benchmarks/two_stage.py --all-queries     # two-stage over every query too (its time and R@1)
    .venv/bin/python benchmarks/two_stage.py --embed-dim 1024 --ffn-dim 2048 --lower-layers 2 --top-layers 2
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.eval.metrics import positive_index, two_stage_ranks
from pipeline.methods import create_method
from pipeline.nn.matching import grouped_local_scores
from pipeline.train.inputs import FeatureInputs, method_caps
from pipeline.train.loop import apply_phase, epoch_batches, new_optimizer, phases_of, train_step

PER_IMAGE = 5
REGIONS = 36
MAX_TOKENS = 32
FULL_BLOCK_ELEMENTS = 1 << 24  # gallery token values scored at once by the full scorer


# ---------------------------------------------------------------------------------------------- the data
@dataclasses.dataclass
class World:
    """The generator's fixed parts: region-space concept prototypes, the map into token space, filler words and
    the [SOT] / [EOT] vectors."""

    concepts: np.ndarray  # (C, region_width)
    to_text: np.ndarray  # (region_width, token_width)
    fillers: np.ndarray  # (F, token_width)
    sot: np.ndarray
    eot: np.ndarray


def make_world(concepts: int, region_width: int, token_width: int, rng: np.random.Generator) -> World:
    proto = rng.standard_normal((concepts, region_width)).astype(np.float32)
    # a random rotation (well conditioned: the words carry their concept as clearly as the regions do)
    q, _ = np.linalg.qr(rng.standard_normal((max(region_width, token_width), max(region_width, token_width))))
    to_text = q[:region_width, :token_width].astype(np.float32)
    fillers, sot, eot = (rng.standard_normal(shape).astype(np.float32) for shape in
                         ((20, token_width), token_width, token_width))
    return World(proto, to_text, fillers, sot, eot)


class FlatSplit:
    """An in-memory split with the `ColumnarSplit` interface `FeatureInputs` reads: fixed-size padded arrays with
    counts, handed out as (flat rows, counts) for ragged columns."""

    def __init__(self, regions, boxes, tokens, lengths, caption_image):
        self.arrays = {("images", "roi_feats"): (regions, np.full(len(regions), REGIONS)),
                       ("images", "roi_boxes"): (boxes, np.full(len(regions), REGIONS)),
                       ("captions", "text_tokens"): (tokens, lengths)}
        self.caption_image = caption_image
        self.num_images, self.num_captions = len(regions), len(tokens)
        self.keys = [f"{i:06d}" for i in range(self.num_images)]
        self.labels = [[] for _ in self.keys]

    def take(self, table: str, column: str, rows: np.ndarray):
        values, counts = self.arrays[(table, column)]
        n = counts[rows]
        keep = np.arange(values.shape[1])[None, :] < n[:, None]
        return values[rows][keep], n

    def caption_text(self, rows):
        return ["" for _ in rows]

    def row_index(self, keys):
        return np.array([int(k) for k in keys], dtype=np.int64)


def make_split(world: World, images: int, rng: np.random.Generator, per_image_concepts: int = 8,
               region_noise: float = 0.8, word_noise: float = 0.8, filler_rate: float = 0.3) -> FlatSplit:
    """Returns a split of `images` images (36 regions each) and 5 captions per image (6..30 words)."""
    c, width = world.concepts.shape
    owned = np.stack([rng.choice(c, per_image_concepts, replace=False) for _ in range(images)])  # (N, K)
    which = rng.integers(0, per_image_concepts, (images, REGIONS))
    which[:, :per_image_concepts] = np.arange(per_image_concepts)  # every concept has a region
    concept = np.take_along_axis(owned, which, 1)
    noise = rng.standard_normal((images, REGIONS, width), dtype=np.float32)
    regions = (world.concepts[concept] + region_noise * noise).astype(np.float16)
    corner = rng.random((images, REGIONS, 2)) * 0.7
    boxes = np.concatenate([corner, corner + 0.05 + 0.25 * rng.random((images, REGIONS, 2))], -1).astype(np.float32)
    m = images * PER_IMAGE
    caption_image = np.repeat(np.arange(images), PER_IMAGE)
    lengths = rng.integers(6, MAX_TOKENS - 1, m) + 2  # [SOT] + 6..29 words + [EOT]
    text_concepts = world.concepts @ world.to_text  # (C, token_width)
    tokens = np.zeros((m, MAX_TOKENS, text_concepts.shape[1]), dtype=np.float16)
    for s in range(0, m, 5000):  # bounded memory
        rows = np.arange(s, min(s + 5000, m))
        mentioned = np.take_along_axis(owned[caption_image[rows]],
                                       rng.integers(0, per_image_concepts, (len(rows), MAX_TOKENS)), 1)
        filler = rng.random((len(rows), MAX_TOKENS)) < filler_rate
        body = np.where(filler[..., None], world.fillers[rng.integers(0, len(world.fillers), filler.shape)],
                        text_concepts[mentioned])
        body += word_noise * rng.standard_normal(body.shape, dtype=np.float32)
        body[:, 0] = world.sot
        body[np.arange(len(rows)), lengths[rows] - 1] = world.eot
        body[np.arange(MAX_TOKENS)[None, :] >= lengths[rows][:, None]] = 0
        tokens[rows] = body
    return FlatSplit(regions, boxes, tokens, lengths, caption_image)


def inputs_of(method, split: FlatSplit) -> FeatureInputs:
    cls = type(method)
    return FeatureInputs(cls.columns(method.args), split, None, method_caps(cls, method.args))


# ---------------------------------------------------------------------------------------------- training
def train(method, split: FlatSplit, epochs: int, batch_size: int, lr: float) -> float:
    """Trains the method in place, phase `local` then phase `cmc` (the method's `local_epochs`, default half of the
    epochs, then the rest); returns seconds."""
    t0 = time.perf_counter()
    inputs = inputs_of(method, split)
    tc = dataclasses.asdict(TrainConfig(batch_size=batch_size, lr=lr, weight_decay=0.0, warmup_steps=20,
                                        grad_clip=2.0, epochs=max(2, epochs)))
    steps = split.num_captions // batch_size
    cpu, state, epoch = torch.device("cpu"), method.new_state(), 0
    for phase in phases_of(method, tc):
        apply_phase(method, phase)
        optimizer, scheduler = new_optimizer(method, phase, tc, steps)
        for _ in range(phase.epochs):
            method.train()
            method.on_epoch_start(epoch, inputs, state)  # as the engine: counts the epochs of the hinges' warm-up
            losses = [train_step(method, method, state, optimizer, scheduler, inputs.batch(rows), tc, "fp32", cpu)
                      ["loss"] for rows in epoch_batches(split.num_captions, batch_size, 0, epoch, 0, 1)]
            print(f"train epoch {epoch + 1} ({phase.name}): loss {np.mean(losses):.3f}", flush=True)
            epoch += 1
    method.eval()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- full scoring
@torch.no_grad()
def full_ranks(method, cache: dict, direction: str, query_rows: torch.Tensor, positives: torch.Tensor) -> np.ndarray:
    """Returns (q,) ranks by S_loc + w S_glob over every gallery item, scored directly over the float32 gallery
    tokens in blocks; ranks count the non-positives scoring >= the best positive (ties against the model)."""
    a = method.args
    queries, gallery = (cache["images"], cache["captions"]) if direction == "i2t" else (cache["captions"],
                                                                                        cache["images"])
    g_tok, g_mask, g_glob = gallery["tokens"].float(), gallery["mask"], gallery["glob"]
    block = max(1, FULL_BLOCK_ELEMENTS // (g_tok.shape[1] * g_tok.shape[2]))
    out = []
    for q in query_rows.tolist():
        q_tok, q_mask = queries["tokens"][q].float()[None, None], queries["mask"][q][None, None]
        scores = torch.empty(len(g_tok))
        for s in range(0, len(g_tok), block):
            t, m = g_tok[None, s:s + block], g_mask[None, s:s + block]
            local = (grouped_local_scores(q_tok, q_mask, t, m, a.local_pool)[0, 0] if direction == "i2t"
                     else grouped_local_scores(t, m, q_tok, q_mask, a.local_pool)[0, :, 0])
            glob = g_glob[s:s + block] @ queries["glob"][q]
            scores[s:s + block] = a.local_scale * local + a.rerank_global_weight * glob
        out.append(scores)
    scores = torch.stack(out)
    pos = positives.clamp(min=0)
    best = scores.gather(1, pos).masked_fill(positives < 0, float("-inf")).max(1, keepdim=True).values
    is_pos = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, pos, positives >= 0)
    return ((scores >= best) & ~is_pos).sum(1).numpy()


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="gallery images (x5 captions)")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--sample", type=int, default=100, help="queries per direction scored both ways")
    parser.add_argument("--epochs", type=int, default=16, help="training epochs (phase local, then phase cmc)")
    parser.add_argument("--local-epochs", type=int, default=1, help="epochs of phase local (its loss is ~0 after one)")
    parser.add_argument("--mean-negative-epochs", type=int, default=100,
                        help="epochs of each phase whose hinges sum over the negatives (default: all of them: a brief "
                             "training from scratch learns a usable global space only on the sum)")
    parser.add_argument("--local-weight", type=float, default=0.02, help="weight of the local terms (as tgdt-synth)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--region-width", type=int, default=256)
    parser.add_argument("--token-width", type=int, default=256)
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--ffn-dim", type=int, default=512)
    parser.add_argument("--lower-layers", type=int, default=1)
    parser.add_argument("--top-layers", type=int, default=1)
    parser.add_argument("--concepts", type=int, default=1000)
    parser.add_argument("--k-i2t", type=int, default=50)
    parser.add_argument("--k-t2i", type=int, default=100)
    parser.add_argument("--all-queries", action="store_true", help="also run two-stage over every query")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    opt = parser.parse_args()
    if opt.threads:
        torch.set_num_threads(opt.threads)

    rng = np.random.default_rng(0)
    world = make_world(opt.concepts, opt.region_width, opt.token_width, rng)
    train_split, gallery = make_split(world, opt.train_images, rng), make_split(world, opt.images, rng)
    torch.manual_seed(0)
    method = create_method("tgdt", {"embed_dim": opt.embed_dim, "ffn_dim": opt.ffn_dim, "region_layers": 1,
                                    "lower_layers": opt.lower_layers, "top_layers": opt.top_layers,
                                    "max_regions": REGIONS, "max_tokens": MAX_TOKENS,
                                    "local_weight": opt.local_weight, "local_epochs": opt.local_epochs,
                                    "mean_negative_epochs": opt.mean_negative_epochs},
                           {"regions": opt.region_width, "boxes": 4, "tokens": opt.token_width})
    seconds = train(method, train_split, opt.epochs, opt.batch_size, opt.lr)
    print(f"trained on {train_split.num_captions} captions in {seconds:.1f} s")

    inputs = inputs_of(method, gallery)
    t0 = time.perf_counter()
    cache = method.split_tokens(inputs)
    print(f"gallery: {gallery.num_images} images x {REGIONS} regions, {gallery.num_captions} captions of up to "
          f"{MAX_TOKENS} tokens, E = {opt.embed_dim}; encoded once in {time.perf_counter() - t0:.1f} s (on neither "
          "side)")
    img, txt = cache["images"]["glob"], cache["captions"]["glob"]
    i2t_pos, t2i_pos = positive_index(gallery.caption_image, gallery.num_images)
    g = torch.Generator().manual_seed(1)
    totals = {"two": 0.0, "full": 0.0, "queries": 0, "hits_two": 0, "hits_full": 0}
    for direction, queries, items, positives, k in (("i2t", img, txt, i2t_pos, opt.k_i2t),
                                                    ("t2i", txt, img, t2i_pos, opt.k_t2i)):
        sample = torch.randperm(len(queries), generator=g)[:opt.sample]

        def rerank(rows, candidates, d=direction, rows_of=sample):
            return method.rerank(inputs, d, rows_of[rows], candidates)

        t0 = time.perf_counter()
        two = two_stage_ranks(queries[sample], items, positives[sample], k, rerank)
        two_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        full = full_ranks(method, cache, direction, sample, positives[sample])
        full_seconds = time.perf_counter() - t0
        n = len(sample)
        print(f"{direction}: {n} sampled queries, k = {k}: two-stage {1e3 * two_seconds / n:.2f} ms/query, R@1 "
              f"{100 * np.mean(two < 1):.1f}, candidate recall {100 * np.mean(two < k):.1f}% | full local "
              f"{1e3 * full_seconds / n:.1f} ms/query, R@1 {100 * np.mean(full < 1):.1f}", flush=True)
        if opt.all_queries:
            t0 = time.perf_counter()
            every = two_stage_ranks(queries, items, positives, k,
                                    lambda rows, cand, d=direction: method.rerank(inputs, d, rows, cand))
            seconds = time.perf_counter() - t0
            print(f"{direction}: all {len(queries)} queries two-stage: {1e3 * seconds / len(queries):.2f} ms/query, "
                  f"R@1 {100 * np.mean(every < 1):.1f}, candidate recall {100 * np.mean(every < k):.1f}%", flush=True)
        totals["two"] += two_seconds
        totals["full"] += full_seconds
        totals["queries"] += n
        totals["hits_two"] += int((two < 1).sum())
        totals["hits_full"] += int((full < 1).sum())
    speedup = totals["full"] / max(totals["two"], 1e-9)
    ratio = totals["hits_two"] / max(totals["hits_full"], 1)
    print(f"speedup {speedup:.1f} (target >= 10); r1 ratio {ratio:.3f} (target >= 0.99)")


if __name__ == "__main__":
    main()
