"""`ember tune`: flags -> TuneConfig, bad files refused before training, report and plot written; --serve
through the SDK calls. The trainer's train() is a stand-in here (the real one is tested in its own module)."""

from __future__ import annotations

import json
import sys
import types

import pytest
from typer.testing import CliRunner

from ember.cli import app
from ember.tune import remote
from ember.tune.trainer import TrainResult, TuneConfig

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
PAIR = {
    "input": {"messages": [{"role": "user", "content": "hi"}]},
    "preferred_output": [{"role": "assistant", "content": "hello"}],
    "non_preferred_output": [{"role": "assistant", "content": "go away"}],
}


@pytest.fixture
def trainer(monkeypatch):
    calls = []

    def train(model, train_data, valid_data, cfg, out_dir, on_event=None, should_stop=None):
        calls.append((model, train_data, valid_data, cfg, out_dir))
        for step in (1, 2, 3):
            on_event(
                {
                    "type": "metrics",
                    "step": step,
                    "total_steps": 3,
                    "train_loss": 2.0 / step,
                    "token_accuracy": 0.3 * step,
                    "lr": 1e-4,
                    "tokens_per_s": 100.0,
                    **({"valid_loss": 1.0} if step == 3 and valid_data else {}),
                }
            )
        on_event({"type": "checkpoint", "step": 3, "path": f"{out_dir}/checkpoint-3", "metrics": {}})
        extra = {"rewards/accuracies": 0.9} if cfg.method == "dpo" else {}
        return TrainResult(f"{out_dir}/adapter", 3, 2.0 / 3, 1.0 if valid_data else None, 300, 1.5, extra)

    module = types.SimpleNamespace(train=train, TuneConfig=TuneConfig)
    monkeypatch.setitem(sys.modules, "ember.tune.trainer", module)
    return calls


def write(tmp_path, name, *rows):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def invoke(*args):
    return CliRunner().invoke(app, ["tune", *args])


def test_sft_flags_reach_the_config_and_the_run_dir_is_written(trainer, tmp_path):
    data, val = write(tmp_path, "t.jsonl", CHAT, CHAT), write(tmp_path, "v.jsonl", CHAT)
    out = tmp_path / "run"
    res = invoke(
        "sft",
        "--data",
        data,
        "--validation",
        val,
        "--out",
        str(out),
        "--epochs",
        "3",
        "--lr",
        "1e-3",
        "--batch-size",
        "4",
        "--rank",
        "16",
        "--alpha",
        "32",
        "--target-modules",
        "q_proj, v_proj",
        "--max-len",
        "64",
        "--seed",
        "7",
    )
    assert res.exit_code == 0, res.output
    ((model, train_data, valid_data, cfg, out_dir),) = trainer
    assert model == "smollm2-135m-instruct" and out_dir == str(out)
    assert len(train_data) == 2 and len(valid_data) == 1 and any(train_data[0].labels)
    assert (cfg.method, cfg.epochs, cfg.learning_rate, cfg.batch_size) == ("sft", 3, 1e-3, 4)
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules, cfg.max_len, cfg.seed) == (
        16,
        32,
        ["q_proj", "v_proj"],
        64,
        7,
    )
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| steps | 3 |" in report and "0.6667" in report and "validation loss | 1.0000" in report
    assert f"{out}/adapter" in report and "| learning_rate | `0.001` |" in report
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["type"] for e in events] == ["metrics"] * 3 + ["checkpoint"]
    assert "adapter:" in res.output


def test_dpo(trainer, tmp_path):
    out = tmp_path / "run"
    res = invoke("dpo", "--data", write(tmp_path, "p.jsonl", PAIR), "--out", str(out), "--beta", "0.2")
    assert res.exit_code == 0, res.output
    cfg = trainer[0][3]
    assert (cfg.method, cfg.beta) == ("dpo", 0.2)
    assert "rewards/accuracies | 0.9000" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("args", "what"),
    [
        (["sft", "--data", "{tmp}/missing.jsonl", "--out", "{tmp}/o"], "no such file"),
        (["sft", "--data", "{chat}"], "--out is needed"),
        (["sft", "--data", "{chat}", "--out", "{tmp}/o", "--target-modules", "q_proj,nope"], "nope"),
        (["sft", "--data", "{pairs}", "--out", "{tmp}/o"], "run `ember tune dpo`"),
        (["dpo", "--data", "{chat}", "--out", "{tmp}/o"], "run `ember tune sft`"),
        (["sft", "--data", "{bad}", "--out", "{tmp}/o"], "line 2: messages[1]: weight must be 0 or 1"),
        (["sft", "--data", "{chat}", "--out", "{tmp}/o", "--suffix", "x"], "goes with --serve"),
    ],
)
def test_refused_before_training(trainer, tmp_path, args, what):
    files = {
        "tmp": str(tmp_path),
        "chat": write(tmp_path, "c.jsonl", CHAT),
        "pairs": write(tmp_path, "p.jsonl", PAIR),
        "bad": write(
            tmp_path,
            "b.jsonl",
            CHAT,
            {"messages": [CHAT["messages"][0], {**CHAT["messages"][1], "weight": 5}]},
        ),
    }
    res = invoke(*[a.format(**files) for a in args])
    assert res.exit_code == 2 and what in " ".join(res.output.split()), res.output
    assert trainer == []


def test_bad_number_flag(trainer, tmp_path):
    res = invoke("sft", "--data", write(tmp_path, "c.jsonl", CHAT), "--out", str(tmp_path), "--epochs", "0")
    assert res.exit_code == 2 and trainer == []


class FakeClient:
    """The SDK calls --serve makes, recorded; the job runs two steps and succeeds."""

    def __init__(self):
        self.created, self.uploads = {}, []
        self.polls = 0
        ns = types.SimpleNamespace
        self.files = ns(create=self._upload)
        self.fine_tuning = ns(jobs=ns(create=self._create, retrieve=self._retrieve, list_events=self._events))

    def _upload(self, file, purpose):
        self.uploads.append((file.name, purpose))
        return types.SimpleNamespace(id=f"file-{len(self.uploads)}")

    def _create(self, **kw):
        self.created = kw
        return types.SimpleNamespace(id="ftjob-1")

    def _retrieve(self, job_id):
        self.polls += 1
        status = "running" if self.polls < 2 else "succeeded"
        return types.SimpleNamespace(id=job_id, status=status, fine_tuned_model="ft:m:x:ftjob-1", error=None)

    def _events(self, job_id, limit):
        ev = types.SimpleNamespace
        rows = [ev(id="e1", type="message", message="Job started", data=None)]
        if self.polls >= 2:
            rows.append(
                ev(
                    id="e2",
                    type="metrics",
                    message="Step 1/2",
                    data={"step": 1, "total_steps": 2, "train_loss": 1.5},
                )
            )
        return types.SimpleNamespace(data=rows[::-1])


def test_serve_submits_through_the_sdk(tmp_path):
    client = FakeClient()
    data, val = tmp_path / "t.jsonl", tmp_path / "v.jsonl"
    data.write_text(json.dumps(PAIR) + "\n")
    val.write_text(json.dumps(PAIR) + "\n")
    events = []
    hyper = {"epochs": 2, "learning_rate": 4e-4, "batch_size": 4, "beta": 0.3}
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj"]}
    job = remote.submit(
        "http://h:1",
        None,
        "dpo",
        "m",
        data,
        val,
        hyper,
        lora,
        256,
        5,
        "x",
        events.append,
        poll_s=0,
        client=client,
    )
    assert job.status == "succeeded"
    assert [p for _, p in client.uploads] == ["fine-tune", "fine-tune"]
    kw = client.created
    assert (kw["training_file"], kw["validation_file"], kw["seed"], kw["suffix"]) == (
        "file-1",
        "file-2",
        5,
        "x",
    )
    assert kw["method"] == {
        "type": "dpo",
        "dpo": {
            "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2.0, "beta": 0.3}
        },
    }
    assert kw["extra_body"] == {"lora": lora, "max_len": 256}
    assert events == [
        {"type": "message", "message": "Job started"},
        {"type": "metrics", "step": 1, "total_steps": 2, "train_loss": 1.5},
    ]


def test_serve_flag_goes_remote(monkeypatch, tmp_path, trainer):
    seen = {}

    def submit(url, key, method, model, data, validation, hyper, lora, max_len, seed, suffix, on_event):
        seen.update(url=url, key=key, method=method, suffix=suffix)
        on_event({"type": "metrics", "step": 1, "total_steps": 1, "train_loss": 0.5})
        return types.SimpleNamespace(
            id="ftjob-9", status="failed", error=types.SimpleNamespace(message="boom")
        )

    monkeypatch.setattr(remote, "submit", submit)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-admin")
    res = invoke("sft", "--data", write(tmp_path, "c.jsonl", CHAT), "--serve", "http://h:1", "--suffix", "s")
    assert res.exit_code == 2 and "job ftjob-9 failed: boom" in res.output
    assert seen == {"url": "http://h:1", "key": "sk-admin", "method": "sft", "suffix": "s"} and trainer == []
