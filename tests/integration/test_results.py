"""Using the results of one tiny pipeline run (`itr run`, shared by every test of this module): search (trained
against frozen features, text and image queries, the faiss path), the search page and the MLflow UI in a real
headless Chromium, `itr lineage` and the stage-run descriptions, the registered pyfunc model, the clip-retrieval
export, open_clip_train's sizes.json, and both notebooks executed with nbclient."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONFIG = "jobs/configs/tiny.yaml"
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def demo(ray_cluster, tmp_path_factory):
    """The tiny pipeline run once through `itr run` (parent run, stage descriptions, registered model)."""
    from tests.conftest import TINY_OVERRIDES

    work = tmp_path_factory.mktemp("results") / "w"
    overrides = TINY_OVERRIDES + [f"workdir={work}"]
    assert main(["run", CONFIG, *overrides]) == 0
    return SimpleNamespace(cfg=load_config(CONFIG, overrides), overrides=overrides, work=work)


@pytest.fixture(scope="module")
def searcher(demo):
    from pipeline.search import Searcher

    return Searcher(demo.cfg)


def jpeg_of(searcher, key: str, folder: Path) -> Path:
    path = folder / f"{key}.jpg"
    path.write_bytes(searcher.thumbnail(key))
    return path


def test_a_query_naming_an_images_objects_finds_it_more_often_with_the_trained_model(demo, searcher):
    from pipeline.export import first_captions
    from pipeline.search import Searcher

    frozen = Searcher(demo.cfg, frozen=True, located=searcher.located)
    g = searcher.gallery
    first = first_captions(g.caption_image, len(g.keys))
    queries = [g.caption_text[r] for r in first]  # each image's first caption names its objects
    # the free-text path (extractor -> method) gives the stored caption's embedding
    assert float(searcher._text_query(queries[0])[0][0] @ g.captions[first[0]]) > 0.99

    def found(s) -> int:
        return sum(key in {h.key for h in s.search_text(q, 10)} for key, q in zip(g.keys, queries))

    trained_hits, frozen_hits = found(searcher), found(frozen)
    assert trained_hits > frozen_hits, (trained_hits, frozen_hits)


def test_search_command_and_image_queries(demo, searcher, capsys, tmp_path):
    assert main(["search", CONFIG, "two shapes: a red circle and a blue square", *demo.overrides, "--k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["rank", "score", "key", "first"] and len(lines) == 4
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3"]
    assert all(Path(line.split()[-1]).is_file() and line.split()[-1].endswith(".tar") for line in lines[1:])

    key = searcher.gallery.keys[5]
    by_file = searcher.search_image(str(jpeg_of(searcher, key, tmp_path)), 5)
    by_key = searcher.search_image(key, 5)  # the stored image's embedding: the file takes the same path
    assert [h.row for h in by_file] == [h.row for h in by_key]
    assert main(["search", CONFIG, "--image", str(tmp_path / f"{key}.jpg"), *demo.overrides, "--k", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_a_large_gallery_goes_through_a_cached_faiss_index(demo, searcher):
    from pipeline.search import Searcher

    indexed = Searcher(demo.cfg, exact_max=10, located=searcher.located)
    assert set(indexed.gallery.indexes) == {"images", "captions"}
    assert (indexed.cache_dir / "faiss-images.index").is_file() and indexed.describe().endswith("faiss IVF")
    query = "a small green triangle"
    assert [h.key for h in indexed.search_text(query, 5)] == [h.key for h in searcher.search_text(query, 5)]


# ------------------------------------------------------------------------------------------------ browser
def browser():
    """Returns a headless Chromium driven by chromedriver (Debian's chromium + chromium-driver); skips when they are
    missing, fails with CI=true (`make test` installs them)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        message = "headless Chromium not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not look for drivers online
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000",
                "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def wait_for(driver, predicate, timeout: float = 60.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(predicate)


def test_search_page_in_chromium_renders_thumbnails(demo, searcher, tmp_path):
    from selenium.webdriver.common.by import By

    from pipeline.serve import SearchApp, make_server

    server = make_server(SearchApp(searcher, demo.cfg.tracking_uri), 0)
    assert server.server_address[0] == "127.0.0.1"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    driver = browser()
    try:
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
        box = driver.find_element(By.ID, "q")
        box.send_keys("two shapes: a purple diamond and an orange diamond")
        driver.find_element(By.ID, "go").click()
        wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#hits img.thumb"))
        images = driver.find_elements(By.CSS_SELECTOR, "#hits img.thumb")
        assert len(images) == 10
        wait_for(driver, lambda d: d.execute_script(
            "return [...document.querySelectorAll('#hits img.thumb')].every(i => i.complete && i.naturalWidth > 0)"))
        assert len(driver.find_elements(By.CSS_SELECTOR, ".hit li")) >= 10  # the captions of each hit
        link = driver.find_element(By.CSS_SELECTOR, "a.mlflow").get_attribute("href")
        assert searcher.located.trained.run_id in link
        driver.save_screenshot(str(tmp_path / "search.png"))
        images[0].click()  # image -> captions
        wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#captions li"))
        assert len(driver.find_elements(By.CSS_SELECTOR, "#captions li")) == 10
    finally:
        driver.quit()
        server.shutdown()
    assert (tmp_path / "search.png").read_bytes()[:4] == b"\x89PNG"


def test_mlflow_ui_opens_on_the_runs_table_with_named_runs_and_descriptions(demo, tmp_path):
    """The experiment opens on its runs (not the GenAI traces overview), the parent run is named after the command
    and config, and a stage run's description links its upstream runs."""
    import mlflow
    from selenium.webdriver.common.by import By

    from pipeline.ray_runtime import free_port
    from pipeline.tracking.runs import run_link

    client = mlflow.MlflowClient(demo.cfg.tracking_uri)
    experiment = client.get_experiment_by_name(demo.cfg.tracking.experiment)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    evaluated = client.search_runs([experiment.experiment_id], "tags.`itr.stage` = 'eval'")[0]
    parent = client.get_run(evaluated.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name.startswith("itr run tiny.yaml ")  # the command line: command, config, overrides
    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen([str(mlflow_bin), "server", "--backend-store-uri", demo.cfg.tracking_uri, "--host",
                               "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job runners
    driver = None
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        driver = browser()
        driver.get(f"http://127.0.0.1:{port}/{run_link(experiment.experiment_id)}")  # the links itr writes
        wait_for(driver, lambda d: "itr run tiny.yaml" in d.find_element(By.TAG_NAME, "body").text, 90)
        assert "/runs" in driver.current_url  # the runs table, not the GenAI overview
        driver.find_element(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']").click()  # the tree
        wait_for(driver, lambda d: all(s in d.find_element(By.TAG_NAME, "body").text
                                       for s in ("synth", "shard", "extract", "train", "eval", "register")))
        driver.save_screenshot(str(tmp_path / "mlflow-runs.png"))
        driver.get(f"http://127.0.0.1:{port}/{run_link(experiment.experiment_id, evaluated.info.run_id)}")
        wait_for(driver, lambda d: "Upstream:" in d.find_element(By.TAG_NAME, "body").text, 90)
        links = [a.get_attribute("href") for a in driver.find_elements(By.TAG_NAME, "a")]
        assert any(evaluated.data.tags["itr.upstream"].split(",")[-1] in (h or "") for h in links)
        driver.save_screenshot(str(tmp_path / "mlflow-eval-run.png"))
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started (own process group)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


# ------------------------------------------------------------------------------------------------ lineage, model
def test_lineage_from_the_latest_eval_run_back_to_the_shards(demo, capsys):
    import mlflow

    assert main(["lineage", "latest", *demo.overrides, "--config", CONFIG]) == 0
    text = capsys.readouterr().out
    blocks = text.split("\n\n")
    assert [b.split()[0] for b in blocks] == ["eval", "extract", "train", "shard", "synth"]
    for block in blocks:
        fields = {line.split()[0]: line.split()[1] for line in block.splitlines()[1:]}
        assert Path(fields["output"]).is_dir() and fields["mlflow"].startswith("http://127.0.0.1:5000/#/experiments/")
    assert "input        synthetic-test@" in blocks[0] and "input        synthetic-samples@" in blocks[3]

    client = mlflow.MlflowClient(demo.cfg.tracking_uri)
    children = client.search_runs([client.get_experiment_by_name(demo.cfg.tracking.experiment).experiment_id],
                                  "tags.`itr.stage` != 'pipeline'")
    for run in children:  # every stage run: a description linking its upstream runs, and its output folder
        note = run.data.tags["mlflow.note.content"]
        assert "Upstream: " in note
        if run.data.tags["itr.stage"] != "register":
            assert Path(run.data.tags["itr.output"]).is_dir() and f"Output: `{run.data.tags['itr.output']}`" in note
    evaluated = next(r for r in children if r.data.tags["itr.stage"] == "eval")
    for upstream in evaluated.data.tags["itr.upstream"].split(","):
        assert f"#/experiments/{evaluated.info.experiment_id}/runs/{upstream}?workflowType=machine_learning)" in \
            evaluated.data.tags["mlflow.note.content"]


def test_the_registered_model_loads_with_pyfunc_and_embeds_like_search(demo, searcher, tmp_path):
    import mlflow
    import pandas as pd

    from pipeline.tracking.model import logged_model_id

    client = mlflow.MlflowClient(demo.cfg.tracking_uri)
    mlflow.set_tracking_uri(demo.cfg.tracking_uri)
    (version,) = client.search_model_versions("name = 'itr-synthetic-infonce'")
    assert version.tags["itr.train_run"] == searcher.located.trained.run_id
    linked = {m.key: m.value for m in mlflow.get_logged_model(logged_model_id(version)).metrics}
    metrics = json.loads(next((demo.work / "eval").glob("*/metrics.json")).read_text())
    assert linked["rsum"] == pytest.approx(metrics["rsum"])

    model = mlflow.pyfunc.load_model(f"models:/itr-synthetic-infonce/{version.version}")
    text = "two shapes: a white diamond and a purple triangle"
    key = searcher.gallery.keys[3]
    frame = pd.DataFrame({"text": [text, None], "image": [None, jpeg_of(searcher, key, tmp_path).read_bytes()]})
    out = model.predict(frame)
    assert out.shape == (2, 64) and out.dtype == np.float32
    assert float(out[0] @ searcher._text_query(text)[0][0]) > 0.999
    assert float(out[1] @ searcher.gallery.images[3]) > 0.99  # the decoded JPEG through the extractor


# ------------------------------------------------------------------------------------------------ exports
def test_clip_retrieval_export_reads_back_with_numpy_and_pyarrow(demo, searcher, tmp_path):
    import faiss
    import pyarrow.parquet as pq

    out = tmp_path / "clip-retrieval"
    assert main(["export", CONFIG, *demo.overrides, "--format", "clip-retrieval", "--split", "all",
                 "--out", str(out)]) == 0
    img = [np.load(p) for p in sorted((out / "img_emb").glob("img_emb_*.npy"))]
    txt = [np.load(p) for p in sorted((out / "text_emb").glob("text_emb_*.npy"))]
    meta = [pq.read_table(p).to_pandas() for p in sorted((out / "metadata").glob("metadata_*.parquet"))]
    assert [len(m) for m in meta] == [len(i) for i in img] == [len(t) for t in txt] == [240, 40, 60]
    assert all(a.dtype == np.float16 and a.shape[1] == 64 for a in img + txt)
    assert np.allclose(np.linalg.norm(np.concatenate(img).astype(np.float32), axis=1), 1.0, atol=1e-2)
    test = meta[2]
    assert list(test.columns[:2]) == ["image_path", "caption"] and (test["split"] == "test").all()
    assert test["key"].tolist() == searcher.gallery.keys
    assert np.allclose(img[2].astype(np.float32), searcher.gallery.images, atol=2e-3)
    assert all(c == caps[0] for c, caps in zip(test["caption"], test["captions"]))
    index = faiss.IndexFlatIP(64)  # what autofaiss builds from img_emb/, by row
    index.add(np.concatenate(img).astype(np.float32))
    assert index.ntotal == 340


def test_shard_folders_carry_open_clip_train_sizes(demo):
    from open_clip_train.data import get_dataset_size

    shards = demo.cfg.shard_dir
    assert get_dataset_size(str(shards / "train" / "shard-{000000..000002}.tar")) == (240, 3)
    assert json.loads((shards / "test" / "sizes.json").read_text()) == {"shard-000000.tar": 60}


# ------------------------------------------------------------------------------------------------ notebooks
@pytest.mark.parametrize("notebook", ["lineage.ipynb", "results.ipynb"])
def test_notebooks_execute_against_the_runs(demo, notebook, tmp_path):
    sys.path.insert(0, str(ROOT / "notebooks"))
    try:
        from run import execute
    finally:
        sys.path.pop(0)
    nb = execute(ROOT / "notebooks" / notebook, demo.work, demo.cfg.tracking.experiment, out=tmp_path / notebook)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("data", {}).get("text/plain", "") for o in outputs)
    if notebook == "lineage.ipynb":
        assert all(stage in text for stage in ("eval", "extract", "train", "shard", "synth"))
    else:
        assert "itr-synthetic-infonce" in text and "models:/itr-synthetic-infonce/1" in text
        assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # recall curves, training curve
