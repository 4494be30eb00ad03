"""Which runtime the service runs: the user's (ADVMOE_RUNTIME), else the one the export measured
fastest (export.json's runtime_timing), else onnxruntime for an export without timings; and
/model_info says which and why."""
from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest

from advmoe.runtime_choice import FALLBACK, RuntimeTiming, choose_runtime, read_timing
from serving.config import ServingConfig
from serving.launch import Server
from serving.runtimes import load_runtime
from test_service import probabilities, reference  # the exported model's answers, run here with onnxruntime

PLANTED = {"onnxruntime": [2.0, 9.0, 60.0], "torch": [1.0, 5.0, 40.0], "pt2": [3.0, 12.0, 70.0]}


def plant(folder, fastest_ms: dict[str, list[float]]) -> RuntimeTiming:
    """Record a timing in folder/export.json as export does (its other entries kept)."""
    record = folder / "export.json"
    report = json.loads(record.read_text()) if record.is_file() else {}
    timing = RuntimeTiming(batches=[1, 8, 64], ms=fastest_ms, rounds=5, threads=1, inputs="uniform noise")
    record.write_text(json.dumps({**report, "runtime_timing": timing.to_dict()}))
    return timing


@pytest.fixture
def export_copy(exported_model, tmp_path):
    """The session's exported folder (onnx, pt2, weights; exported without timings), copied."""
    folder = tmp_path / "export"
    shutil.copytree(exported_model.out, folder)
    return folder


def test_the_recorded_fastest_runs_when_no_runtime_is_asked_for(export_copy):
    timing = plant(export_copy, {**PLANTED, "pt2": [0.5, 2.0, 20.0]})
    runtime, choice = load_runtime(export_copy, ServingConfig(threads=1))
    assert (runtime.name, choice.runtime, choice.by) == ("pt2", "pt2", "export_timing")
    assert choice.timing == timing and choice.to_dict()["timing"]["ms"]["pt2"] == [0.5, 2.0, 20.0]


@pytest.mark.parametrize("asked", ["onnxruntime", "torch", "pt2"])
def test_the_users_choice_wins_over_the_record(export_copy, asked):
    plant(export_copy, PLANTED)  # torch is the recorded fastest
    runtime, choice = load_runtime(export_copy, ServingConfig(runtime=asked, threads=1))
    assert (runtime.name, choice.by, choice.timing) == (asked, "user", None)


def test_an_export_without_timings_falls_back_to_onnxruntime(export_copy):
    assert "runtime_timing" not in json.loads((export_copy / "export.json").read_text())
    runtime, choice = load_runtime(export_copy, ServingConfig(threads=1))
    assert (runtime.name, choice.by, FALLBACK) == ("onnxruntime", "fallback", "onnxruntime")
    (export_copy / "export.json").unlink()  # a BentoML model from before export.json was stored in it
    assert choose_runtime("auto", export_copy).runtime == "onnxruntime"


def test_a_recorded_runtime_that_cannot_be_served_is_refused_naming_the_setting(export_copy):
    plant(export_copy, {**PLANTED, "pt2": [0.1, 0.1, 0.1]})
    (export_copy / "model.pt2").unlink()
    with pytest.raises(ValueError, match="'pt2' cannot be served.*ADVMOE_RUNTIME"):
        choose_runtime("auto", export_copy)


def test_the_setting_defaults_to_the_exports_choice():
    assert ServingConfig().runtime == ServingConfig.from_env({}).runtime == "auto"


# -- over HTTP ---------------------------------------------------------------------------------------
def test_model_info_says_an_export_without_timings_runs_onnxruntime_by_default(server):
    info = httpx.get(f"{server.url}/model_info", timeout=10).json()
    assert info["runtime"] == "onnxruntime"
    assert info["runtime_choice"]["by"] == "fallback" and info["runtime_choice"]["timing"] is None


@pytest.fixture
def timed_model(exported_model, tmp_path):
    """A BentoML model of the session's export with a planted timing in which torch is fastest."""
    import bentoml

    stored = bentoml.models.get(exported_model.bento_tag)
    folder = tmp_path / "files"
    shutil.copytree(stored.path, folder)
    timing = plant(folder, PLANTED)
    with bentoml.models.create("advmoe-timed", module="export.bento", labels=stored.info.labels,
                               metadata={**stored.info.metadata, "served_runtime": timing.fastest}) as model:
        for file in folder.iterdir():
            if file.is_file() and file.name != "model.yaml":
                shutil.copyfile(file, model.path_of(file.name))
    assert read_timing(model.path) == timing
    return str(model.tag), timing


def test_the_service_runs_the_recorded_fastest_and_model_info_says_why(timed_model, exported_model, served_images,
                                                                       tmp_path):
    tag, timing = timed_model
    with Server({"ADVMOE_MODEL_TAG": tag, "ADVMOE_THREADS": "1"}, log_path=tmp_path / "serve.log") as server:
        info = httpx.get(f"{server.url}/model_info", timeout=10).json()
        assert (info["runtime"], info["execution"]) == ("torch", "sparse")
        assert info["runtime_choice"]["by"] == "export_timing"
        assert RuntimeTiming.from_dict(info["runtime_choice"]["timing"]) == timing
        response = httpx.post(f"{server.url}/predict", timeout=60,
                              json={"inputs": served_images.tolist(), "top_k": 10, "return_experts": True})
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        expected, routing = reference(exported_model, served_images)
        np.testing.assert_allclose([probabilities(p) for p in predictions], expected, atol=1e-4)
        np.testing.assert_array_equal([p["experts"] for p in predictions], routing)
