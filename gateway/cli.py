"""``tierfl gateway ...``: run a gateway on an edge server, and make its initial model.

Building the parser imports nothing beyond the standard library, so ``tierfl
--help`` stays fast and an edge server without torch can build it; each
handler imports what it needs. ``python -m gateway.cli serve --config FILE``
is the same command without the ``tierfl`` entry point.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_gateway_parser", "cmd_gateway_init_model", "cmd_gateway_serve", "main"]

_LOG_LEVELS = ("debug", "info", "warning", "error")


def add_gateway_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``gateway`` with ``serve`` and ``init-model`` (handlers set ``func``)."""
    gw = subparsers.add_parser(
        "gateway",
        help="run an edge gateway (CoAP/MQTT intake, metrics, rounds)",
        description="Run a tierfl edge gateway, or write the initial model it serves.",
    )
    _add_commands(gw)
    return gw


def _add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="gateway_command", required=True, metavar="{serve,init-model}")
    serve = sub.add_parser(
        "serve",
        help="serve devices over CoAP and/or MQTT until SIGTERM/SIGINT",
        description=(
            "Serve one gateway from a TOML config: CoAP and/or MQTT listeners, the device "
            "registry, the Prometheus /metrics endpoint, and rounds -- run locally from the "
            "[rounds] table (each closed round's partial aggregate is written as .npz), or by "
            "the cloud through a Ray actor (--ray-address). SIGTERM/SIGINT stop it gracefully "
            "(exit 0). Exit 2: bad config (the message names the key); exit 1: could not start "
            "(port in use, broker or Ray cluster unreachable). See deploy/gateway.toml."
        ),
    )
    serve.add_argument(
        "--config", required=True, type=Path, metavar="FILE", help="gateway TOML file"
    )
    serve.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="join this Ray cluster ('auto', 'HOST:PORT') and register the actor "
        "'gateway:<id>' through which the cloud publishes models and closes rounds "
        "(the local round driver is then off)",
    )
    serve.add_argument(
        "--ray-namespace",
        default=None,
        metavar="NS",
        help="Ray namespace of that actor (default: tierfl)",
    )
    serve.add_argument(
        "--log-level", choices=_LOG_LEVELS, default="info", help="log level (logs go to stderr)"
    )
    serve.set_defaults(func=cmd_gateway_serve)

    init = sub.add_parser(
        "init-model",
        help="write a freshly initialized model as .npz (needs torch)",
        description=(
            'Write the initial model for rounds.model = "FILE.npz": one array per tensor, '
            "initialized like `tierfl emulate` does. Run it where torch is installed and copy "
            "the file to the edge server (which then needs no torch)."
        ),
    )
    init.add_argument(
        "--dataset", required=True, choices=("har", "fashion", "digits"), help="workload"
    )
    init.add_argument(
        "--model",
        choices=("mlp", "cnn1d", "cnn2d"),
        default=None,
        help="model (default: cnn1d for har, cnn2d for fashion, mlp for digits)",
    )
    init.add_argument("--seed", type=int, default=0, help="initialization seed")
    init.add_argument("-o", "--out", required=True, type=Path, metavar="FILE", help="output .npz")
    init.set_defaults(func=cmd_gateway_init_model)


def cmd_gateway_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from gateway.serve import serve

    return serve(args.config, ray_address=args.ray_address, ray_namespace=args.ray_namespace)


def cmd_gateway_init_model(args: argparse.Namespace) -> int:
    from gateway.config import ConfigError
    from gateway.rounds import init_model, save_model

    if args.seed < 0:
        print(f"error: --seed: must be >= 0, got {args.seed}", file=sys.stderr)
        return 2
    if args.out.suffix.lower() != ".npz":
        print(f"error: --out: expected a .npz file name, got {args.out}", file=sys.stderr)
        return 2
    try:
        source = init_model(args.model, args.dataset, args.seed)
        path = save_model(args.out, source)
    except ConfigError as e:
        print(f"error: {str(e).removeprefix('rounds.model: ')}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(
        f"wrote {path}: {source.origin}, {source.num_params} parameters in "
        f"{len(source.shapes)} tensors"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.cli", description="The `tierfl gateway` commands."
    )
    _add_commands(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
