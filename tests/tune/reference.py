"""PEFT-on-transformers references for the trainer's tests: the same LoRA weights, examples run one at a
time and unpadded, so packing is checked too."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.tune.lora import lora_modules


@dataclass(frozen=True)
class Example:  # the fields of ember.tune.data.SFTExample the trainer reads
    input_ids: list[int]
    labels: list[bool]


@dataclass(frozen=True)
class Pair:  # the fields of ember.tune.data.DPOPair the trainer reads
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def random_examples(n: int, seed: int, lengths=(5, 40), vocab: int = 49152) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append(Example(ids, [False] * prompt + [True] * (length - prompt)))
    return out


def random_pairs(n: int, seed: int, vocab: int = 49152) -> list[Pair]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [Pair(ids(4, 12), ids(2, 10), ids(2, 10)) for _ in range(n)]


def randomise_lora(net, seed: int, scale: float = 0.05) -> None:
    """Non-zero A and B, so every LoRA weight gets a gradient and the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, module in lora_modules(net):
            for table in (module.lora_A, module.lora_B):
                for p in table.values():
                    p.copy_(torch.randn(p.shape, generator=g) * scale)


def peft_model(base_dir, r, alpha, targets, rslora, dropout=0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        lora_dropout=dropout,
        use_rslora=rslora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config)


def peft_key(name: str) -> str:
    """PEFT's parameter name -> the saved (adapter file) name."""
    return name.replace(".default", "")


def copy_into_peft(peft, ember_state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(ember_state[peft_key(name)])


def peft_sft_loss(peft, examples: list[Example]) -> torch.Tensor:
    """Sum of per-token CE over every supervised token / their count, each example alone."""
    total = sum(sum(e.labels[1:]) for e in examples)
    loss = 0.0
    for e in examples:
        ids = torch.tensor([e.input_ids])
        labels = torch.tensor([t if m else -100 for t, m in zip(e.input_ids, e.labels, strict=True)])
        logits = peft(ids).logits[0, :-1].float()
        loss = loss + torch.nn.functional.cross_entropy(
            logits, labels[1:], ignore_index=-100, reduction="sum"
        )
    return loss / total


def peft_seq_logp(peft, ids: list[int], mask: list[bool]) -> torch.Tensor:
    logits = peft(torch.tensor([ids])).logits[0, :-1].float()
    logp = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    return (logp * torch.tensor(mask[1:], dtype=torch.float32)).sum()
