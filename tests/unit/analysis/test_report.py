"""Suite outputs: JSON, a real PNG with labelled axes and legend, report.md sections in order."""

from __future__ import annotations

import json

import pytest

from oppu.analysis.report import SuiteResult, grouped_bars, lines, save_suite
from oppu.analysis.runs import load_run_config, sub_run
from oppu.analysis.suites import MODULES, suite_names
from oppu.errors import ConfigError


def test_suites_write_json_png_and_report_sections_in_paper_order(tmp_path):
    figure = lines([0, 1, 2], {"RAG": [0.1, 0.2, 0.3]}, title="t", xlabel="k", ylabel="accuracy")
    assert figure.axes[0].get_xlabel() == "k" and figure.axes[0].get_legend() is not None
    save_suite(str(tmp_path), SuiteResult("k-sweep", "K sweep", "k table", {"series": [1]}), figure)
    bars = grouped_bars(["acc"], {"OPPU": [0.5], "RAG": [0.4]}, title="t", xlabel="m", ylabel="accuracy")
    written = save_suite(str(tmp_path), SuiteResult("behaviour-shift", "Shift", "shift table"), bars)
    record = json.loads((tmp_path / "analysis" / "k-sweep.json").read_text())
    assert record["series"] == [1] and record["plot"] == "k-sweep.png"
    assert (tmp_path / "analysis" / "behaviour-shift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "analysis" / "report.md").read_text()
    assert written["report"].endswith("report.md")
    assert report.index("## Shift (`behaviour-shift`)") < report.index("## K sweep (`k-sweep`)")
    assert "![k-sweep](k-sweep.png)" in report and "shift table" in report


def test_suite_names_and_run_config(tmp_path):
    assert suite_names("all") == list(MODULES) and len(MODULES) == 7
    with pytest.raises(ConfigError, match="unknown suite"):
        suite_names("nope")
    with pytest.raises(ConfigError, match="not a run directory"):
        load_run_config(str(tmp_path))


def test_sub_runs_see_the_main_bases(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text("{}")
    for name in ("base", "base-rag", "pretrained"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(name)
    cfg = load_run_config(str(tmp_path), overrides=["users.actors=1"])
    sub = sub_run(cfg, "k-sweep", store=cfg.store_uri)
    assert sub.run_dir == f"{tmp_path}/analysis/k-sweep" and sub.store_uri == cfg.store_uri
    assert sub.data_uri == f"{tmp_path}/analysis/k-sweep/data" and sub.users.actors == 1
    assert (tmp_path / "analysis" / "k-sweep" / "base-rag" / "config.json").read_text() == "base-rag"
    lone = sub_run(cfg, "activity", link_bases=(), link_pretrained=False)
    assert not (tmp_path / "analysis" / "activity" / "base").exists()
    assert lone.store_uri == f"{tmp_path}/analysis/activity/adapters"
