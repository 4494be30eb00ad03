"""The `advmoe` command. Each sub-command is a thin wrapper over a function of an application
(training, evaluation, export, serving, clients, benchmarks) that tests call directly. It sits
above the applications, as BentoML's `bentoml_cli` sits beside `bentoml`: the model core
imports none of this."""
from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {"sparse": "benchmarks.bench_sparse", "export": "benchmarks.bench_export",
              "methods": "benchmarks.bench_methods", "serve": "benchmarks.bench_serve", "eval": "benchmarks.bench_eval"}


def cmd_models(args: argparse.Namespace) -> int:
    from advmoe import count_macs, create_model, list_models

    names = list_models(args.pattern)
    if not names:
        raise ValueError(f"no registered model matches {args.pattern!r}; try `advmoe models`")
    print(f"| model | params (M) | MACs per {args.image_size}x{args.image_size} image (G) |\n|---|---|---|")
    for name in names:
        model = create_model(name, image_size=args.image_size)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {name} | {params:.2f} | {count_macs(model, (3, args.image_size, args.image_size)) / 1e9:.3f} |")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from export.api import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out, args.format, force=args.force, name=args.name,
                               opset=args.opset, max_batch_size=args.max_batch_size, execution=args.execution)
    print(f"exported to {result.out}: {', '.join(str(f) for f in result.files)}")
    if result.bento_tag:
        print(f"BentoML model: {result.bento_tag}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.launch import exec_serve

    env = {"ADVMOE_MODEL_TAG": args.model_tag, "ADVMOE_RUNTIME": args.runtime, "ADVMOE_EXECUTION": args.execution}
    if args.probe:
        env["ADVMOE_PROBE_ENABLED"] = "1"
    return exec_serve(env, args.host, args.port)


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from clients.client import Client, ClientError, format_table

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


def cmd_loadtest(args: argparse.Namespace) -> int:
    import contextlib

    from clients.client import ClientError
    from clients.loadtest import run_loadtest

    if args.model_tag:  # start a server of our own, stopped by PID at the end
        from serving.launch import Server

        server = Server({"ADVMOE_MODEL_TAG": args.model_tag, "ADVMOE_RUNTIME": args.runtime},
                        log_path=f"{args.out}/serve.log")
    with server if args.model_tag else contextlib.nullcontext() as running:
        url = running.url if args.model_tag else args.url
        try:
            result = run_loadtest(url, args.concurrency, args.duration, args.max_requests, payload=args.payload,
                                  batch_size=args.batch_size, top_k=args.top_k, inputs=args.inputs,
                                  allow_remote=args.allow_remote,
                                  out_dir=args.out, log=print)
        except ClientError as e:
            print(f"advmoe loadtest: error: {e}", file=sys.stderr)
            return 2
    print(f"report: {args.out}/loadtest.md, {args.out}/loadtest.json")
    if result.errors:
        print(f"advmoe loadtest: {result.errors} requests failed (see the report)", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    return importlib.import_module(BENCHMARKS[args.name]).main(args.args)


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line that says where the help is (not the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="advmoe", description="Robust Mixture-of-Experts CNNs (AdvMoE).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    models = sub.add_parser("models", help="list the registered models with their parameters and MACs")
    models.add_argument("pattern", nargs="?", default="*", help="glob on model names, e.g. 'moe_*'")
    models.add_argument("--image-size", type=int, default=32)
    models.set_defaults(func=cmd_models)

    from . import evaluate, train

    train_parser = sub.add_parser("train", help="train a model (AdvMoE and its baselines); see --preset")
    train.add_arguments(train_parser)
    train_parser.set_defaults(func=train.run)

    eval_parser = sub.add_parser("eval", help="robustness of a checkpoint: PGD, AutoAttack, route-fixed and router "
                                              "attacks, Square, sanity checks; writes eval.json (torchrun shards it)")
    evaluate.add_arguments(eval_parser)
    eval_parser.set_defaults(func=evaluate.run)

    from export.api import CHOICES, FORMAT_HELP

    export = sub.add_parser("export", help="export a checkpoint to ONNX, torch.export, Triton and BentoML")
    export.add_argument("checkpoint", help="checkpoint directory (config.json + model.safetensors)")
    export.add_argument("--format", nargs="+", default=["all"], choices=CHOICES, help=FORMAT_HELP)
    export.add_argument("--out", required=True, help="output directory (must not exist, unless --force)")
    export.add_argument("--force", action="store_true", help="replace an existing output directory")
    export.add_argument("--name", default="advmoe", help="Triton and BentoML model name (default: advmoe)")
    export.add_argument("--opset", type=int, default=18)
    export.add_argument("--max-batch-size", type=int, default=64, help="Triton max_batch_size")
    export.add_argument("--execution", choices=["sparse", "masked"], default="sparse",
                        help="sparse (default) or masked: every expert, then select, as the reference code "
                             "runs; a baseline for `advmoe bench serve`")
    export.set_defaults(func=cmd_export)

    serve = sub.add_parser("serve", help="serve a BentoML model with the advmoe service (bentoml serve)",
                           description="Serve an exported model: POST /predict, POST /attack_probe, GET /model_info, "
                                       "/metrics. More settings: ADVMOE_* environment variables (serving/config.py).")
    serve.add_argument("--model-tag", default="advmoe:latest", help="BentoML model (default: advmoe:latest)")
    serve.add_argument("--runtime", choices=["onnxruntime", "torch", "pt2"], default="onnxruntime")
    serve.add_argument("--execution", choices=["sparse", "masked"], default="sparse", help="torch runtime only")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=3000)
    serve.add_argument("--probe", action="store_true",
                       help="enable /attack_probe (set ADVMOE_PROBE_TOKEN to require a bearer token)")
    serve.set_defaults(func=cmd_serve)

    predict = sub.add_parser("predict", help="classify image files with a running server (see `advmoe serve`)")
    predict.add_argument("images", nargs="+", help="PNG or JPEG files (resized and converted by the server)")
    predict.add_argument("--url", default="http://127.0.0.1:3000", help="the server (default: %(default)s)")
    predict.add_argument("--top-k", type=int, default=1, help="classes per image (default: 1)")
    predict.add_argument("--experts", action="store_true", help="show the expert chosen at each MoE layer")
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")
    predict.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the server to be ready")
    predict.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    predict.set_defaults(func=cmd_predict)

    loadtest = sub.add_parser("loadtest", help="locust load test of a server: throughput, latency, batching, experts",
                              description="Ramp the concurrency against a server and write loadtest.json and "
                                          "loadtest.md: throughput, p50/p95/p99 latency, error rate, mean adaptive "
                                          "batch size and expert usage per level. Bounded in time and requests.")
    target = loadtest.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server (loopback only, unless --allow-remote)")
    target.add_argument("--model-tag", help="start a server of this BentoML model for the test, stop it after")
    loadtest.add_argument("--runtime", choices=["onnxruntime", "torch", "pt2"], default="onnxruntime",
                          help="with --model-tag: the server's runtime")
    loadtest.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64],
                          help="users (requests in flight) per level (default: 1 8 32 64)")
    loadtest.add_argument("--duration", type=float, default=10.0, help="seconds per level (default: 10)")
    loadtest.add_argument("--max-requests", type=int, default=None, help="at most this many requests per level")
    loadtest.add_argument("--payload", choices=["images", "npy", "json"], default="images",
                          help="PNG files, a .npy tensor or a JSON array (default: images)")
    loadtest.add_argument("--batch-size", type=int, default=1, help="inputs per request (default: 1)")
    loadtest.add_argument("--inputs", help="a .npy [N, C, H, W] in [0, 1] to send in turn (e.g. test images; "
                                           "routing depends on them); default: uniform noise")
    loadtest.add_argument("--top-k", type=int, default=1)
    loadtest.add_argument("--allow-remote", action="store_true", help="allow a server on another host")
    loadtest.add_argument("--out", default="reports/loadtest", help="report folder (default: %(default)s)")
    loadtest.set_defaults(func=cmd_loadtest)

    bench = sub.add_parser("bench", help="speed benchmarks: `advmoe bench sparse --help`")
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the benchmark")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (2) or --help (0): callers get the code, as from a command
        return e.code
    try:
        return args.func(args)
    # A user's mistake is one line; anything else (TypeError included) is a bug and keeps its traceback.
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"advmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # e.g. an export whose parity check failed: nothing was written
        print(f"advmoe {args.command}: failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
