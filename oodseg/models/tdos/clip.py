"""CLIP towers and tokenizers for TDOS (transformers ``CLIPModel``; no open_clip, no mmseg).

``load_clip(source)`` accepts

* ``"tiny"``: a random tiny ``CLIPConfig`` (vision 4 × 32-wide layers, image 64, patch 16; text 2 × 32-wide layers,
  40 positions, vocabulary 1000; projection 16) for tests and CPU smoke runs;
* a hub id (``openai/clip-vit-base-patch16``) or a local directory: ``CLIPModel.from_pretrained`` with
  ``local_files_only`` when ``HF_HUB_OFFLINE=1``; a directory whose config is not CLIP is rejected by name;
* a ``CLIPConfig`` dict (what ``TDOS.export_cfg`` stores): random weights, filled later from a checkpoint.

Tokenizers share one interface, ``tok(texts, length=None) -> LongTensor [n, length]`` (``None``: longest) holding
``SOT words… EOT pad…``: real checkpoints use their own ``CLIPTokenizer`` (via ``AutoTokenizer``); the tiny CLIP has
none, so :class:`HashTokenizer` maps every lower-cased word to ``1 + crc32(word) mod (V − 3)`` (deterministic, one
token per word), which is all random weights need.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TINY_TEXT = {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "max_position_embeddings": 40, "eos_token_id": 999, "bos_token_id": 998,
             "pad_token_id": 0}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
               "image_size": 64, "patch_size": 16}


class Tokenizer(Protocol):
    sot_id: int
    eot_id: int

    def __call__(self, texts: Sequence[str], length: int | None = None) -> torch.Tensor: ...


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for cached files only."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in {"1", "ON", "YES", "TRUE"}


def tiny_clip_config() -> Any:
    from transformers import CLIPConfig

    return CLIPConfig(text_config=dict(TINY_TEXT), vision_config=dict(TINY_VISION), projection_dim=16)


def _check_is_clip(source: str) -> None:
    """Raise a one-line error naming ``source`` when its config is missing or not a CLIP config."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(source, local_files_only=offline())
    except (OSError, ValueError) as e:
        raise ValueError(f"clip={source!r}: cannot read a transformers config ({type(e).__name__}: {e})") from None
    if cfg.model_type != "clip":
        raise ValueError(f"clip={source!r}: config model_type is {cfg.model_type!r}, not 'clip'; TDOS needs a "
                         "transformers CLIPModel checkpoint (e.g. openai/clip-vit-base-patch16)")


def load_clip(source: str | dict[str, Any]) -> tuple[Any, bool]:
    """``(CLIPModel, pretrained)`` for ``source``: ``"tiny"`` (random tiny config), a hub id / local directory
    (``from_pretrained``), or a ``CLIPConfig`` dict (random weights, filled later from a checkpoint). ``pretrained``
    says the weights are real (or the tiny model's own seeded ones), i.e. frozen text embeddings from them mean
    something."""
    from transformers import CLIPConfig, CLIPModel

    if isinstance(source, dict):
        return CLIPModel(CLIPConfig.from_dict(dict(source))), False
    if source == "tiny":
        return CLIPModel(tiny_clip_config()), True
    if Path(source).exists() and not Path(source).is_dir():
        raise ValueError(f"clip={source!r}: expected a CLIP checkpoint directory or hub id, got a file")
    _check_is_clip(source)
    return CLIPModel.from_pretrained(source, local_files_only=offline()), True


class HashTokenizer:
    """Deterministic word-level tokenizer for random tiny CLIPs (which have no tokenizer of their own): each
    lower-cased word → ``1 + crc32(word) mod (V − 3)``; ``tok(texts, length)`` → ``[n, length]`` holding
    ``SOT words EOT pad``."""

    def __init__(self, vocab_size: int, sot_id: int, eot_id: int, pad_id: int = 0) -> None:
        self.vocab_size, self.sot_id, self.eot_id, self.pad_id = int(vocab_size), int(sot_id), int(eot_id), int(pad_id)
        if self.vocab_size < 8:
            raise ValueError(f"HashTokenizer needs a vocabulary of at least 8 ids, got {vocab_size}")

    def word_id(self, word: str) -> int:
        reserved = {self.sot_id, self.eot_id, self.pad_id}
        n = self.vocab_size - 3
        i = 1 + zlib.crc32(word.encode()) % n
        while i in reserved:  # only for unusual special-token layouts
            i = 1 + (i % n)
        return i

    def __call__(self, texts: Sequence[str], length: int | None = None) -> torch.Tensor:
        seqs = [[self.sot_id] + [self.word_id(w) for w in re.findall(r"[a-z0-9]+", t.lower())] + [self.eot_id]
                for t in texts]
        n = length if length is not None else max(len(s) for s in seqs)
        out = torch.full((len(seqs), n), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            s = s[: n - 1] + [self.eot_id] if len(s) > n else s
            out[i, : len(s)] = torch.tensor(s)
        return out


class HFTokenizer:
    """A checkpoint's own CLIP tokenizer behind the :class:`Tokenizer` interface (truncation keeps the EOT)."""

    def __init__(self, source: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(source, local_files_only=offline())
        self.sot_id = int(self.tok.bos_token_id)
        self.eot_id = int(self.tok.eos_token_id)

    def __call__(self, texts: Sequence[str], length: int | None = None) -> torch.Tensor:
        kw: dict[str, Any] = {"padding": "longest"}
        if length is not None:
            kw = {"padding": "max_length", "max_length": length}
        ids = self.tok(list(texts), truncation=length is not None, return_tensors="pt", **kw)["input_ids"]
        return ids.long()


def load_tokenizer(source: str | dict[str, Any], clip: Any) -> Tokenizer | None:
    """The tokenizer for ``source``; None for a config dict (callers then need pre-tokenized prompts)."""
    if isinstance(source, dict):
        return None
    if source == "tiny":
        t = clip.config.text_config
        return HashTokenizer(t.vocab_size, t.bos_token_id, t.eos_token_id, t.pad_token_id)
    return HFTokenizer(source)


@torch.no_grad()
def text_features(clip: Any, tok: Tokenizer, texts: Sequence[str], batch: int = 256) -> torch.Tensor:
    """L2-normalised frozen CLIP text embeddings ``[n, D]`` (``get_text_features``), in batches of ``batch``."""
    device = clip.text_projection.weight.device
    out = []
    for i in range(0, len(texts), batch):
        ids = tok(texts[i : i + batch]).to(device)
        out.append(clip.get_text_features(input_ids=ids).pooler_output.float())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)
