"""The trainer against PEFT on transformers: loss and LoRA gradients for one packed batch, the adapter
file PEFT loads, step invariance under gradient accumulation, DPO's loss and metrics, events."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ember.tune.lora import lora_modules, lora_state_dict
from ember.tune.packing import pack
from ember.tune.trainer import (
    TrainingCancelled,
    TuneConfig,
    load_for_training,
    pack_logprobs,
    run_dpo,
    train,
)
from tests.conftest import build_random_model
from tests.tune.reference import (
    copy_into_peft,
    peft_key,
    peft_model,
    peft_seq_logp,
    peft_sft_loss,
    random_examples,
    random_pairs,
    randomise_lora,
)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("tune-models")
    return {k: build_random_model(root, k, default_model_dir) for k in ("llama-gqa", "qwen2-bias")}


def _sft_parity(base_dir, cfg: TuneConfig, examples, tol: float):
    net = load_for_training(str(base_dir), cfg, torch.device("cpu"))
    randomise_lora(net, seed=1)
    seqs = [(e.input_ids, e.labels) for e in examples]
    logp, _ = pack_logprobs(net, pack(seqs))
    loss = -logp.sum() / sum(sum(e.labels[1:]) for e in examples)
    loss.backward()
    state = lora_state_dict(net)
    grads = {}
    for i, group, module in lora_modules(net):
        for name in module.trained:
            for half, table in (("A", module.lora_A), ("B", module.lora_B)):
                grads[f"base_model.model.model.layers.{i}.{group}.{name}.lora_{half}.weight"] = table[
                    name
                ].grad

    peft = peft_model(base_dir, cfg.r, cfg.lora_alpha, cfg.target_modules, cfg.use_rslora)
    copy_into_peft(peft, state)
    ref = peft_sft_loss(peft, examples)
    ref.backward()
    assert abs(float(loss) - float(ref)) < tol, (float(loss), float(ref))
    n = 0
    for name, p in peft.named_parameters():
        if "lora_" in name:
            g = grads[peft_key(name)]
            assert torch.allclose(g, p.grad, atol=tol, rtol=0), (name, (g - p.grad).abs().max())
            n += 1
    assert n == len(grads) > 0


@pytest.mark.parametrize(
    "kind,targets,rslora",
    [
        ("llama-gqa", ALL, False),
        ("llama-gqa", ["q_proj", "v_proj", "down_proj"], True),
        ("qwen2-bias", ALL, True),
    ],
)
def test_loss_and_gradients_equal_peft(tiny_dirs, kind, targets, rslora):
    cfg = TuneConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora)
    _sft_parity(tiny_dirs[kind], cfg, random_examples(4, seed=3), tol=1e-4)


@pytest.mark.slow
def test_loss_and_gradients_equal_peft_default_model(default_model_dir):
    cfg = TuneConfig(r=8, lora_alpha=16, target_modules=ALL)
    _sft_parity(default_model_dir, cfg, random_examples(3, seed=5, lengths=(20, 60)), tol=1e-4)


def test_lora_init_is_peft_s(tiny_dirs):
    net = load_for_training(str(tiny_dirs["llama-gqa"]), TuneConfig(r=4), torch.device("cpu"))
    state = lora_state_dict(net)
    assert all(float(v.abs().max()) == 0 for k, v in state.items() if "lora_B" in k)
    for k, v in state.items():
        if "lora_A" in k:  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
            bound = 1 / math.sqrt(v.shape[1])
            assert float(v.abs().max()) <= bound and float(v.std()) > bound / 3
    assert not any(p.requires_grad for n, p in net.named_parameters() if "lora_" not in n)
    again = lora_state_dict(
        load_for_training(str(tiny_dirs["llama-gqa"]), TuneConfig(r=4), torch.device("cpu"))
    )
    assert all(torch.equal(state[k], again[k]) for k in state)  # seeded


def test_adapter_file_loads_in_peft(tiny_dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = tiny_dirs["llama-gqa"]
    cfg = TuneConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"], batch_size=4, learning_rate=1e-2
    )
    result = train(str(base_dir), random_examples(8, seed=0), None, cfg, str(tmp_path))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["q_proj", "k_proj", "up_proj"] and config["use_rslora"] is False
    assert result.steps == 2 and (tmp_path / "checkpoint-2" / "adapter_model.safetensors").exists()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), result.adapter_dir)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    loaded = {peft_key(n): p for n, p in peft.named_parameters() if "lora_" in n}
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)  # it trained


def test_accumulation_gives_the_same_steps(tiny_dirs, tmp_path):
    """16 examples a step: one micro-batch of 16 against 16 micro-batches of one."""
    data = random_examples(32, seed=7)
    runs = {}
    for accum in (1, 16):
        events = []
        cfg = TuneConfig(r=4, batch_size=16, grad_accum=accum, learning_rate=5e-3, warmup_ratio=0.5)
        result = train(
            str(tiny_dirs["llama-gqa"]), data, None, cfg, str(tmp_path / str(accum)), events.append
        )
        from safetensors.torch import load_file

        runs[accum] = (
            [e["train_loss"] for e in events if e["type"] == "metrics"],
            load_file(f"{result.adapter_dir}/adapter_model.safetensors"),
        )
    (loss1, w1), (loss16, w16) = runs[1], runs[16]
    assert len(loss1) == 2
    assert all(abs(a - b) < 1e-3 for a, b in zip(loss1, loss16, strict=True)), (loss1, loss16)
    assert all(torch.allclose(w1[k], w16[k], atol=1e-3) for k in w1)


def test_dpo_equals_hand_computed_reference(tiny_dirs):
    base_dir = tiny_dirs["llama-gqa"]
    cfg = TuneConfig(method="dpo", r=4, lora_alpha=8, beta=0.1)
    net = load_for_training(str(base_dir), cfg, torch.device("cpu"))
    randomise_lora(net, seed=2, scale=0.1)
    pairs = random_pairs(3, seed=4)
    from ember.tune.trainer import dpo_sequences, micro_batches

    groups = [dpo_sequences(p, cfg.max_len) for p in pairs]
    st = run_dpo(net, groups, micro_batches(groups, 1, 4096), cfg.beta, "cpu", backward=False)

    peft = peft_model(base_dir, cfg.r, cfg.lora_alpha, cfg.target_modules, False)
    copy_into_peft(peft, lora_state_dict(net))
    losses, rc, rr = [], [], []
    with torch.no_grad():
        for (c_ids, c_mask), (r_ids, r_mask) in groups:
            pc, pr = peft_seq_logp(peft, c_ids, c_mask), peft_seq_logp(peft, r_ids, r_mask)
            with peft.disable_adapter():
                qc, qr = peft_seq_logp(peft, c_ids, c_mask), peft_seq_logp(peft, r_ids, r_mask)
            rc.append(0.1 * (pc - qc))
            rr.append(0.1 * (pr - qr))
            losses.append(-torch.nn.functional.logsigmoid(rc[-1] - rr[-1]))
    rc, rr = torch.stack(rc), torch.stack(rr)
    assert abs(st.loss - float(torch.stack(losses).mean())) < 1e-5
    assert abs(st.dpo["rewards/chosen"] - float(rc.mean())) < 1e-5
    assert abs(st.dpo["rewards/rejected"] - float(rr.mean())) < 1e-5
    assert abs(st.dpo["rewards/margins"] - float((rc - rr).mean())) < 1e-5
    assert st.dpo["rewards/accuracies"] == pytest.approx(float((rc > rr).float().mean()))


def test_dpo_trains_and_reports_trl_metrics(tiny_dirs, tmp_path):
    events = []
    cfg = TuneConfig(method="dpo", r=4, batch_size=4, epochs=3, learning_rate=2e-2, warmup_ratio=0.0)
    pairs = random_pairs(8, seed=9)
    result = train(str(tiny_dirs["llama-gqa"]), pairs, pairs[:4], cfg, str(tmp_path), events.append)
    metrics = [e for e in events if e["type"] == "metrics"]
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
    ):
        assert key in metrics[-1]
    assert abs(metrics[0]["train_loss"] - math.log(2)) < 1e-5  # B = 0: policy == reference
    assert metrics[-1]["rewards/accuracies"] > 0.8 and result.valid_loss < math.log(2)
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [2, 4, 6]


def test_events_schedule_and_cancel(tiny_dirs, tmp_path):
    events = []
    cfg = TuneConfig(r=2, batch_size=2, epochs=2, learning_rate=1e-3, warmup_ratio=0.25, checkpoint_every=3)
    data = random_examples(6, seed=1)
    result = train(str(tiny_dirs["llama-gqa"]), data, data[:2], cfg, str(tmp_path), events.append)
    metrics = [e for e in events if e["type"] == "metrics"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6] and metrics[0]["total_steps"] == 6
    lrs = [m["lr"] for m in metrics]  # 2 warm-up steps from 0, then cosine down
    assert lrs[0] == 0 and lrs[1] == pytest.approx(5e-4) and lrs[2] == pytest.approx(1e-3)
    assert lrs[3] > lrs[4] > lrs[5] > 0
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [3, 6]
    assert "valid_loss" in metrics[2] and result.valid_loss == metrics[5]["valid_loss"]
    assert all(0 <= m["token_accuracy"] <= 1 and m["tokens_per_s"] > 0 for m in metrics)
    calls = iter([False, False, True])
    with pytest.raises(TrainingCancelled):
        train(
            str(tiny_dirs["llama-gqa"]), data, None, cfg, str(tmp_path / "c"), should_stop=lambda: next(calls)
        )


def test_reproducible_with_dropout(tiny_dirs, tmp_path):
    cfg = TuneConfig(r=4, batch_size=4, lora_dropout=0.1, learning_rate=1e-2, seed=3)
    data = random_examples(8, seed=2)
    a = train(str(tiny_dirs["llama-gqa"]), data, None, cfg, str(tmp_path / "a"))
    b = train(str(tiny_dirs["llama-gqa"]), data, None, cfg, str(tmp_path / "b"))
    assert a.train_loss == b.train_loss


def test_bfloat16_runs(tiny_dirs, tmp_path):
    cfg = TuneConfig(r=4, batch_size=4, dtype="bfloat16", checkpointing=True, learning_rate=1e-2)
    data = random_examples(8, seed=2)
    result = train(str(tiny_dirs["llama-gqa"]), data, None, cfg, str(tmp_path))
    assert math.isfinite(result.train_loss)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="method 'ppo'"):
        TuneConfig(method="ppo")
    with pytest.raises(ValueError, match="target_modules"):
        TuneConfig(target_modules=["lm_head"])
