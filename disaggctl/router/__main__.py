"""`python -m disaggctl.router --config FILE`: run the builtin P/D router (what compile emits)."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m disaggctl.router", description="disaggctl's builtin P/D router")
    p.add_argument("--config", required=True, help="router JSON written by `disaggctl compile` (router.json)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from disaggctl.router.config import ConfigError, load_router_config

    try:
        cfg = load_router_config(args.config)
    except OSError as e:
        sys.stderr.write(f"error: cannot read router config {args.config}: {e.strerror}\n")
        return 2
    except ConfigError as e:
        lines = [f"  {p}" for p in e.problems]
        sys.stderr.write(f"error: invalid router config {args.config}:\n" + "\n".join(lines) + "\n")
        return 2
    from disaggctl.router.server import serve

    try:
        serve(cfg)
    except RuntimeError as e:  # a setup problem (missing pyzmq, tokenizer): say it, no traceback
        sys.stderr.write(f"error: {e}\n")
        return 1
    except OSError as e:
        sys.stderr.write(f"error: router cannot listen on {cfg.bind}:{cfg.port}: {e.strerror or e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
