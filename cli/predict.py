"""`advmoe predict IMAGE...`: classify image files with a running server (`clients.client.Client`)."""
from __future__ import annotations

import argparse
import json
import sys

from clients.client import DEFAULT_URL, Client

from .flags import default_of

HELP = "classify image files with a running server (see `advmoe serve`)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="PNG or JPEG files (resized and converted by the server)")
    parser.add_argument("--url", default=DEFAULT_URL, help="the server (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=default_of(Client.predict, "top_k"),
                        help="classes per image (default: %(default)s)")
    parser.add_argument("--experts", action="store_true", help="show the expert chosen at each MoE layer")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    # Shorter than the client's own wait: a person at a terminal would rather hear soon that nothing answers.
    parser.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the server to be ready "
                                                                 "(default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=default_of(Client, "timeout_s"),
                        help="seconds per request (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from clients.client import ClientError, format_table

    try:
        with Client(args.url, ready_timeout_s=args.wait, timeout_s=args.timeout) as client:
            predictions = client.predict(args.images, top_k=args.top_k, experts=args.experts)
    except ClientError as e:
        print(f"advmoe predict: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"url": client.url, "model": client.model_info.tag,
                          "predictions": [p.to_dict() for p in predictions]}, indent=2))
    else:
        print(format_table(predictions))
    return 0
