"""Training against open_clip_train: our end-to-end mode (`clip_finetune`: Ray Data over the tars feeding Ray Train
DDP) and `open_clip_train.main` (its webdataset loader, torchrun DDP) on the same shards, model, weights, global batch,
precision and number of processes, in the same run.

- Shards: synthetic 224 px images with one caption each (open_clip_train reads `KEY.txt`, the first caption; ours
  reads every caption of `KEY.json`: one each here, so both see the same pairs), `train/sizes.json` as our shard
  stage writes it.
- Weights: one random-init open_clip model saved to a checkpoint both load (`--pretrained <checkpoint>`,
  `pretrained=<checkpoint>`).
- Same math: the contrastive loss over the local batch (ours: `clip_finetune` with `queue_size=0`, so no queue and no
  EMA copy; open_clip_train: its ClipLoss without --local-loss / --gather-with-grad), AdamW, gradient clipping at 1.0,
  bf16 autocast where the device has bf16 (ours picks it itself; theirs `--precision amp_bf16`), else fp32.
- Processes: `--procs` DDP processes each (ours: Ray Train workers; theirs: torchrun --nproc_per_node); default one
  per GPU, or 1 on a CPU-only machine: open_clip_train cannot run DDP on CPUs (it passes `device_ids=[cpu]`, which
  torch's DistributedDataParallel rejects), so a CPU comparison is one process each, each using the machine as it
  does by default (ours: Ray Train's worker with torch threads = the cluster's CPUs over the workers, Ray Data's
  readers beside it; theirs: all cores for torch plus one data-loader worker).
- Speed: samples/s in the steady state = samples per epoch over the median seconds of the epochs after the first
  (ours: each epoch's `epoch_seconds`; theirs: the sum of its per-step `Batch (t)` log values over the epoch, with
  --log-every-n-steps 1). Start-up (processes, imports, model load) is reported apart, as whole-run seconds.

Last line: `ratio X (target >= 1.0)` = our samples/s over open_clip_train's.

    .venv/bin/python benchmarks/peers/train_open_clip.py [--model ViT-B-32] [--images 2048] [--batch-size 128]
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.extract import CpuAccount  # noqa: E402
from benchmarks.peers import PEERS, brace_range, make_shards, peer_venv, peer_version, save_random_checkpoint  # noqa

STEP = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/.*?Batch \(t\): ([\d.]+)")


def run_open_clip_train(python: Path, pattern: str, samples: int, logs: Path, model: str, checkpoint: Path,
                        batch_size: int, epochs: int, procs: int, precision: str, lr: float, device: str
                        ) -> tuple[float, list[list[float]], list[str]]:
    """Runs open_clip_train.main on the tars of `pattern`, logging into `logs` (a folder named `logs`); returns
    (whole-run seconds, per epoch the list of its steps' batch seconds, command line)."""
    launch = [str(python), "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 \
        else [str(python)]
    cmd = launch + ["-m", "open_clip_train.main", "--train-data", pattern, "--train-num-samples", str(samples),
                    "--dataset-type", "webdataset", "--model", model, "--pretrained", str(checkpoint),
                    "--batch-size", str(batch_size // procs), "--epochs", str(epochs), "--lr", str(lr),
                    "--wd", "1e-4", "--warmup", "0", "--grad-clip-norm", "1.0", "--precision", precision,
                    "--workers", "1", "--name", "peer", "--save-frequency", "0",
                    "--report-to", "", "--log-every-n-steps", "1", "--seed", "0", "--device", device]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    logs.mkdir(parents=True, exist_ok=True)  # its --logs default is ./logs (and torchrun takes --logs as its own)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=logs.parent)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line]
        raise RuntimeError(f"open_clip_train failed ({shlex.join(cmd)}):\n" + "\n".join(errors[-5:]) + "\n"
                           + proc.stderr[-2000:])
    log = (logs / "peer" / "out.log").read_text() if (logs / "peer" / "out.log").exists() else proc.stderr
    steps: dict[int, list[float]] = {}
    for epoch, _, batch in STEP.findall(log):
        steps.setdefault(int(epoch), []).append(float(batch))
    if len(steps) != epochs:
        raise RuntimeError(f"open_clip_train logged {len(steps)} epochs, not {epochs}:\n{log[-2000:]}")
    return seconds, [steps[e] for e in sorted(steps)], cmd


def run_ours(tmp: Path, shards_dir: Path, model: str, checkpoint: Path, batch_size: int, epochs: int, procs: int,
             cpus: int, lr: float, use_gpu: bool) -> tuple[float, dict[int, float]]:
    """Runs our end-to-end training (`fit_end_to_end`, after Ray is up); returns (whole-run seconds, {epoch: its
    seconds} of the epochs Ray Train still lists: those of the checkpoints it kept, the last two)."""
    import logging

    import ray

    from pipeline.config import TrainConfig, to_dict
    from pipeline.data.shard import read_manifest
    from pipeline.train.end_to_end import fit_end_to_end

    logging.getLogger().setLevel(logging.ERROR)
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    tc = to_dict(TrainConfig(method="clip_finetune", epochs=epochs, batch_size=batch_size, lr=lr, warmup_steps=0,
                             grad_clip=1.0, num_workers=procs, use_gpu=use_gpu, max_failures=0))
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp / "ray"))
    try:
        ray.data.range(2, override_num_blocks=2).map(lambda row: row).take_all()  # Ray Data's own actors
        t0 = time.perf_counter()
        result = fit_end_to_end(shards_dir, read_manifest(shards_dir), model, str(checkpoint), tc,
                                {"queue_size": 0}, {"storage_path": str(tmp / "ray_results")}, "bench-peer-train",
                                None, None, procs, use_gpu)
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    if result.error:
        raise RuntimeError(f"our training failed: {result.error}")
    frame = result.metrics_dataframe
    return seconds, {int(e): float(s) for e, s in zip(frame["epoch"], frame["epoch_seconds"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model known to both versions (random init)")
    parser.add_argument("--images", type=int, default=2048, help="pairs per epoch (one caption per image)")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--procs", type=int, default=0, help="DDP processes on each side (0: one per GPU, else 1)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from pipeline.features.precision import resolve_precision

    use_gpu = torch.cuda.is_available()
    args.procs = args.procs or (torch.cuda.device_count() if use_gpu else 1)
    if args.images % args.batch_size or args.batch_size % args.procs:
        parser.error("--images must be a multiple of --batch-size, itself a multiple of --procs")
    num_shards = args.images // args.shard_size
    if num_shards < args.procs or args.images % args.shard_size:
        parser.error("--images must be whole shards, at least one per process")
    python = peer_venv("peers", PEERS)
    versions = {d: peer_version(python, d) for d in ("open_clip_torch", "torch")}
    device = "cuda" if use_gpu else "cpu"
    ours_precision = resolve_precision("auto", torch.device(device))
    theirs = {"bf16": "amp_bf16", "fp16": "amp", "fp32": "fp32"}[ours_precision]
    lr = 1e-5
    with tempfile.TemporaryDirectory(prefix="bench-peer-train-") as tmp:
        tmp = Path(tmp)
        shards_dir = make_shards(tmp, num_shards, args.shard_size, captions=1)
        paths = sorted((shards_dir / "train").glob("shard-*.tar"))
        checkpoint = save_random_checkpoint(args.model, tmp / f"{args.model}-random.pt")
        print(f"{args.model} (random init, one checkpoint both load), {ours_precision} autocast on both sides; "
              f"{num_shards} shards x {args.shard_size} = {args.images} pairs per epoch (224 px synthetic), global "
              f"batch {args.batch_size}, {args.epochs} epochs, {args.procs} DDP process(es) each, {args.cpus} CPUs; "
              f"open_clip_train {versions['open_clip_torch']} (torch {versions['torch']}) in {python.parent.parent}",
              flush=True)
        with CpuAccount() as peer_cpu:
            peer_s, peer_steps, cmd = run_open_clip_train(python, brace_range(paths), args.images, tmp / "logs",
                                                          args.model, checkpoint, args.batch_size, args.epochs,
                                                          args.procs, theirs, lr, device)
        print(f"open_clip_train: {shlex.join(cmd)}", flush=True)
        with CpuAccount() as ours_cpu:
            ours_s, ours_epochs = run_ours(tmp, shards_dir, args.model, checkpoint, args.batch_size, args.epochs,
                                           args.procs, args.cpus, lr, use_gpu)
    peer_epochs = dict(enumerate(sum(steps) for steps in peer_steps))
    first = 1 if args.epochs > 1 else 0  # the steady state: the epochs after the first

    def rate(epochs: dict[int, float]) -> float:
        return args.images / float(np.median([s for e, s in epochs.items() if e >= first]))

    peer_rate, ours_rate = rate(peer_epochs), rate(ours_epochs)
    print()
    print(f"{'':28}{'samples/s':>10}{'whole run s':>12}   epoch: seconds (ours: the epochs Ray Train keeps)")
    for name, speed, whole, epochs in (("open_clip_train", peer_rate, peer_s, peer_epochs),
                                       ("ours: clip_finetune (Ray)", ours_rate, ours_s, ours_epochs)):
        print(f"{name:28}{speed:10.2f}{whole:12.1f}   " + " ".join(f"{e + 1}: {s:.1f}" for e, s in epochs.items()))
    print(f"samples/s: steady state, median over epochs {'2..' if args.epochs > 1 else '1..'}{args.epochs}")
    print(f"other processes on this machine used {100 * peer_cpu.other:.0f}% of its CPUs during open_clip_train, "
          f"{100 * ours_cpu.other:.0f}% during ours: 0% is a quiet machine")
    print(f"ratio {ours_rate / peer_rate:.2f} (target >= 1.0)")


if __name__ == "__main__":
    main()
