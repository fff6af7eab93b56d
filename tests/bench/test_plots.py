"""The serving plots say what they show: a title with the workload and the date, a legend on every panel,
and the throughput plot for a single concurrency level too."""

from __future__ import annotations

from ember.bench.serving.client import RequestRecord
from ember.bench.serving.config import BenchConfig, WorkloadConfig
from ember.bench.serving.metrics import compute_metrics
from ember.bench.serving.plots import latency_cdf_figure, throughput_figure
from ember.bench.serving.report import save_results
from ember.bench.serving.runner import BenchResult


def _result(concurrency: int | None, kind: str = "shared-prefix") -> BenchResult:
    records = [
        RequestRecord(f"r{i}", "m", ttft=0.1 + i / 100, itl=[0.02, 0.03], e2el=0.15 + i / 100, output_tokens=3,
                      input_tokens=8, num_chunks=3)
        for i in range(5)
    ]  # fmt: skip
    config = BenchConfig(
        base_url="http://127.0.0.1:1",
        model="m",
        workload=WorkloadConfig(kind=kind),
        max_concurrency=concurrency,
    )
    return BenchResult(config, 0, [], records, compute_metrics(records, duration=1.0), "2026-12-02T10:20:30Z")


def test_latency_panels_each_have_a_legend_and_the_figure_a_dated_title():
    fig = latency_cdf_figure([("c=1", _result(1)), ("c=4", _result(4))])
    title = fig._suptitle.get_text()
    assert "shared-prefix workload" in title and "2026-12-02 10:20" in title
    for ax in fig.axes:
        legend = ax.get_legend()
        assert legend is not None, ax.get_title()
        assert [t.get_text() for t in legend.get_texts()] == ["c=1", "c=4"]


def test_throughput_plot_for_a_single_concurrency(tmp_path):
    fig = throughput_figure([("m", [_result(8, kind="random")])])
    (ax,) = fig.axes
    assert len(ax.get_lines()) == 1 and list(ax.get_lines()[0].get_xdata()) == [8]
    assert ax.get_legend() is not None
    assert "random workload" in ax.get_title() and "2026-12-02" in ax.get_title()
    written = save_results([_result(8)], tmp_path)
    assert tmp_path / "throughput_vs_concurrency.png" in written
