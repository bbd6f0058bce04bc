"""`itr search CONFIG "query text" [--k 10] [--image PATH]`: text -> images and image -> captions over one split of
the collection, with the trained method of the config (or `--frozen`: the extractor's own embeddings).

    itr search jobs/configs/demo.yaml "a red circle left of a blue square"
    itr search jobs/configs/demo.yaml --image photo.jpg --k 5          image -> captions
    itr search jobs/configs/demo.yaml "two shapes" --frozen             the frozen features, for comparison

How a query is answered:
1. `locate` finds the model trained with this config (the latest finished eval, else train, run of the config's
   experiment whose train and features parameters are the config's) and the stage outputs it read.
2. The query goes through the extractor the store was made with (same model, weights and precision), which
   gives it the same columns as a stored caption or image; the method's `encode_text` / `encode_image` embeds
   it. A method on shards (`clip_finetune`) tokenises / preprocesses it itself.
3. The gallery (the split's images for a text query, its captions for an image query) is embedded once and
   cached under `<workdir>/search/<fingerprint of (store selection, model, split)>/`.
4. Top-k by cosine similarity: exact (one matrix product) up to `EXACT_MAX` gallery rows, else through a faiss
   IVF index built once and cached next to the embeddings (`benchmarks/search.py` measures its recall against
   exact search). A method with a two-stage `rerank` rescores the global top `eval.rerank_k` candidates.
"""
from __future__ import annotations

import argparse
import ast
import io
import sys
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.features.columnar import SplitSizes

EXACT_MAX = 50_000  # galleries up to this many rows are searched exactly, larger ones through a faiss index
IVF_PROBE_FRACTION = 1 / 64  # lists an IVF search visits (at least 8)
CACHE_VERSION = 1  # part of the embedding cache's fingerprint
SOURCE_STAGES = {"extract": "extract", "import": "extract", "shard": "shard"}  # stage tag -> role in eval's sources


# ------------------------------------------------------------------------------------------------ top-k
def normalise(x) -> np.ndarray:
    """Returns the rows of `x` (N, D) (numpy or torch) L2-normalised, as float32 numpy."""
    import torch

    t = torch.as_tensor(np.asarray(x, dtype=np.float32) if not torch.is_tensor(x) else x.float())
    return torch.nn.functional.normalize(t, dim=-1).numpy()


def exact_top_k(gallery: np.ndarray, queries: np.ndarray, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Returns (scores (Q, k), rows (Q, k)) of the `k` gallery rows (N, D) with the highest inner product with
    each query (Q, D), best first; queries are scored `chunk` at a time (memory: chunk x N floats)."""
    import torch

    g = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32))
    k = min(k, len(gallery))
    scores, rows = [], []
    for start in range(0, len(queries), chunk):
        q = torch.from_numpy(np.ascontiguousarray(queries[start:start + chunk], dtype=np.float32))
        top = torch.topk(q @ g.T, k, dim=1)
        scores.append(top.values.numpy())
        rows.append(top.indices.numpy())
    return np.concatenate(scores), np.concatenate(rows)


def build_index(gallery: np.ndarray, nlist: int | None = None, seed: int = 0):
    """Returns a faiss inverted-file index (exact inner products within the visited lists) over the gallery rows
    (N, D) float32: `nlist` k-means lists (default 4 sqrt(N)), trained (10 k-means iterations) on at most 40 rows a
    list, probing `max(8, nlist * IVF_PROBE_FRACTION)` lists per query."""
    import faiss

    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    n, d = gallery.shape
    nlist = max(1, min(nlist or int(4 * np.sqrt(n)), n // 39 or 1))  # faiss wants >= 39 training rows a list
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train = gallery if n <= 40 * nlist else gallery[np.sort(rng.choice(n, 40 * nlist, replace=False))]
    index.cp.seed, index.cp.niter = seed, 10
    index.train(train)
    index.add(gallery)
    index.nprobe = min(nlist, max(8, int(nlist * IVF_PROBE_FRACTION)))
    return index


def index_top_k(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (scores (Q, k), rows (Q, k)) of a faiss index search, best first (rows of -1 when fewer found)."""
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, index.ntotal))
    return scores, rows


# ------------------------------------------------------------------------------------------------ query rows
class RowsSplit(SplitSizes):
    """A few rows held in memory with the split interface `FeatureInputs` reads (`pipeline.features.columnar.
    ColumnarSplit`): `images` / `captions` map a store column to a fixed (n, ...) array or a list of (n_i, W)
    arrays (ragged); `texts` the caption strings; `keys` the image keys."""

    def __init__(self, images: dict | None = None, captions: dict | None = None, texts: Sequence[str] = (),
                 keys: Sequence[str] = ()):
        self.tables = {"images": images or {}, "captions": captions or {}}
        self.texts, self.keys = list(texts), list(keys)
        self.labels = [[] for _ in self.keys]
        self.caption_image = np.full(len(self.texts), -1, dtype=np.int64)  # free text: no image of its own

    def take(self, table: str, column: str, rows: Any):
        """As `ColumnarSplit.take`: (k, ...) for a fixed column, (flat (sum n_i, W), lengths (k,)) for a ragged one."""
        values, rows = self.tables[table][column], np.asarray(rows, dtype=np.int64).reshape(-1)
        if isinstance(values, list):
            items = [np.asarray(values[r]) for r in rows]
            width = next((a.shape[1] for a in map(np.asarray, values) if a.ndim == 2), 1)
            flat = np.concatenate(items) if items else np.zeros((0, width), np.float16)
            return flat.reshape(-1, width), np.array([len(a) for a in items], dtype=np.int64)
        return np.asarray(values)[rows]

    def caption_text(self, rows: Any) -> list[str]:
        return [self.texts[r] for r in np.asarray(rows).reshape(-1)]

    def row_index(self, keys: Sequence[str]) -> np.ndarray:
        where = {k: i for i, k in enumerate(self.keys)}
        return np.array([where[k] for k in keys], dtype=np.int64)


class ExtendedSplit(SplitSizes):
    """A split (`base`) followed by the rows of a `RowsSplit` (`extra`) in one table: extra row i is row
    `base.num_images + i` (images) or `base.num_captions + i` (captions), so that a method's `rerank` sees a query
    that is not in the collection as one more row of the split."""

    def __init__(self, base, extra: RowsSplit, table: str):
        self.base, self.extra, self.table = base, extra, table
        images = table == "images"
        self.keys = list(base.keys) + (extra.keys if images else [])
        self.labels = list(base.labels) + (extra.labels if images else [])
        self.caption_image = base.caption_image if images else np.concatenate([base.caption_image,
                                                                               extra.caption_image])

    def _offset(self, table: str) -> int:
        return self.base.num_images if table == "images" else self.base.num_captions

    def take(self, table: str, column: str, rows: Any):
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = self._offset(table)
        if table != self.table or (rows < n).all():
            return self.base.take(table, column, rows)
        if (rows >= n).all():
            return self.extra.take(table, column, rows - n)
        from pipeline.features.columnar import ragged_items

        parts = [self.base.take(table, column, [r]) if r < n else self.extra.take(table, column, [r - n])
                 for r in rows.tolist()]
        if isinstance(parts[0], tuple):
            items = [ragged_items(*p)[0] for p in parts]
            return np.concatenate(items), np.array([len(i) for i in items], dtype=np.int64)
        return np.concatenate(parts)

    def caption_text(self, rows: Any) -> list[str]:
        n = self.base.num_captions
        return [self.base.caption_text([r])[0] if r < n or self.table != "captions" else self.extra.texts[r - n]
                for r in np.asarray(rows).reshape(-1).tolist()]

    def row_index(self, keys: Sequence[str]) -> np.ndarray:
        extra = {k: self.base.num_images + i for i, k in enumerate(self.extra.keys)} if self.table == "images" else {}
        known = [k for k in keys if k not in extra]
        base_rows = iter(self.base.row_index(known).tolist()) if known else iter(())
        return np.array([extra[k] if k in extra else next(base_rows) for k in keys], dtype=np.int64)


def _store_dtype(name: str) -> type:
    from pipeline.features.store import FLOAT32_ARRAYS

    return np.float32 if name in FLOAT32_ARRAYS else np.float16


class QueryEncoder:
    """Turns raw captions and images into the store columns a method reads, with the extractor(s) the store was
    made with: `features` for the main store and, for a method that reads one, `guide` for the guide store. The
    arrays are cast to the store's dtypes (float16; boxes float32), so a query is what a stored row would be."""

    def __init__(self, features, guide=None, with_tokens: bool = True, device=None):
        import torch

        from pipeline.features.extractors import get_extractor

        self.device = device or torch.device("cpu")
        self.with_tokens = with_tokens
        self.modules = {"main": get_extractor(features.extractor)}
        self.extractors = {"main": self.modules["main"].load(features, self.device)}
        if guide is not None:
            self.modules["guide"] = get_extractor(guide.extractor)
            self.extractors["guide"] = self.modules["guide"].load(guide, self.device)

    @staticmethod
    def _cast(arrays: dict) -> dict:
        return {k: [np.asarray(a, _store_dtype(k)) for a in v] if isinstance(v, list)
                else np.asarray(v, _store_dtype(k)) for k, v in arrays.items()}

    def captions(self, texts: Sequence[str]) -> RowsSplit:
        """Returns the captions as a `RowsSplit` of caption columns (`text_embed`, `text_pooled`, `text_tokens`)."""
        arrays = self.modules["main"].encode_texts(self.extractors["main"], list(texts), self.with_tokens)
        return RowsSplit(captions=self._cast(arrays), texts=texts)

    def images(self, images: Sequence, keys: Sequence[str] | None = None) -> tuple[RowsSplit, RowsSplit | None]:
        """Returns (the images (PIL) as a `RowsSplit` of main-store image columns, the same of guide-store columns
        or None); `keys` name the rows (default `query-<i>`)."""
        keys = list(keys or [f"query-{i}" for i in range(len(images))])
        out = []
        for name in ("main", "guide"):
            if name not in self.extractors:
                out.append(None)
                continue
            arrays = self.modules[name].encode_images(self.extractors[name], list(images), self.with_tokens)
            out.append(RowsSplit(images=self._cast(arrays), keys=keys))
        return out[0], out[1]


def _method_inputs(method, main, guide=None):
    """Returns the `FeatureInputs` of a trained method over split-like `main` (and `guide`)."""
    from pipeline.train.inputs import FeatureInputs, method_caps

    cls = type(method)
    return FeatureInputs(cls.columns(method.args), main, guide, method_caps(cls, method.args))


def encode_rows(method, table: str, main: RowsSplit, guide: RowsSplit | None = None) -> np.ndarray:
    """Returns the trained method's L2-normalised embeddings (n, D) of every row of `table` ("images" or "captions")
    of an in-memory split (the store columns of queries, from `QueryEncoder`)."""
    import torch

    inputs = _method_inputs(method, main, guide)
    with torch.no_grad():
        if table == "images":
            return normalise(method.encode_image(inputs.images(np.arange(main.num_images))))
        return normalise(method.encode_text(inputs.captions(np.arange(main.num_captions))))


def embed_texts(method, encoder: QueryEncoder | None, texts: Sequence[str]) -> np.ndarray:
    """Returns the trained method's L2-normalised embeddings (B, D) of free `texts`: through the store's extractor
    (`encoder`) and `encode_text`, or, for a method on shards (`encoder` None), its own tokenizer."""
    import torch

    if method.source == "shards":
        with torch.no_grad():
            return normalise(method.encode_text({"tokens": method.tokenizer(list(texts))}))
    return encode_rows(method, "captions", encoder.captions(texts))


def embed_images(method, encoder: QueryEncoder | None, images: Sequence) -> np.ndarray:
    """Returns the trained method's L2-normalised embeddings (B, D) of PIL `images` (as `embed_texts`)."""
    import torch

    images = [im.convert("RGB") for im in images]
    if method.source == "shards":
        with torch.no_grad():
            return normalise(method.encode_image({"pixels": torch.stack([method.preprocess(im) for im in images])}))
    return encode_rows(method, "images", *encoder.images(images))


def needs_tokens(columns) -> bool:
    """True when a method reads columns that the extractor writes only with `store_tokens` (ragged or grids)."""
    from pipeline.features.store import CAPTION_ARRAYS

    fixed = {"image_embed", "image_pooled", "region_feats", *CAPTION_ARRAYS}
    return any(c.kind == "ragged" or (c.kind == "fixed" and c.name not in fixed) for c in columns)


# ------------------------------------------------------------------------------------------------ the model
@dataclass
class Located:
    """What `locate` found: the train stage's output and the stage outputs the trained method reads (by role:
    "extract" [and "guide"], or "shard"), as `StageResult`s, and the run ids they came from."""

    trained: Any  # StageResult
    sources: dict[str, Any]  # role -> StageResult
    run_id: str  # the eval (or train) run that linked them
    experiment_id: str


def _same(logged: str, wanted: str) -> bool:
    """True when a logged MLflow param equals the config's value (dicts and lists compared as values)."""
    if logged == wanted:
        return True
    try:
        return ast.literal_eval(logged) == ast.literal_eval(wanted)
    except (ValueError, SyntaxError):
        return False


def _matches(params: dict, section: str, values: dict, skip: Sequence[str] = ()) -> bool:
    """True when every param of `section` the run logged equals the config's (keys it did not log are skipped:
    runs of an older version of the config)."""
    from pipeline.tracking.runs import _params

    wanted = _params({section: {k: v for k, v in values.items() if k not in skip}})  # as the stage logged them
    return all(_same(params[k], v) for k, v in wanted.items() if k in params)


def _result(run, role: str, outputs: dict):
    from pipeline.stages.base import StageResult

    tags = run.data.tags
    producer = tags.get("itr.cached_from") or run.info.run_id
    if producer not in outputs:
        return None
    return StageResult(role if role != "guide" else "extract", tags.get("itr.fingerprint", ""), Path(outputs[producer]),
                       producer, cached=producer != run.info.run_id)


def locate(cfg, run_id: str | None = None) -> Located:
    """Returns the model trained with `cfg` and the stage outputs it reads: from run `run_id` (an eval or train run)
    when given, else the latest finished eval run (then train run) of the config's experiment whose train run
    logged the config's `train` parameters (less where and how it was kept) and whose extract run(s) logged its
    `features` (and `train.guide`), with outputs under the config's workdir. Raises FileNotFoundError saying what
    to run when there is none."""
    from mlflow import MlflowClient

    from pipeline.config import OPERATIONAL_FEATURES, to_dict
    from pipeline.stages.train import train_identity
    from pipeline.tracking.lineage import stage_outputs

    client = MlflowClient(cfg.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    outputs = stage_outputs(cfg)
    if run_id:
        candidates = [client.get_run(run_id)]
    elif experiment is None:
        candidates = []
    else:
        candidates = [r for stage in ("eval", "train") for r in client.search_runs(
            [experiment.experiment_id], f"tags.`itr.stage` = '{stage}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=100)]
    runs: dict[str, Any] = {}

    def get(rid: str):
        if rid not in runs:
            runs[rid] = client.get_run(rid)
        return runs[rid]

    for run in candidates:
        upstream = [u for u in run.data.tags.get("itr.upstream", "").split(",") if u]
        stage = run.data.tags.get("itr.stage")
        if stage == "eval" and upstream:
            train_run, source_ids = get(upstream[-1]), upstream[:-1]
        elif stage == "train":
            train_run, source_ids = run, upstream
        else:
            continue
        trained = _result(train_run, "train", outputs)
        if trained is None or not (run_id or _matches(get(trained.run_id).data.params, "train",
                                                      train_identity(cfg.train))):
            continue
        sources, ok = {}, True
        for rid in source_ids:
            source = get(rid)
            role = SOURCE_STAGES.get(source.data.tags.get("itr.stage"))
            if role is None:
                continue  # a required training (Method.requires): not an input of the trained method
            if role == "extract" and "extract" in sources:
                role = "guide"
            result = _result(source, role, outputs)
            expected = cfg.train.guide if role == "guide" else cfg.features
            if result is None or (role != "shard" and not run_id and expected is not None
                                  and not _matches(get(result.run_id).data.params, "features", to_dict(expected),
                                                   OPERATIONAL_FEATURES)):
                ok = False
                break
            sources[role] = result
        if ok and sources:
            return Located(trained, sources, run.info.run_id, run.info.experiment_id)
    where = f"experiment {cfg.tracking.experiment!r} of {cfg.tracking_uri}"
    raise FileNotFoundError(f"no model trained with this config in {where} with its outputs under {cfg.workdir_path}: "
                            "run `itr run CONFIG` first (or pass --run RUN_ID of an eval or train run)")


# ------------------------------------------------------------------------------------------------ the searcher
@dataclass
class Hit:
    """One result: its rank (1 = best), gallery row, score, the image key, the caption(s) and the shard holding
    the sample (None for a feature source)."""

    rank: int
    row: int
    score: float
    key: str
    captions: list[str]
    shard: str | None = None


@dataclass
class Gallery:
    """The embedded split: image and caption embeddings (L2-normalised float32) and their text metadata."""

    images: np.ndarray  # (N, D)
    captions: np.ndarray  # (M, D)
    keys: list[str]
    caption_text: list[str]
    caption_image: np.ndarray  # (M,) image row of each caption
    indexes: dict[str, Any] = field(default_factory=dict)  # table -> faiss index (large galleries)


class Searcher:
    """The trained method of a config (or, `frozen`, its extractor's own embeddings) over one split."""

    def __init__(self, cfg, split: str | None = None, frozen: bool = False, run_id: str | None = None,
                 exact_max: int = EXACT_MAX, located: Located | None = None):
        from pipeline.stages.train import load_trained

        self.cfg, self.split, self.frozen, self.exact_max = cfg, split or cfg.eval.split, frozen, exact_max
        self.located = located or locate(cfg, run_id)
        self.method = load_trained(self.located.trained.path)
        self.on_shards = self.method.source == "shards"
        if frozen and "extract" not in self.located.sources:
            raise ValueError("--frozen: this model reads no feature store (a method on shards)")
        self._encoder: QueryEncoder | None = None
        self._inputs = None
        self._shard_index: dict[str, str] | None = None
        self._thumbs: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        self.gallery = self._load_gallery()

    # ---------------------------------------------------------------- gallery
    @property
    def fingerprint(self) -> str:
        """The identity of the gallery: the model (train fingerprint, or the frozen extractor), the store
        selection(s) it reads, the split and this module's cache version."""
        from pipeline.fingerprint import digest

        sources = {role: r.fingerprint for role, r in self.located.sources.items()}
        model = "frozen" if self.frozen else self.located.trained.fingerprint
        return digest({"model": model, "sources": sources, "split": self.split, "version": CACHE_VERSION})

    @property
    def cache_dir(self) -> Path:
        return self.cfg.workdir_path / "search" / self.fingerprint

    @property
    def inputs(self):
        """The method's inputs over the split (`pipeline.stages.eval.open_eval_inputs`)."""
        if self._inputs is None:
            from pipeline.stages.eval import open_eval_inputs

            self._inputs = open_eval_inputs(self.method, self.located.sources, self.split)
        return self._inputs

    def _load_gallery(self) -> Gallery:
        from pipeline.io import atomic_dir, atomic_write_json

        inputs = self.inputs
        keys = list(inputs.keys)
        caption_image = np.asarray(inputs.caption_image)
        texts = list(inputs.texts) if self.on_shards else inputs.main.caption_text(np.arange(inputs.num_captions))
        folder = self.cache_dir
        if (folder / "images.npy").is_file():
            images, captions = np.load(folder / "images.npy"), np.load(folder / "captions.npy")
        else:
            images, captions = self._embed()
            with atomic_dir(folder) as tmp:
                np.save(tmp / "images.npy", images)
                np.save(tmp / "captions.npy", captions)
                atomic_write_json(tmp / "gallery.json", {"split": self.split, "frozen": self.frozen,
                                                         "train_run": self.located.trained.run_id,
                                                         "images": len(images), "captions": len(captions)})
        gallery = Gallery(images, captions, keys, texts, caption_image)
        for table, emb in (("images", images), ("captions", captions)):
            if len(emb) > self.exact_max:
                gallery.indexes[table] = self._index(table, emb)
        return gallery

    def _embed(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns the split's (image, caption) embeddings, L2-normalised."""
        if self.frozen:
            from pipeline.features import store

            feats = store.read_split(*store.open_selection(self.located.sources["extract"].path), self.split,
                                     ("image_embed",), ("text_embed",))
            img, txt = feats.images["image_embed"], feats.captions["text_embed"]
            if img.shape[1] != txt.shape[1]:
                raise ValueError("--frozen: the extractor's image and text embeddings have different widths")
            return normalise(img), normalise(txt)
        import torch

        from pipeline.train.inputs import embed_inputs

        img, txt = embed_inputs(self.method, self.inputs, torch.device("cpu"))
        return normalise(img), normalise(txt)

    def _index(self, table: str, emb: np.ndarray):
        """Returns the faiss index of a gallery table, read from the cache folder or built and written there."""
        import faiss

        path = self.cache_dir / f"faiss-{table}.index"
        if path.is_file():
            return faiss.read_index(str(path))
        index = build_index(emb)
        tmp = path.with_name(f".{path.name}.tmp")
        faiss.write_index(index, str(tmp))
        tmp.replace(path)
        return index

    # ---------------------------------------------------------------- queries
    @property
    def encoder(self) -> QueryEncoder:
        if self._encoder is None:
            columns = type(self.method).columns(self.method.args) if not self.frozen else []
            guide = self.cfg.train.guide if any(c.store == "guide" for c in columns) else None
            self._encoder = QueryEncoder(self.cfg.features, guide, with_tokens=needs_tokens(columns))
        return self._encoder

    def _feature_inputs(self, main, guide=None):
        return _method_inputs(self.method, main, guide)

    def _text_query(self, text: str) -> tuple[np.ndarray, Any]:
        """Returns (the query's embedding (1, D), a (rerank inputs, query row) pair or None)."""
        if self.on_shards:
            return embed_texts(self.method, None, [text]), None
        rows = self.encoder.captions([text])
        if self.frozen:
            return normalise(rows.tables["captions"]["text_embed"]), None
        rerank = None
        if self.method.rerank is not None:  # the query as one more caption row of the split
            base = self.inputs
            rerank = (self._feature_inputs(ExtendedSplit(base.main, rows, "captions"), base.guide), base.num_captions)
        return encode_rows(self.method, "captions", rows), rerank

    def _image_query(self, image) -> tuple[np.ndarray, Any]:
        """Returns (the image's embedding (1, D), a (rerank inputs, query row) pair or None)."""
        if self.on_shards:
            return embed_images(self.method, None, [image]), None
        main, guide = self.encoder.images([image.convert("RGB")])
        if self.frozen:
            return normalise(main.tables["images"]["image_embed"]), None
        rerank = None
        if self.method.rerank is not None:  # the query as one more image row of the split
            base = self.inputs
            rerank = (self._feature_inputs(ExtendedSplit(base.main, main, "images"), ExtendedSplit(
                base.guide, guide, "images") if guide is not None else None), base.num_images)
        return encode_rows(self.method, "images", main, guide), rerank

    def _rank(self, table: str, query: np.ndarray, k: int, rerank: Any, direction: str) -> list[tuple[int, float]]:
        """Returns [(gallery row, score)] of the top k: global top-k (exact or faiss), then the method's rerank
        of its top `eval.rerank_k` candidates when it has one."""
        emb = getattr(self.gallery, table)
        depth = getattr(self.cfg.eval.rerank_k, direction)
        use_rerank = rerank is not None and self.method.rerank is not None and depth > 0 and not self.frozen
        want = max(k, depth) if use_rerank else k
        index = self.gallery.indexes.get(table)
        scores, rows = index_top_k(index, query, want) if index is not None else exact_top_k(emb, query, want)
        pairs = [(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]
        if use_rerank and pairs:
            import torch

            inputs, row = rerank
            candidates = torch.tensor([[r for r, _ in pairs]])
            rescored = self.method.rerank(inputs, direction, torch.tensor([row]), candidates)[0].float().numpy()
            order = np.argsort(-rescored, kind="stable")
            pairs = [(pairs[i][0], float(rescored[i])) for i in order]
        return pairs[:k]

    def search_text(self, text: str, k: int = 10) -> list[Hit]:
        """Returns the split's k images that best match `text`, each with its captions."""
        query, rerank = self._text_query(text)
        g = self.gallery
        by_image = self.captions_by_image()
        return [Hit(i + 1, row, score, g.keys[row], by_image[row], self.shard_of(g.keys[row]))
                for i, (row, score) in enumerate(self._rank("images", query, k, rerank, "t2i"))]

    def search_image(self, image, k: int = 10) -> list[Hit]:
        """Returns the split's k captions that best match `image` (a PIL image, a file path, or the key of an
        image of the split), each with its image key."""
        g = self.gallery
        if isinstance(image, str) and image in self._key_rows():
            row = self._key_rows()[image]
            query = g.images[row:row + 1]
            rerank = (self.inputs, row) if not self.on_shards else None
        else:
            from PIL import Image

            query, rerank = self._image_query(Image.open(image) if isinstance(image, (str, Path)) else image)
        hits = []
        for i, (row, score) in enumerate(self._rank("captions", query, k, rerank, "i2t")):
            key = g.keys[int(g.caption_image[row])]
            hits.append(Hit(i + 1, row, score, key, [g.caption_text[row]], self.shard_of(key)))
        return hits

    def _key_rows(self) -> dict[str, int]:
        if not hasattr(self, "_rows"):
            self._rows = {k: i for i, k in enumerate(self.gallery.keys)}
        return self._rows

    def captions_by_image(self) -> list[list[str]]:
        if not hasattr(self, "_by_image"):
            self._by_image: list[list[str]] = [[] for _ in self.gallery.keys]
            for text, owner in zip(self.gallery.caption_text, self.gallery.caption_image.tolist()):
                self._by_image[owner].append(text)
        return self._by_image

    # ---------------------------------------------------------------- shards
    def shard_of(self, key: str) -> str | None:
        """Returns the path (or URI) of the tar holding sample `key` (None when the dataset has no shards)."""
        from pipeline import storage
        from pipeline.data.shard import INDEX

        if self._shard_index is None:
            folder = self.cfg.shard_dir
            location = storage.join(folder, INDEX)
            self._shard_index = {}
            if storage.exists(location):
                index = storage.read_parquet(location)
                self._shard_index = {k: str(storage.join(folder, s)) for k, s in zip(index["key"], index["shard"])}
        return self._shard_index.get(key)

    def thumbnail(self, key: str) -> bytes | None:
        """Returns the JPEG bytes of sample `key` from its shard (None when unknown); the last 4 shards read stay in
        memory."""
        from pipeline import storage

        shard = self.shard_of(key)
        if shard is None:
            return None
        if shard not in self._thumbs:
            with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(shard))) as tar:
                self._thumbs[shard] = {m.name.rsplit(".", 1)[0]: tar.extractfile(m).read() for m in tar
                                       if m.name.endswith(".jpg")}
            while len(self._thumbs) > 4:
                self._thumbs.popitem(last=False)
        self._thumbs.move_to_end(shard)
        return self._thumbs[shard].get(key)

    def describe(self) -> str:
        """Returns one line naming the model and the gallery."""
        what = "frozen features" if self.frozen else f"{self.method.name} trained (run {self.located.trained.run_id})"
        search = "faiss IVF" if self.gallery.indexes else "exact top-k"
        return (f"{what}; split {self.split}: {len(self.gallery.keys)} images, {len(self.gallery.caption_text)} "
                f"captions; {search}" + ("; two-stage rerank" if self.method.rerank is not None and not self.frozen
                                         else ""))


def format_hits(hits: list[Hit], image_query: bool) -> str:
    """Returns the hits as a table: rank, key, score, caption and shard path."""
    lines = [f"{'rank':>4}  {'score':>7}  {'key':<16} {'caption' if image_query else 'first caption':<56} shard"]
    for h in hits:
        caption = h.captions[0] if h.captions else ""
        caption = caption if len(caption) <= 56 else caption[:53] + "..."
        lines.append(f"{h.rank:>4}  {h.score:>7.4f}  {h.key:<16} {caption:<56} {h.shard or '-'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds `itr search`'s arguments."""
    parser.add_argument("config", help="experiment YAML (see jobs/configs/)")
    parser.add_argument("query", nargs="?", help="the text to find images for (omit with --image)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    parser.add_argument("--image", help="an image file: find the captions that match it")
    parser.add_argument("--k", type=int, default=10, help="number of results (default 10)")
    parser.add_argument("--split", help="the split to search (default: eval.split)")
    parser.add_argument("--frozen", action="store_true", help="the extractor's own embeddings, not the trained method")
    parser.add_argument("--run", help="the eval or train run whose model to use (default: the latest of this config)")


def main(args: argparse.Namespace) -> int:
    """`itr search`: prints the top k; returns the exit status."""
    from pipeline.config import load_config

    overrides = list(args.overrides)
    if args.query and "=" in args.query and args.image:  # `itr search CONFIG --image x.jpg key=value`
        overrides.insert(0, args.query)
        args.query = None
    if bool(args.query) == bool(args.image):
        print("itr: error: give a query text or --image PATH (one of them)", file=sys.stderr)
        return 2
    if args.k < 1:
        print("itr: error: --k must be positive", file=sys.stderr)
        return 2
    cfg = load_config(args.config, overrides)
    searcher = Searcher(cfg, args.split, frozen=args.frozen, run_id=args.run)
    print(searcher.describe(), file=sys.stderr)
    if args.image:
        if not Path(args.image).is_file():
            raise FileNotFoundError(f"--image: no such file: {args.image}")
        print(format_hits(searcher.search_image(args.image, args.k), image_query=True))
    else:
        print(format_hits(searcher.search_text(args.query, args.k), image_query=False))
    return 0
