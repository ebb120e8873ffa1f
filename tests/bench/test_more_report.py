"""``bench report`` on ``bench data`` and ``bench compress`` results: sections and verdicts."""

import json

from zentrain.bench import report


def _worker(w, stall, ratio):
    return {"workers": w, "loader_samples_per_s": 1000.0 * ratio, "ratio_to_consumption": ratio,
            "stall_fraction": stall, "max_wait_s": 0.001, "wait_cpu_fraction": stall / 2,
            "median_wait_s": 0.0004, "mean_wait_s": 0.0005, "memory_bytes": 2**20}


def _data(stall2):
    res = [{"config": name, "rank_samples_per_step": 8, "train_step_s": 0.5,
            "consumption_samples_per_s": 16.0,
            "workers": [_worker(1, 0.001, 40.0), _worker(2, stall, 9.0)]}
           for name, stall in (("gpt", 0.002), ("deepfm", stall2))]
    return {"kind": "bench data", "command": "zentrain bench data --steps 20", "results": res,
            "targets": {"stall_fraction_max": 0.01, "throughput_ratio_min_2_workers": 5.0},
            "machine": {"cores": 2, "cpu_model": "Xeon", "torch": "2.13.0+cpu",
                        "load_avg": [0.5, 0.5, 0.5]}}


def _compress():
    m = {"bytes_per_step": 1e6, "bytes_ratio_vs_none": 0.04, "step_time_s": 2.0,
         "final_loss": 4.5, "loss_ratio_vs_none": 1.02, "eval_loss": 4.9,
         "time_to_target_s": 900.0, "steps_to_target": 450,
         "time_to_target_speedup_vs_ddp": 1.1}
    return {"config": {"command": "zentrain bench compress --steps 500", "steps": 500,
                       "date": "2026-11-22T08:00:00", "wall_time_s": 3600},
            "machine": {"cores": 2, "cpu_model": "Xeon", "torch": "2.13.0+cpu"},
            "world": 4, "bandwidth": "1gbit", "reference": "none", "baseline": "ddp",
            "target_loss": 4.6, "target_source": "none x 1.03",
            "methods": {"none": dict(m, bytes_ratio_vs_none=1.0), "topk": m,
                        "sign": {"error": "rank 1 exited with code 1"}},
            "targets": [{"target": "top-k: loss within 3%", "method": "topk", "measured": 1.02,
                         "required": 1.03, "met": True, "setting": []},
                        {"target": "best: 2x ddp", "method": "topk", "measured": 1.1,
                         "required": 2.0, "met": False, "setting": ["steps 500"]}]}


def test_data_and_compress_sections_with_their_verdicts(tmp_path):
    (tmp_path / "data.json").write_text(json.dumps(_data(stall2=0.02)))
    (tmp_path / "compress.json").write_text(json.dumps(_compress()))
    md = tmp_path / "b.md"
    assert report.main([str(tmp_path / "data.json"), str(tmp_path / "compress.json"),
                        "--out", str(md)]) == 0
    text = md.read_text()
    data = text[text.index("## Data loading"):]
    assert "| deepfm: data_wait ≤ 1.00% of the step | 2.00% | **no** |" in data
    assert "| gpt: data_wait ≤ 1.00% of the step | 0.20% | yes |" in data
    assert "| deepfm: loader ≥ 5× consumption | 9.0× | yes |" in data
    comp = text[text.index("## Gradient compression"):text.index("## Data loading")]
    assert "| `topk` | 1.00 MB | 0.040 |" in comp and "rank 1 exited with code 1" in comp
    assert "| best: 2x ddp | `topk` | 1.100 | 2 | **no** | steps 500 |" in comp
    assert "[Data loading](#data-loading-zentrain-bench-data)" in text


def test_an_empty_data_result_is_not_taken_for_one(tmp_path):
    bad = _data(0.0)
    bad["results"] = []
    (tmp_path / "x.json").write_text(json.dumps(bad))
    assert report.main([str(tmp_path / "x.json"), "--out", str(tmp_path / "b.md")]) == 2
