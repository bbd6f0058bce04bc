"""The training feed of a method on shards (`clip_finetune`): an open_clip model fine-tuned straight from the
WebDataset shards, with the same epochs, phases, momentum state, checkpoints and metrics as a method on features
(`pipeline.train.loop.run_epochs`).

Data: a Ray Data dataset of one row per (image, caption) pair (`shard_dataset`), split across the workers by
Ray Train (streaming split, equal row counts); each worker decodes, preprocesses and tokenises its rows in
the collate (`PairCollate`) and takes exactly `steps_per_epoch` = pairs // global batch batches per epoch,
so every rank makes the same number of DDP steps. Shuffling is two-level, as open_clip's webdataset loader
does it (shard shuffle + sample buffer): the order of the tars is reshuffled at every execution of the
dataset, i.e. every epoch (Ray's `RandomSeedConfig`: seeded by (seed, execution index)), and each worker
shuffles its rows in a local buffer seeded by (seed, epoch, rank). No global `random_shuffle`: it would move
every JPEG through an all-to-all each epoch, and the global batches would still not be reproducible, since
the streaming split hands blocks to the workers in arrival order. So unlike the feature mode, a resumed run
sees every pair once per epoch, but not the same batches as an uninterrupted one.

Validation and evaluation embed a split straight from its tars (`embed_shards`: each image once, all of its
captions), on rank 0; the metrics are broadcast so every rank reports the same numbers.
"""
from __future__ import annotations

import io
from itertools import islice
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import ray.data
import torch
import torch.distributed as dist
from PIL import Image
from ray.data.collate_fn import NumpyBatchCollateFn

from pipeline import storage
from pipeline.data.shard import read_shard
from pipeline.eval.metrics import evaluate_embeddings
from pipeline.methods.clip_finetune import ClipFineTune, ClipFineTuneArgs, load_clip
from pipeline.nn.distributed import world
from pipeline.train.loop import run_epochs, worker_context

CODE_VERSION = 1  # part of the train stage's fingerprint in end_to_end mode: bump when results would change
SHUFFLE_BUFFER_ROWS = 2048  # pair rows (JPEG bytes + caption) each worker shuffles in; at least one local batch


def open_clip_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Returns the open_clip state dict inside a `ClipFineTune` state dict (a checkpoint's state["model"]):
    saved with `torch.save`, it is an open_clip checkpoint that `load_clip(name, pretrained=path)` loads."""
    return {k.removeprefix("clip."): v for k, v in state_dict.items()}


def decode_images(jpgs: Iterable[bytes], preprocess: Callable) -> torch.Tensor:
    """Returns the (B, 3, H, W) float tensor of the JPEG byte strings, each decoded to RGB and preprocessed."""
    return torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpgs])


class PairCollate(NumpyBatchCollateFn):
    """Collate of `shard_dataset` rows for `iter_torch_batches`: returns {"pixels" (B, 3, H, W) float,
    "tokens" (B, L) long, "ids" (B,) long image ids} from a numpy batch with columns jpg, caption, image_id."""

    def __init__(self, preprocess: Callable, tokenizer: Callable):
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {"pixels": decode_images(batch["jpg"], self.preprocess),
                "tokens": self.tokenizer([str(c) for c in batch["caption"]]),
                "ids": torch.as_tensor(batch["image_id"].astype(np.int64))}


def shard_pairs(item: dict) -> list[dict]:
    """Returns one row per (image, caption) of the tar item["path"], in member order: {"key", "jpg" (bytes),
    "caption", "image_id" = item["first_id"] + the image's position in the tar}. Raises ValueError when the
    tar does not hold item["num_samples"] images (the manifest's count, on which the ids rely)."""
    samples = read_shard(item["path"])
    if len(samples) != item["num_samples"]:
        raise ValueError(f"shard {item['path']} holds {len(samples)} samples, its manifest row says "
                         f"{item['num_samples']}")
    return [{"key": s["key"], "jpg": s["jpg"], "caption": caption, "image_id": item["first_id"] + i}
            for i, s in enumerate(samples) for caption in s["json"]["captions"]]


def shard_dataset(shard_paths: list[str], num_samples: list[int], seed: int) -> ray.data.Dataset:
    """Returns a `ray.data.Dataset` of one row per (image, caption) pair of the tars (local paths or URIs):
    columns key, jpg (bytes), caption (str), image_id (int64: 0..N-1, the image's position in the tars in the
    given order; `num_samples` = the manifest's image count of each tar). The tars are read in an order
    reshuffled at every execution of the dataset (each epoch), reproducibly from `seed`."""
    first_ids = np.concatenate([[0], np.cumsum(num_samples)[:-1]]).astype(int)
    items = [{"path": str(p), "first_id": int(f), "num_samples": int(n)}
             for p, f, n in zip(shard_paths, first_ids, num_samples)]
    tars = ray.data.from_items(items, override_num_blocks=len(items))
    return tars.randomize_block_order(seed=ray.data.RandomSeedConfig(seed)).flat_map(shard_pairs)


@torch.no_grad()
def embed_shards(method: ClipFineTune, preprocess: Callable, tokenizer: Callable, shard_paths: list[str],
                 device: torch.device, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, list]:
    """Returns (image embeddings (N, D), caption embeddings (M, D), caption_image (M,) int64 = the row of each
    caption's image, labels: N lists of str) of the tars in the given order; each image is encoded once, with
    all of its captions. The model is put back in its previous train/eval mode."""
    was_training = method.training
    method.eval()
    images, texts, owners, labels = [], [], [], []
    for path in shard_paths:
        samples = read_shard(path)
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            first = len(labels)
            pixels = decode_images([s["jpg"] for s in chunk], preprocess).to(device)
            images.append(method.encode_image({"pixels": pixels}).cpu())
            captions = [(first + i, c) for i, s in enumerate(chunk) for c in s["json"]["captions"]]
            owners += [i for i, _ in captions]
            texts.append(method.encode_text({"tokens": tokenizer([c for _, c in captions]).to(device)}).cpu())
            labels += [s["json"].get("labels", []) for s in chunk]
    method.train(was_training)
    return torch.cat(images), torch.cat(texts), np.asarray(owners, dtype=np.int64), labels


def broadcast_from_rank0(obj):
    """Returns rank 0's `obj` on every rank (`obj` itself when not distributed)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def exactly(batches: Iterable[dict], steps: int) -> Iterator[dict]:
    """Yields the first `steps` batches; raises RuntimeError when there are fewer (a rank that stopped early
    would leave the others waiting in DDP's all-reduce)."""
    count = 0
    for count, batch in enumerate(islice(batches, steps), 1):
        yield batch
    if count < steps:
        raise RuntimeError(f"this worker's data split gave {count} batches, not the {steps} every rank must make")


def train_end_to_end_per_worker(config: dict) -> None:
    """Ray Train entry point of the end-to-end mode. `config`: model_name, pretrained, train (TrainConfig as
    dict), steps_per_epoch, val_shards (tar paths, may be empty), threads_per_worker, mlflow_uri, mlflow_run_id.
    Reads the "train" dataset shard of `shard_dataset` rows; checkpoints, metrics and resume as in the feature
    mode (`run_epochs`), validation R@K (`val_*`) on rank 0, broadcast."""
    import ray.train
    import ray.train.torch

    tc = config["train"]
    rank, world_size, device, precision = worker_context(config)
    method, preprocess, tokenizer = load_clip(config["model_name"], config["pretrained"], device, tc["seed"],
                                              ClipFineTuneArgs(**config["method_args"]))
    train_rows = ray.train.get_dataset_shard("train")
    collate = PairCollate(preprocess, tokenizer)
    local_batch = tc["batch_size"] // world_size

    def batches(epoch: int) -> Iterator[dict]:
        seed = int(np.random.SeedSequence([tc["seed"], epoch, rank]).generate_state(1)[0])
        rows = train_rows.iter_torch_batches(batch_size=local_batch, collate_fn=collate, drop_last=True,
                                             local_shuffle_buffer_size=max(local_batch, SHUFFLE_BUFFER_ROWS),
                                             local_shuffle_seed=seed)
        return exactly(rows, config["steps_per_epoch"])

    def validate_epoch() -> dict[str, float]:
        metrics = None
        if rank == 0:
            img, txt, caption_image, _ = embed_shards(method, preprocess, tokenizer, config["val_shards"], device)
            metrics = {f"val_{k}": v for k, v in evaluate_embeddings(img, txt, caption_image).items()}
        return broadcast_from_rank0(metrics)

    run_epochs(config, tc, method, batches, validate_epoch if config["val_shards"] else None, device, precision,
               ray.train.torch.prepare_model)


def fit_end_to_end(shard_dir: storage.Location, manifest: pd.DataFrame, model_name: str, pretrained: str | None,
                   tc: dict, method_args: dict, run_storage: dict, run_name: str, mlflow_uri: str | None,
                   mlflow_run_id: str | None, num_workers: int, use_gpu: bool) -> ray.train.Result:
    """Fine-tunes `model_name` on the train split of the shard folder `shard_dir` (`manifest`: its shard
    manifest frame) with Ray Train, validating each epoch on the val split when there is one; returns the
    `ray.train.Result`. `run_storage`: RunConfig's storage_path (and storage_filesystem). Its checkpoints hold
    `state.pt` (see `run_epochs`): state["model"] is the
    `ClipFineTune` state dict (`open_clip_state` turns it into an open_clip checkpoint); with a val split they
    are ranked by val_rsum. `tc` is TrainConfig as a dict, `method_args` the method's arguments as a dict.
    Raises ValueError when the split holds less than one global batch, the global batch does not divide
    among the workers or into the queue, or the cluster has too few CPUs."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.ray_runtime import cluster_cpus

    tc = {**tc, "num_workers": num_workers, "use_gpu": use_gpu}
    train, val = manifest[manifest["split"] == "train"], manifest[manifest["split"] == "val"]
    pairs, batch = int(train["num_captions"].sum()), tc["batch_size"]
    if pairs < batch:
        raise ValueError(f"train split has {pairs} captions, fewer than one global batch ({batch})")
    if batch % num_workers:
        raise ValueError(f"train.batch_size {batch} must be a multiple of train.num_workers ({num_workers})")
    cpus = cluster_cpus()
    data_cpus = max(1, cpus // 4)  # Ray Data's tar-reading tasks; decoding happens in the workers' collate
    if cpus <= data_cpus:
        raise ValueError(f"end-to-end training needs more than {data_cpus} CPUs in the Ray cluster, it has {cpus}")
    cpus_per_worker = (cpus - data_cpus) / num_workers
    paths = [str(storage.join(shard_dir, name)) for name in train["shard"]]
    trainer = TorchTrainer(
        train_end_to_end_per_worker,
        train_loop_config={
            "model_name": model_name, "pretrained": pretrained, "train": tc, "method_args": method_args,
            "steps_per_epoch": pairs // batch,
            "val_shards": [str(storage.join(shard_dir, name)) for name in val["shard"]],
            # Ray reserves data_cpus for the tar readers, but torch may use every core: the readers mostly wait
            # on I/O (decoding runs in the workers' collate), and a reserved core left idle halves a 2-core machine
            "threads_per_worker": max(1, cpus // num_workers), "mlflow_uri": mlflow_uri,
            "mlflow_run_id": mlflow_run_id,
        },
        datasets={"train": shard_dataset(paths, train["num_samples"].tolist(), tc["seed"])},
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=run_name, **run_storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, **({"checkpoint_score_attribute": "val_rsum", "checkpoint_score_order": "max"}
                                  if len(val) else {})),
            failure_config=ray.train.FailureConfig(max_failures=tc["max_failures"]),
        ),
    )
    return trainer.fit()
