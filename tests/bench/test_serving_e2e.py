"""`ember bench serve` against a live ember server: every request accounted for, token counts from usage,
throughputs consistent with the records, files written, failures recorded rather than raised."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ember.bench.serving import (
    BenchConfig,
    BenchError,
    Request,
    WorkloadConfig,
    load_results,
    run_benchmark,
    save_results,
    save_workload,
)
from ember.cli import app
from tests.e2e.conftest import MODEL, running_server, small_engine

pytestmark = pytest.mark.slow

OUTPUT_LEN = 16


@pytest.fixture(scope="module")
def url(default_model_dir):
    engine = small_engine(default_model_dir, max_num_seqs=8, max_queue=64)
    try:
        with running_server(engine) as url:
            yield url
    finally:
        engine.shutdown()


def _config(url: str, tokenizer: str, endpoint: str = "completions", **workload) -> BenchConfig:
    shape = dict(kind="random", num_requests=8, input_len=32, output_len=OUTPUT_LEN, tokenizer=tokenizer)
    return BenchConfig(
        base_url=url,
        model=MODEL,
        workload=WorkloadConfig(**(shape | workload)),
        endpoint=endpoint,
        max_concurrency=4,
        ignore_eos=True,
        goodput={"ttft": 3_600_000, "e2el": 3_600_000},  # an hour: met whatever the machine load
        progress=False,
    )


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_every_request_is_accounted_for_and_throughput_matches_the_records(
    url, default_model_dir, tmp_path, endpoint
):
    result = run_benchmark(_config(url, str(default_model_dir), endpoint))
    m, records = result.metrics, result.records
    assert len(records) == 8 and m.completed + m.failed == 8
    assert m.failed == 0, [r.error for r in records if r.error]
    for r in records:
        assert r.tokens_from_usage and r.output_tokens == OUTPUT_LEN  # ignore_eos: exactly max_tokens
        assert r.input_tokens >= 32  # usage.prompt_tokens; the chat template adds its own tokens
        assert len(r.itl) == r.num_chunks - 1
        assert 1 <= r.num_chunks <= r.output_tokens
        assert r.e2el == pytest.approx(r.ttft + sum(r.itl))
    assert m.total_output == 8 * OUTPUT_LEN
    assert m.output_throughput * m.duration == pytest.approx(m.total_output)
    assert m.request_throughput * m.duration == pytest.approx(m.completed)
    assert m.total_token_throughput * m.duration == pytest.approx(m.total_input + m.total_output)
    assert m.goodput * m.duration == pytest.approx(8)
    assert m.duration >= max(r.start_time + r.e2el for r in records)

    written = save_results([result], tmp_path)
    assert _is_png(tmp_path / "latency_cdf.png")
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert run["seed"] == result.seed and run["server"] == {"base_url": url, "model": MODEL}
    assert {r["id"] for r in run["requests"]} == {r.id for r in result.requests}
    assert len((tmp_path / "workload.jsonl").read_text().splitlines()) == 8
    assert tmp_path / "results.json" in written
    (loaded,) = load_results(tmp_path / "results.json")
    assert loaded.metrics == m and loaded.records == records


def test_chat_sessions_send_each_turn_after_the_previous_one_finished(url, default_model_dir):
    cfg = _config(url, str(default_model_dir), "chat", kind="chat", num_requests=6, num_turns=3, input_len=8)
    cfg.workload.output_len = 4
    result = run_benchmark(cfg)
    assert result.metrics.failed == 0, [r.error for r in result.records if r.error]
    by_id = {r.id: r for r in result.records}
    for req in result.requests:
        if req.turn:
            prev, cur = by_id[f"{req.session_id}-t{req.turn - 1}"], by_id[req.id]
            assert cur.start_time >= prev.start_time + prev.e2el
    # each turn resends a longer history, which the server's usage confirms
    assert by_id["s0-t2"].input_tokens > by_id["s0-t1"].input_tokens > by_id["s0-t0"].input_tokens


def test_a_request_for_an_unknown_model_is_recorded_as_failed(url, default_model_dir, tmp_path):
    path = tmp_path / "mixed.jsonl"
    requests = [
        Request(f"r{i}", 4, MODEL if i % 2 == 0 else "no-such-model", prompt="Say hello.") for i in range(4)
    ]
    save_workload(requests, path)
    cfg = _config(url, str(default_model_dir), kind="file", file=path)
    result = run_benchmark(cfg)
    m = result.metrics
    assert (m.completed, m.failed) == (2, 2)
    failed = [r for r in result.records if not r.success]
    assert {r.id for r in failed} == {"r1", "r3"}
    assert all("HTTP 404" in r.error and "no-such-model" in r.error for r in failed)
    assert m.request_throughput * m.duration == pytest.approx(2)


def test_a_wrong_model_stops_at_warmup_with_the_servers_message(url, default_model_dir):
    cfg = _config(url, str(default_model_dir), num_requests=2)
    cfg.model = "no-such-model"
    with pytest.raises(BenchError, match="does not exist"):
        run_benchmark(cfg)


def test_cli_sweeps_concurrency_and_writes_results_and_plots(url, default_model_dir, tmp_path):
    args = ["bench", "serve", "--base-url", url, "--model", MODEL, "--tokenizer", str(default_model_dir)]
    args += ["--num-requests", "3", "--input-len", "8", "--output-len", "4", "--ignore-eos"]
    args += ["--max-concurrency", "1,3", "--goodput", "ttft:3600000", "--out", str(tmp_path)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["config"]["max_concurrency"] for r in runs] == [1, 3]
    assert runs[0]["seed"] != runs[1]["seed"]  # fresh prompts per level: no prefix-cache help
    assert all(r["metrics"]["completed"] == 3 for r in runs)
    assert (tmp_path / "workload-c1.jsonl").is_file() and (tmp_path / "workload-c3.jsonl").is_file()
    assert _is_png(tmp_path / "latency_cdf.png") and _is_png(tmp_path / "throughput_vs_concurrency.png")
    assert "TTFT" in res.output and "c=3" in res.output
