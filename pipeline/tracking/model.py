"""The trained method as an MLflow model: a pyfunc (captions or images in, embeddings out), registered as
`itr-<dataset>-<method>` with the eval metrics linked to it.

    model = mlflow.pyfunc.load_model("models:/itr-synthetic-infonce/latest")
    model.predict(pd.DataFrame({"text": ["a red circle left of a blue square"]}))      -> (1, D) float32
    model.predict(pd.DataFrame({"image": [open("x.jpg", "rb").read()]}))               -> (1, D) float32

The model's artifacts: `trained/` (the train stage's `method.json` and `model.pt`: architecture, arguments and
weights, the standardisation statistics among its buffers), `standardisation.npz` (those statistics again, for
readers without torch) and `extractor.json` (the reference of the extractor(s) the method reads: `features` and
`train.guide` as configured; their weights are not copied: a tag or path resolved where the model is loaded, or a
seeded random init). Loading needs the `pipeline` package (this project) installed: the pyfunc class lives here.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
from mlflow.pyfunc import PythonModel

REGISTER_STAGE = "register"  # the stage tag of the run that logs and registers the model


def model_name(dataset: str, method: str) -> str:
    """Returns the registered model's name: `itr-<dataset>-<method>` (characters MLflow rejects become `-`)."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"itr-{dataset}-{method}")


def standardisation(state: dict) -> dict[str, np.ndarray]:
    """Returns the per-dimension input statistics of a method's state dict (buffers named `*_mean` / `*_std`)."""
    return {k: v.float().numpy() for k, v in state.items() if k.endswith(("_mean", "_std")) and v.ndim == 1}


def _images(values) -> list:
    """Returns PIL images of a column of JPEG/PNG bytes, file paths or PIL images."""
    from PIL import Image

    out = []
    for v in values:
        if isinstance(v, (bytes, bytearray, memoryview)):
            out.append(Image.open(io.BytesIO(bytes(v))))
        elif isinstance(v, (str, Path)):
            out.append(Image.open(v))
        else:
            out.append(v)
    return out


class ItrModel(PythonModel):
    """pyfunc of a trained method: `predict(DataFrame)` with a `text` and/or an `image` column (each row gives one
    of them; image: encoded bytes or a path) returns the L2-normalised embeddings (rows, D) float32, in row order.
    Text rows and image rows land in the same joint space (cosine similarity = the method's global score)."""

    _skip_type_hint_validation = True  # the logged signature describes the input, not type hints on `predict`

    def load_context(self, context) -> None:

        from pipeline.config import FeaturesConfig
        from pipeline.search import QueryEncoder, needs_tokens
        from pipeline.stages.train import load_trained

        self.method = load_trained(Path(context.artifacts["trained"]))
        reference = json.loads(Path(context.artifacts["extractor"]).read_text())
        self.encoder = None
        if self.method.source != "shards":
            columns = type(self.method).columns(self.method.args)
            guide = FeaturesConfig(**reference["guide"]) if reference.get("guide") else None
            self.encoder = QueryEncoder(FeaturesConfig(**reference["features"]), guide, needs_tokens(columns))

    def predict(self, context, model_input, params: dict | None = None) -> np.ndarray:
        import pandas as pd
        import torch

        from pipeline.search import embed_images, embed_texts

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        texts = frame["text"] if "text" in frame else pd.Series([None] * len(frame))
        images = frame["image"] if "image" in frame else pd.Series([None] * len(frame))
        is_text = texts.notna().to_numpy()
        if (is_text == images.notna().to_numpy()).any():
            raise ValueError("each row needs exactly one of `text` and `image`")
        parts = {}
        with torch.no_grad():  # never the process-wide switch: the pyfunc may be loaded in a training process
            if is_text.any():
                parts["text"] = embed_texts(self.method, self.encoder, [str(t) for t in texts[is_text]])
            if (~is_text).any():
                parts["image"] = embed_images(self.method, self.encoder, _images(images[~is_text]))
        width = next(iter(parts.values())).shape[1]
        out = np.zeros((len(frame), width), np.float32)
        if "text" in parts:
            out[is_text] = parts["text"]
        if "image" in parts:
            out[~is_text] = parts["image"]
        return out


def _signature(width: int):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("string", "text", required=False), ColSpec("binary", "image", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, width))]))


def _requirements() -> list[str]:
    """The packages the pyfunc imports (pinned to this environment's versions); `pipeline` itself is this project."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in ("mlflow", "torch", "open_clip_torch", "transformers", "numpy", "pandas", "pillow", "pyarrow"):
        try:
            out.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            out.append(package)
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences MLflow's advice while logging the model (no input example: it would load the extractor) and its
    artifact progress bars."""
    import logging

    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    names = ("mlflow.pyfunc", "mlflow.models.model", "mlflow.tracking._model_registry")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous


def find_version(client, name: str, train_fingerprint: str):
    """Returns the registered version of `name` made from the training `train_fingerprint` (None when none is)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return next((v for v in sorted(versions, key=lambda v: -int(v.version))
                 if v.tags.get("itr.fingerprint") == train_fingerprint), None)


def logged_model_id(version) -> str | None:
    """Returns the id of the logged model behind a registered version (tag `itr.model_id`; the sqlite store leaves
    `ModelVersion.model_id` empty, its source is `models:/<id>`)."""
    source = version.source or ""
    return version.tags.get("itr.model_id") or getattr(version, "model_id", None) or (
        source.removeprefix("models:/") if source.startswith("models:/m-") else None)


def register_results(cfg, tracker, results: dict) -> dict | None:
    """Logs the trained method of `results` (the stage results of a chain that ran `eval`) as a pyfunc model in a
    `register` stage run, registers it as `itr-<dataset>-<method>` (a training already registered keeps its
    version) and links the eval metrics to it; returns {"name", "version", "model_id", "run_id", "uri"}, or None
    when the chain did not evaluate a trained method."""
    import mlflow
    import torch

    from pipeline.config import to_dict
    from pipeline.tracking.runs import NOTE, metric_names, stage_run

    if "eval" not in results or "train" not in results:
        return None
    trained, evaluated = results["train"], results["eval"]
    name = model_name(cfg.data.name, cfg.train.method)
    client = mlflow.MlflowClient(tracker.uri)
    existing = find_version(client, name, trained.fingerprint)
    metrics = {k: v for k, v in metric_names(evaluated.info.get("metrics", {})).items() if np.isfinite(v)}
    with stage_run(tracker, REGISTER_STAGE, trained.fingerprint, {"model": {"name": name}},
                   [evaluated.run_id, trained.run_id]) as run_id:
        if existing is not None:
            model_id, version = logged_model_id(existing), existing.version
        else:
            spec = json.loads((trained.path / "method.json").read_text())
            state = torch.load(trained.path / "model.pt", map_location="cpu", weights_only=True)
            with tempfile.TemporaryDirectory() as tmp:
                reference = {"features": to_dict(cfg.features),
                             "guide": to_dict(cfg.train.guide) if cfg.train.guide else None,
                             "method": spec["name"], "train_fingerprint": trained.fingerprint}
                (Path(tmp) / "extractor.json").write_text(json.dumps(reference, indent=2))
                np.savez(Path(tmp) / "standardisation.npz", **standardisation(state))
                width = _embedding_width(trained.path)
                with _quiet():
                    info = mlflow.pyfunc.log_model(
                        name="model", python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                        signature=_signature(width),
                        artifacts={"trained": str(trained.path), "extractor": str(Path(tmp) / "extractor.json"),
                                   "standardisation": str(Path(tmp) / "standardisation.npz")},
                        pip_requirements=_requirements(), registered_model_name=name,
                        tags={"itr.fingerprint": trained.fingerprint, "itr.train_run": trained.run_id})
            model_id = info.model_id
            version = info.registered_model_version
            for key, value in {"itr.model_id": model_id, "itr.fingerprint": trained.fingerprint,
                               "itr.train_run": trained.run_id,
                               "itr.eval_run": evaluated.run_id, "itr.register_run": run_id}.items():
                client.set_model_version_tag(name, str(version), key, value)
            client.update_model_version(name, str(version), description=(
                f"{spec['name']} trained on {cfg.data.name} (train run {trained.run_id}, fingerprint "
                f"{trained.fingerprint}); eval run {evaluated.run_id} on split {cfg.eval.split}: rsum "
                f"{evaluated.info.get('metrics', {}).get('rsum', float('nan')):.1f}"))
        mlflow.log_metrics(metrics, model_id=model_id)  # the eval metrics, linked to the logged model
        mlflow.set_tags({"itr.model": name, "itr.model_version": str(version),
                         NOTE: mlflow.get_run(run_id).data.tags.get(NOTE, "") + f"\n\nRegistered model: [{name} "
                         f"version {version}](#/models/{name}/versions/{version}), `models:/{name}/{version}`."})
    return {"name": name, "version": str(version), "model_id": model_id, "run_id": run_id,
            "uri": f"models:/{name}/{version}"}


def _embedding_width(path: Path) -> int:
    """Returns the width of the trained method's embeddings (one text through `encode_text` would need the
    extractor: read it from the state instead: the last layer of the text head, or the open_clip model's
    `embed_dim`)."""
    spec = json.loads((path / "method.json").read_text())
    args = spec.get("args", {})
    if "embed_dim" in args:
        return int(args["embed_dim"])
    if "model" in spec:  # an open_clip model (a method on shards)
        import open_clip

        from pipeline.features.extractors.openclip import MODEL_CONFIG_DIR

        if str(MODEL_CONFIG_DIR) not in map(str, open_clip.factory._MODEL_CONFIG_PATHS):
            open_clip.add_model_config(MODEL_CONFIG_DIR)
        return int(open_clip.get_model_config(spec["model"])["embed_dim"])
    return -1  # unknown: the signature leaves the width open

