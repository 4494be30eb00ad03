"""`advmoe serve`: `bentoml serve` of the advmoe service, one flag per ServingConfig field. A
flag given sets its ADVMOE_* variable for the server; the others keep the environment's."""
from __future__ import annotations

import argparse

from serving.config import ServingConfig, environment

from .flags import add_dataclass_flags, given_flags

HELP = "serve a BentoML model with the advmoe service (bentoml serve)"
DESCRIPTION = ("Serve an exported model: POST /predict, POST /attack_probe, GET /model_info, /metrics. Every setting "
               "is also an ADVMOE_* environment variable (serving/config.py); a flag given wins.")
SKIP = ("probe_token",)  # a secret: from the environment only, as a command line is visible to every user (ps)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=3000, help="port (default: %(default)s)")
    add_dataclass_flags(parser.add_argument_group("settings (ADVMOE_PROBE_TOKEN: environment only)"), ServingConfig,
                        skip=SKIP, names={"probe_enabled": "--probe"})


def run(args: argparse.Namespace) -> int:
    from serving.launch import exec_serve

    return exec_serve(environment(**given_flags(args, ServingConfig, skip=SKIP)), args.host, args.port)
