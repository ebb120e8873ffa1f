"""Through the trainer: metrics.jsonl alone shows a resume at another world size continues
with exactly the samples of the uninterrupted run."""

import json

import numpy as np
import pytest

from zentrain.config import Config, SourceConfig
from zentrain.testing import run_ranks

pytestmark = pytest.mark.slow


def _train(rank, world, cfg, run_dir):
    from zentrain.train import run

    run(cfg, run_dir)


def tiny_gpt(tmp_path, steps, resume=False):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        path = tmp_path / f"{name}.bin"
        if not path.exists():
            rng.integers(0, 256, 3000, dtype=np.uint16).tofile(path)
    cfg = Config()
    cfg.model.vocab_size, cfg.model.seq_len = 256, 16
    cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head = 1, 32, 2
    cfg.data.sources = [SourceConfig(path=str(tmp_path / "a.bin"), weight=3.0),
                        SourceConfig(path=str(tmp_path / "b.bin"), weight=1.0)]
    cfg.data.num_workers, cfg.data.eval_fraction = 1, 0.05
    cfg.train.batch_size, cfg.train.steps, cfg.train.eval_every = 4, steps, 0
    cfg.train.eval_batches, cfg.train.threads = 1, 1
    cfg.metrics.progress = False
    cfg.checkpoint.resume = resume
    return cfg


def rows(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "batch_digest" in r]


def test_resume_on_fewer_ranks_continues_the_sample_stream(tmp_path):
    run_ranks(_train, 2, tiny_gpt(tmp_path, 6), tmp_path / "full", timeout=150)
    full = rows(tmp_path / "full")
    assert [r["step"] for r in full] == list(range(1, 7))
    assert all(sum(r["mixture"].values()) == 8 for r in full)  # 4 per rank x 2 ranks
    assert all(r["mixture"] == {"a": 6, "b": 2} for r in full)  # 3:1 of 8, exactly
    run_ranks(_train, 2, tiny_gpt(tmp_path, 3), tmp_path / "cut", timeout=150)
    run_ranks(_train, 1, tiny_gpt(tmp_path, 6, resume=True), tmp_path / "cut", timeout=150)
    cut = rows(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(1, 7))
    assert [r["batch_digest"] for r in cut] == [r["batch_digest"] for r in full]
    assert [r["mixture"] for r in cut] == [r["mixture"] for r in full]
    assert all(r["data_mem_bytes"] > 0 for r in cut)
