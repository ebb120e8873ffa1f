"""The ``zentrain`` command: ``run`` (train), and more subcommands as they land."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from zentrain.config import ConfigError, load_config
from zentrain.data.corpus import DataError


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="train a config on N local ranks (or in place under torchrun)",
                       description="Train CONFIG (default: the built-in debug GPT config, the "
                                   "same as configs/debug.toml) on --nproc local ranks.")
    p.add_argument("config", nargs="?", help="TOML config file (e.g. configs/deepfm.toml)")
    p.add_argument("--nproc", type=int, default=None,
                   help="local ranks (default: parallel.nproc of the config, 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--run-dir", default=None, help="output dir (default: runs/<model>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --run-dir")
    p.add_argument("--port", type=int, default=None, help="rendezvous port (default: a free one)")
    p.add_argument("--emulate-bandwidth", default=None, metavar="RATE",
                   help="run each rank in its own network namespace with RATE links (e.g. "
                        "1gbit; needs root and iproute2, see docs/netem.md)")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from zentrain import launch, train

    overrides = list(args.overrides)
    if args.nproc is not None:
        if args.nproc < 1:
            raise ConfigError(f"bad --nproc {args.nproc} (allowed: an integer >= 1)")
        overrides.append(f"parallel.nproc={args.nproc}")
    if args.resume:
        overrides.append("checkpoint.resume=true")
    cfg = load_config(args.config, overrides)
    run_dir = Path(args.run_dir) if args.run_dir else train.default_run_dir(cfg)
    train_args = ([args.config] if args.config else []) + [
        a for o in overrides for a in ("--set", o)] + ["--run-dir", str(run_dir)]
    if args.emulate_bandwidth is not None:
        from zentrain.bench.cluster import run_emulated

        return run_emulated(train_args, cfg, run_dir, args.emulate_bandwidth)
    if launch.inside_torchrun():
        return train.main(train_args)
    if args.resume and not (run_dir / "checkpoints" / "latest").is_file():
        raise ConfigError(f"--resume: no committed checkpoint in {run_dir}/checkpoints "
                          "(pass the --run-dir of an earlier run)")
    launch.prepare_data(cfg, cfg.parallel.nproc)
    return launch.launch_local(train_args, cfg.parallel.nproc, run_dir, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zentrain", description="Faster distributed PyTorch "
                                "training: sparse gradient sync, compression, fast recovery.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_run(sub)
    from zentrain import bench

    bench.register(sub)
    for name in ("analyze", "chaos"):  # subcommands that live in their own modules
        try:
            mod = importlib.import_module(f"zentrain.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"zentrain.{name}":
                raise
            continue
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError) as e:
        print(f"zentrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zentrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
