"""End-to-end: the ``zentrain`` command as a user runs it (2 local ranks, real launcher)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Small text settings so each run builds its tokenizer in seconds; the cache is shared.
SMALL_GPT = ["--set", "data.max_bytes=1500000", "--set", "model.vocab_size=1024",
             "--set", "model.n_layer=2", "--set", "model.d_model=64", "--set", "model.n_head=2",
             "--set", "model.seq_len=64", "--set", "train.batch_size=8",
             "--set", "train.eval_batches=2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def zentrain(*args, cwd, cache=None, timeout=900):
    env = dict(os.environ, CI="1")
    extra = ["--set", f"data.cache_dir={cache}"] if cache else []
    cmd = [sys.executable, "-m", "zentrain.cli", *args]
    if args and args[0] == "run":
        cmd += extra
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_debug_config_five_steps(tmp_path, cache):
    """The quickstart command with the shipped default config, shortened to 5 steps."""
    r = zentrain("run", str(ROOT / "configs" / "debug.toml"), "--set", "train.steps=5",
                 "--run-dir", "out", cwd=tmp_path, cache=cache)
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "out"
    steps = [x for x in rows(run) if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4, 5]
    for key in ("lr", "step_time_s", "data_wait_s", "forward_s", "backward_s", "sync_s",
                "optimizer_s", "tokens_per_s", "sync_bytes_sent", "peak_mem_bytes"):
        assert key in steps[-1], key
    assert steps[-1]["sync_bytes_sent"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 5
    assert "eval_loss" in summary["eval"]
    assert (run / "config.json").is_file() and (run / "checkpoints" / "latest").is_file()
    assert "sync bytes sent" in r.stdout  # the summary table


def test_run_deepfm_five_steps(tmp_path):
    r = zentrain("run", str(ROOT / "configs" / "deepfm.toml"), "--set", "train.steps=5",
                 "--set", "model.rows_per_field=2000", "--run-dir", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["unit"] == "samples" and {"auc", "log_loss"} <= set(summary["eval"])


def test_resume_continues_the_loss_curve(tmp_path, cache):
    const_lr = ["--set", "train.warmup_steps=0", "--set", "train.min_lr_ratio=1.0",
                "--set", "train.eval_every=0"]
    full = zentrain("run", *SMALL_GPT, *const_lr, "--set", "train.steps=6", "--run-dir", "full",
                    cwd=tmp_path, cache=cache)
    assert full.returncode == 0, full.stderr
    first = zentrain("run", *SMALL_GPT, *const_lr, "--set", "train.steps=3", "--run-dir", "part",
                     cwd=tmp_path, cache=cache)
    assert first.returncode == 0, first.stderr
    again = zentrain("run", *SMALL_GPT, *const_lr, "--set", "train.steps=6", "--run-dir", "part",
                     "--resume", cwd=tmp_path, cache=cache)
    assert again.returncode == 0, again.stderr
    want = [x["loss"] for x in rows(tmp_path / "full") if "loss" in x]
    steps = [x for x in rows(tmp_path / "part") if "loss" in x]
    got = [x["loss"] for x in steps]
    assert [x["step"] for x in steps] == [1, 2, 3, 4, 5, 6]
    assert got == want  # bit-identical continuation (CPU, same thread counts)
    # The summary covers the whole run (steps 3-6 after the two warm-up steps), not only
    # the steps of the resumed launch.
    summary = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["steps_measured"] == 4
    mean = sum(x["step_time_s"] for x in steps[2:]) / 4
    assert summary["step_time_s"] == pytest.approx(mean, rel=1e-9)
    assert summary["final_train_loss"] == got[-1]


@pytest.mark.parametrize("args,match", [
    (["--set", "train.stepz=5"], "unknown config key train.stepz"),
    (["--set", "sync.scheme=fast"], "bad value for sync.scheme: 'fast'"),
    (["--nproc", "0"], "bad --nproc 0"),
    (["--set", 'data.paths=["/no/such/file.txt"]'], "data path not found: /no/such/file.txt"),
    (["--resume", "--run-dir", "nothing-here"], "no committed checkpoint"),
    # compression patterns are checked on a meta-device model before any worker starts
    (["--set", "sync.compress=topk", "--set", "compress.error_feedback_params=heads.*"],
     "compress.error_feedback_params pattern 'heads.*' matches no compressed parameter"),
    (["--set", "sync.compress=topk", "--set", "compress.method_for=block.*=powersgd"],
     "compress.method_for pattern 'block.*' (=powersgd) matches no weight matrix"),
])
def test_bad_input_is_a_one_line_error(tmp_path, args, match):
    r = zentrain("run", *args, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("zentrain: error:")]
    assert len(lines) == 1 and match in lines[0], r.stderr


def test_a_corrupt_latest_pointer_is_a_one_line_error(tmp_path):
    (tmp_path / "old" / "checkpoints" / "step_000004").mkdir(parents=True)
    (tmp_path / "old" / "checkpoints" / "latest").write_text("four")
    r = zentrain("run", "--resume", "--run-dir", "old", cwd=tmp_path)
    lines = [x for x in r.stderr.splitlines() if x.startswith("zentrain: error:")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "latest holds 'four', not a step number" in lines[0]


def test_empty_corpus_and_too_many_ranks(tmp_path, cache):
    (tmp_path / "empty.txt").write_text("")
    r = zentrain("run", "--set", 'data.paths=["empty.txt"]', cwd=tmp_path, cache=cache)
    assert r.returncode == 2 and "zentrain: error:" in r.stderr, r.stderr
    words = [f"w{i * 7919 % 1000}" for i in range(400)]  # ~1k tokens: enough for 1 rank
    (tmp_path / "tiny.txt").write_text(" ".join(words))
    r = zentrain("run", "--nproc", "8", "--set", 'data.paths=["tiny.txt"]',
                 "--set", "model.vocab_size=300", "--set", "model.seq_len=128",
                 "--set", "data.eval_fraction=0.5", cwd=tmp_path, cache=cache)
    assert r.returncode == 2 and "--nproc 8" in r.stderr, r.stderr


def test_port_in_use_is_reported(tmp_path, cache):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = zentrain("run", *SMALL_GPT, "--port", str(port), cwd=tmp_path, cache=cache)
    assert r.returncode == 2 and f"port {port} is in use" in r.stderr, r.stderr


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, cache):
    r = zentrain("run", *SMALL_GPT, "--set", "train.steps=2", "--run-dir", "out", cwd=tmp_path,
                 cache=cache)
    assert r.returncode == 0, r.stderr
    root = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002"]
    # lr 1e38: step 3 (the first after the resume) has a finite loss but leaves huge weights,
    # so step 4's loss is NaN while step 3's async save (checkpoint.every=1) is in flight.
    r = zentrain("run", *SMALL_GPT, "--set", "train.steps=6", "--set", "train.lr=1e38",
                 "--set", "train.grad_clip=0", "--set", "train.warmup_steps=0",
                 "--set", "checkpoint.every=1", "--run-dir", "out", "--resume",
                 cwd=tmp_path, cache=cache)
    assert r.returncode == 3, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("zentrain: error:")]
    assert len(errors) == 1 and "non-finite loss nan at step 4" in errors[0], r.stderr
    assert "continues from step 3" in errors[0], r.stderr
    # Exit code 3 stops the job at once: no restart rounds (which would log these).
    assert "not restarting" not in r.stderr and "exitcode" not in r.stderr, r.stderr
    # The save in flight was committed (not left as step_000003.tmp), step 2 kept too.
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002", "step_000003"]
    assert (root / "latest").read_text().strip() == "3"
    assert [x["step"] for x in rows(tmp_path / "out") if "loss" in x] == [1, 2, 3]


def test_sparse_embedding_on_one_rank(tmp_path, cache):
    """Sparse COO gradients (not synced on one rank) reach the optimizer as dense ones."""
    r = zentrain("run", *SMALL_GPT, "--nproc", "1", "--set", "model.sparse_embedding=true",
                 "--set", "train.steps=2", "--set", "checkpoint.max_restarts=0",
                 "--run-dir", "out", cwd=tmp_path, cache=cache)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["steps"] == 2


def test_in_place_under_torchrun_with_ddp_sparse(tmp_path, cache):
    """The documented multi-node entry point, on one node: plain torchrun runs the trainer
    in place (no zentrain launcher). ``ddp`` leaves sparse embedding gradients sparse
    (gloo's sparse all-reduce), which the optimizer must still take."""
    env = dict(os.environ, CI="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "2", "-m", "zentrain.train", str(ROOT / "configs" / "debug.toml"),
           *SMALL_GPT, "--set", "train.steps=3", "--set", f"data.cache_dir={cache}",
           "--set", "sync.scheme=ddp", "--set", "model.sparse_embedding=true",
           "--run-dir", "out"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "out"
    assert [x["step"] for x in rows(run) if "loss" in x] == [1, 2, 3]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sync"] == "ddp" and summary["steps"] == 3
    assert summary["ranks_agree"] is True  # bit-identical parameters on both ranks
    assert sorted(p.name for p in (run / "pids").iterdir()) == ["rank0.json", "rank1.json"]
