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
    p.add_argument("--nproc", "--nproc-per-node", dest="nproc", type=int, default=None,
                   help="local ranks, per node (default: parallel.nproc of the config, 2)")
    p.add_argument("--nodes", type=int, default=1,
                   help="emulated nodes, each with its own elastic agent, checkpoint agent and "
                        "network namespace where available (see docs/recovery.md)")
    p.add_argument("--loopback", action="store_true",
                   help="with --nodes: run every node on loopback even when network "
                        "namespaces are available")
    p.add_argument("--max-restarts", type=int, default=None,
                   help="worker restarts after a failure (checkpoint.max_restarts, default 3)")
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
    if args.max_restarts is not None:
        overrides.append(f"checkpoint.max_restarts={args.max_restarts}")
    if args.nodes < 1:
        raise ConfigError(f"bad --nodes {args.nodes} (allowed: an integer >= 1)")
    cfg = load_config(args.config, overrides)
    train.check_compression(cfg)  # a typo'd parameter pattern fails here, not in every rank
    if not launch.inside_torchrun():  # (in place, each worker checks for itself)
        # A layout NCCL cannot run fails here, once, before any worker starts.
        launch.check_device_layout(cfg, cfg.parallel.nproc, cfg.parallel.nproc * args.nodes)
        launch.maybe_set_cublas_workspace(cfg)  # inherited by every worker
    run_dir = Path(args.run_dir) if args.run_dir else train.default_run_dir(cfg)
    train_args = ([args.config] if args.config else []) + [
        a for o in overrides for a in ("--set", o)] + ["--run-dir", str(run_dir)]
    if launch.inside_torchrun() and args.nodes == 1 and args.emulate_bandwidth is None:
        return train.main(train_args)
    if args.resume and not (run_dir / "checkpoints" / "latest").is_file():
        raise ConfigError(f"--resume: no committed checkpoint in {run_dir}/checkpoints "
                          "(pass the --run-dir of an earlier run)")
    if cfg.checkpoint.resume:  # a bad `latest` fails here once, not in every worker
        from zentrain.ckpt.persistent import latest_step

        try:
            latest_step(run_dir)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if args.nodes > 1:
        return _run_nodes(args, cfg, run_dir, train_args)
    if args.emulate_bandwidth is not None:
        from zentrain.bench.cluster import run_emulated

        if args.port is not None:
            raise ConfigError(f"--port {args.port} with --emulate-bandwidth: the emulated "
                              "cluster picks its own rendezvous address (omit --port)")
        return run_emulated(train_args, cfg, run_dir, args.emulate_bandwidth)
    from zentrain import nodes
    from zentrain.zygote import Zygote

    job = nodes.new_job_id()
    # Restarted workers are forked from a preloaded zygote (see zentrain/zygote.py); it
    # imports torch while the data caches are prepared.
    zygote = Zygote.start(job) if cfg.checkpoint.max_restarts > 0 else None
    agents = None
    try:
        launch.prepare_data(cfg, cfg.parallel.nproc)
        agents = nodes.start_single_node_agents(cfg, job, cfg.parallel.nproc, run_dir)
        nodes.record_elastic_events(run_dir / "elastic-node0.jsonl")
        worker_args = zygote.worker_args(train_args) if zygote and zygote.wait_ready() else None
        return launch.launch_local(train_args, cfg.parallel.nproc, run_dir, port=args.port,
                                   max_restarts=cfg.checkpoint.max_restarts,
                                   env={"ZENTRAIN_CKPT_JOB": job, **(agents.env(0) if agents
                                                                     else {})},
                                   worker_args=worker_args)
    finally:
        if agents is not None:
            agents.stop()
        if zygote is not None:
            zygote.stop()


def _run_nodes(args: argparse.Namespace, cfg, run_dir: Path, train_args: list[str]) -> int:
    from zentrain import launch
    from zentrain.nodes import run_nodes

    if launch.inside_torchrun():
        raise ConfigError("--nodes starts its own elastic agents; run it outside torchrun")
    launch.prepare_data(cfg, args.nodes * cfg.parallel.nproc)
    return run_nodes(train_args, cfg, run_dir, args.nodes, cfg.parallel.nproc,
                     loopback=args.loopback, rate=args.emulate_bandwidth)


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
