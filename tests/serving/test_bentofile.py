"""`bentoml build` packs the service with the model it serves."""
from __future__ import annotations

import os
import subprocess
import sys

import bentoml

from serving.launch import ROOT


def test_bentoml_build_packs_the_service_code_and_the_model(exported_model):
    env = {**os.environ, "ADVMOE_MODEL_TAG": exported_model.bento_tag}
    result = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    bento = bentoml.get(tag)
    models = [str(m.tag) for service in bento.info.services for m in service.models]
    assert models == [exported_model.bento_tag]
    assert (bento.path_of("src/serving/service.py") and os.path.isfile(bento.path_of("src/serving/service.py")))
    assert not os.path.exists(bento.path_of("src/training"))  # the service needs only advmoe/ and serving/
