"""LoRA SFT and DPO on ember's own Llama code: the module that serves, run densely with autograd.

A step takes `batch_size` examples, cuts them into `grad_accum` micro-batches (and any micro-batch over
`micro_batch_tokens` into more), packs each padding-free and accumulates gradients. Every micro-batch's
loss is divided by the whole step's count (supervised tokens for SFT, pairs for DPO), so the step's
gradient is the same however it is cut. AdamW, linear warm-up then cosine decay to 0, gradient-norm
clipping. DPO's reference model is the same model with its adapter switched off.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ember.models.projections import HF_MODULES
from ember.tune.lora import add_lora, save_adapter
from ember.tune.loss import token_logprobs
from ember.tune.packing import Packed, Sequence, pack, split_by_tokens, supervised_tokens

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
METHODS = ("sft", "dpo")


class TrainingCancelled(Exception):
    """should_stop() asked the run to end; raised at the step boundary after it did."""


@dataclass
class TuneConfig:
    method: str = "sft"  # "sft" | "dpo"
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: list[str] = field(default_factory=lambda: list(HF_MODULES))
    epochs: int = 1
    learning_rate: float = 2e-4
    batch_size: int = 8  # examples per optimizer step
    grad_accum: int = 1  # micro-batches a step's examples are cut into
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    beta: float = 0.1  # DPO
    max_len: int = 1024
    seed: int = 0
    checkpointing: bool = False  # recompute each decoder layer in backward (less memory, ~30% slower)
    dtype: str = "float32"  # or "bfloat16"
    checkpoint_every: int = 0  # steps; 0: only at the end of each epoch
    micro_batch_tokens: int = 4096  # packed tokens per forward at most (a longer example runs alone)
    device: str = "auto"  # "auto": CUDA when available, else the CPU

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method '{self.method}' is unknown; known: {', '.join(METHODS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype '{self.dtype}' is unknown; known: {', '.join(DTYPES)}")
        for name in ("r", "epochs", "batch_size", "grad_accum", "max_len", "micro_batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must be in [0, 1] (got {self.warmup_ratio})")
        unknown = sorted(set(self.target_modules) - set(HF_MODULES))
        if unknown or not self.target_modules:
            raise ValueError(f"target_modules {unknown or '[]'} invalid; choose from {', '.join(HF_MODULES)}")


@dataclass
class TrainResult:
    adapter_dir: str  # PEFT format: adapter_config.json + adapter_model.safetensors
    steps: int
    train_loss: float
    valid_loss: float | None
    tokens: int
    seconds: float
    metrics: dict  # the last step's


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_for_training(model: str, cfg: TuneConfig, device: torch.device) -> torch.nn.Module:
    """The serving model class with the reference backend's autograd-capable ops, LoRA added and seeded."""
    from ember.models.catalog import resolve_model
    from ember.models.config import ModelConfig
    from ember.models.loader import load_model

    path = resolve_model(model)
    mcfg = ModelConfig.from_dir(path)
    net = load_model(path, mcfg, DTYPES[cfg.dtype], device, max_positions=cfg.max_len + 1, training=True)
    net.checkpoint_layers = cfg.checkpointing
    gen = torch.Generator().manual_seed(cfg.seed)
    add_lora(net, cfg.r, cfg.lora_alpha, cfg.target_modules, cfg.lora_dropout, cfg.use_rslora, gen)
    return net


# ---- one forward over a pack


def pack_logprobs(net: torch.nn.Module, packed: Packed) -> tuple[torch.Tensor, torch.Tensor]:
    """-> log p of every supervised token [N] (grad through the LoRA weights) and argmax hits [N]."""
    hidden = net(packed.input_ids, packed.positions, None, packed.meta)  # [T, hidden]
    return token_logprobs(hidden.index_select(0, packed.rows), net.lm_head, packed.targets)


def sft_sequence(example, max_len: int) -> Sequence:
    return list(example.input_ids[:max_len]), list(example.labels[:max_len])


def dpo_sequences(pair, max_len: int) -> list[Sequence]:
    """(prompt + chosen, prompt + rejected), completions supervised, cut to max_len from the right."""
    out = []
    for completion in (pair.chosen_ids, pair.rejected_ids):
        ids = (list(pair.prompt_ids) + list(completion))[:max_len]
        mask = ([False] * len(pair.prompt_ids) + [True] * len(completion))[:max_len]
        out.append((ids, mask))
    return out


def dpo_terms(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """policy, reference [2 * P] summed log-probs, chosen and rejected interleaved -> per-pair terms."""
    chosen = beta * (policy[0::2] - reference[0::2])
    rejected = beta * (policy[1::2] - reference[1::2])
    return {
        "loss": -F.logsigmoid(chosen - rejected),  # TRL's "sigmoid" loss, no label smoothing
        "rewards/chosen": chosen.detach(),
        "rewards/rejected": rejected.detach(),
        "rewards/accuracies": (chosen > rejected).float().detach(),
        "rewards/margins": (chosen - rejected).detach(),
        "logps/chosen": policy[0::2].detach(),
        "logps/rejected": policy[1::2].detach(),
    }


class _Step:
    """Sums over a step's micro-batches: what the metrics event reports."""

    def __init__(self):
        self.loss = self.supervised = self.correct = self.tokens = 0.0
        self.dpo: dict[str, float] = {}

    def add_dpo(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            if k != "loss":
                self.dpo[k] = self.dpo.get(k, 0.0) + float(v.sum())


def run_sft(net, seqs: list[Sequence], micro: list[list[Sequence]], device, backward: bool) -> _Step:
    """One step's loss over `micro` (its micro-batches), normalised by all its supervised tokens."""
    st = _Step()
    total = max(1, sum(supervised_tokens(s) for s in seqs))
    window = net.config.sliding_window
    for mb in micro:
        packed = pack(mb, device, window)
        logp, correct = pack_logprobs(net, packed)
        loss = -logp.sum() / total
        if backward:
            loss.backward()
        st.loss += float(loss.detach())
        st.correct += float(correct.sum())
        st.tokens += packed.num_tokens
    st.supervised = total
    return st


def run_dpo(
    net, pairs: list[list[Sequence]], micro: list[list[Sequence]], beta: float, device, backward: bool
) -> _Step:
    st = _Step()
    n_pairs = len(pairs)
    window = net.config.sliding_window
    for mb in micro:
        packed = pack(mb, device, window)
        with torch.no_grad():  # the reference model: the same weights, the adapter off
            net.lora_switch.enabled = False
            try:
                ref_logp, _ = pack_logprobs(net, packed)
            finally:
                net.lora_switch.enabled = True
        logp, correct = pack_logprobs(net, packed)
        zeros = torch.zeros(packed.num_sequences, device=logp.device)
        policy = zeros.index_add(0, packed.sequence_of_row, logp)
        reference = zeros.index_add(0, packed.sequence_of_row, ref_logp)
        terms = dpo_terms(policy, reference, beta)
        loss = terms["loss"].sum() / n_pairs
        if backward:
            loss.backward()
        st.loss += float(loss.detach())
        st.add_dpo(terms)
        st.correct += float(correct.sum())
        st.supervised += int(correct.numel())
        st.tokens += packed.num_tokens
    st.dpo = {k: v / n_pairs for k, v in st.dpo.items()}
    return st


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """transformers' get_cosine_schedule_with_warmup: linear from 0 over `warmup` steps, then cosine to 0."""

    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return f


def micro_batches(groups: list[list[Sequence]], grad_accum: int, max_tokens: int) -> list[list[Sequence]]:
    """A step's groups cut into grad_accum runs of (nearly) equal counts, each then cut by tokens."""
    k = min(grad_accum, len(groups))
    size = -(-len(groups) // k)
    out = []
    for i in range(0, len(groups), size):
        out.extend(split_by_tokens(groups[i : i + size], max_tokens))
    return out


def train(
    model: str,
    train_data: list,
    valid_data: list | None,
    cfg: TuneConfig,
    out_dir: str,
    on_event: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `model` (anything ember.models.catalog resolves) with `cfg.method` over
    SFTExample or DPOPair items; checkpoints under out_dir/checkpoint-<step>/, the adapter in out_dir/adapter/."""
    if not train_data:
        raise ValueError("train_data is empty")
    start_time = time.perf_counter()
    torch.manual_seed(cfg.seed)  # LoRA dropout draws from the global generator
    device = resolve_device(cfg.device)
    net = load_for_training(model, cfg, device)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(train_data) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total_steps))
    as_groups = _grouper(cfg)
    out = Path(out_dir)
    emit = on_event or (lambda _event: None)
    rng = random.Random(cfg.seed)
    step, tokens, metrics, valid_loss = 0, 0, {}, None

    def save(path: Path) -> Path:
        return save_adapter(
            net, path, cfg.r, cfg.lora_alpha, cfg.target_modules, cfg.lora_dropout, cfg.use_rslora, model
        )

    for _epoch in range(cfg.epochs):
        order = list(range(len(train_data)))
        rng.shuffle(order)
        for first in range(0, len(order), cfg.batch_size):
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"cancelled before step {step + 1} of {total_steps}")
            t0 = time.perf_counter()
            groups = [as_groups(train_data[i]) for i in order[first : first + cfg.batch_size]]
            net.train()
            st = _run(net, cfg, groups, device, backward=True)
            grad_norm = _clip(params, cfg.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += int(st.tokens)
            metrics = {
                "type": "metrics",
                "step": step,
                "total_steps": total_steps,
                "train_loss": st.loss,
                "token_accuracy": st.correct / max(1, st.supervised),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": st.tokens / max(1e-9, time.perf_counter() - t0),
                **st.dpo,
            }
            at_epoch_end = first + cfg.batch_size >= len(order)
            ckpt = (step % cfg.checkpoint_every == 0) if cfg.checkpoint_every else at_epoch_end
            if ckpt and valid_data:
                valid_loss = evaluate(net, cfg, valid_data, device)
                metrics["valid_loss"] = valid_loss
            emit(metrics)
            if ckpt:
                path = save(out / f"checkpoint-{step}")
                emit({"type": "checkpoint", "step": step, "path": str(path), "metrics": _plain(metrics)})
    if valid_data and "valid_loss" not in metrics:
        valid_loss = evaluate(net, cfg, valid_data, device)
    adapter = save(out / "adapter")
    return TrainResult(
        str(adapter),
        step,
        metrics["train_loss"],
        valid_loss,
        tokens,
        time.perf_counter() - start_time,
        _plain(metrics),
    )


def evaluate(net, cfg: TuneConfig, data: list, device) -> float:
    """Mean loss over `data` in eval mode (no dropout): per supervised token (SFT) or per pair (DPO)."""
    net.eval()
    as_groups = _grouper(cfg)
    with torch.no_grad():
        groups = [as_groups(x) for x in data]
        st = _run(net, cfg, groups, device, backward=False)
    net.train()
    return st.loss


def _grouper(cfg: TuneConfig) -> Callable[[object], list[Sequence]]:
    if cfg.method == "sft":
        return lambda x: [sft_sequence(x, cfg.max_len)]
    return lambda x: dpo_sequences(x, cfg.max_len)


def _run(net, cfg: TuneConfig, groups: list[list[Sequence]], device, backward: bool) -> _Step:
    micro = micro_batches(groups, cfg.grad_accum, cfg.micro_batch_tokens)
    if cfg.method == "sft":
        return run_sft(net, [s for g in groups for s in g], micro, device, backward)
    return run_dpo(net, groups, micro, cfg.beta, device, backward)


def _clip(params: list[torch.Tensor], max_norm: float) -> float:
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad.norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _plain(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "type"}
