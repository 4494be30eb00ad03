"""Shared helpers: small models (a fraction of the paper's width) that run fast on 2 cores."""
from __future__ import annotations

import copy
import functools
import os
import tempfile

import pytest
import torch

import advmoe
from advmoe.calibrate import balance_routing, calibrate_batchnorm

# The tests' BentoML model store: never the user's ~/bentoml. Set before anything imports bentoml.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="advmoe-tests-bentoml-")

SMALL_WIDTH = 0.25
MOE_MODELS = advmoe.list_models(moe=True)
ALL_MODELS = advmoe.list_models()
ROUTERS = ("shared", "per_layer")


def model_variants(names=ALL_MODELS):
    """(name, router) pairs: every dense model once, every MoE model with each router."""
    return [(n, r) for n in names for r in (ROUTERS if advmoe.is_moe_model(n) else (None,))]


def variant_id(value) -> str:
    return "dense" if value is None else str(value)


def small_model(name: str, router: str | None = None, **config) -> advmoe.MoENet:
    config.setdefault("width", SMALL_WIDTH)
    if router is not None:
        config["router"] = router
    return advmoe.create_model(name, **config)


@functools.lru_cache(maxsize=None)
def _calibrated(name: str, router: str | None, top_k: int, image_size: int, seed: int) -> advmoe.MoENet:
    torch.manual_seed(seed)
    extra = {"top_k": top_k} if top_k > 1 else {}
    model = small_model(name, router, image_size=image_size, **extra)
    x = torch.rand(64, 3, image_size, image_size)
    calibrate_batchnorm(model, x)
    if router is not None:
        balance_routing(model, x)
    return model


def calibrated_model(name: str, router: str | None = None, top_k: int = 1, image_size: int = 32, seed: int = 0):
    """A small model with realistic BatchNorm statistics and routers that split a random batch
    evenly (eval mode, masked execution); a fresh copy each call, so tests may change it."""
    return copy.deepcopy(_calibrated(name, router, top_k, image_size, seed))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
