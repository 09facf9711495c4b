"""Distance-based negative prompts for TDOS: NegLabel-style mining of words far from the in-distribution classes.

NegLabel (Jiang et al., ICLR 2024; ``XueJiang16/NegLabel:mmcls/models/classifiers/multi_modal.py``, settings from
``custom_config/clip.py``): embed every candidate word with the frozen CLIP text tower (nouns as ``"the nice {w}"``,
adjectives as ``"This is a {w} photo"``) and the in-distribution class names (``"the nice {c}"``), score each
candidate by the ``percentile`` quantile (``pencentile=0.95``) of its cosine similarities to the ID classes, then
**per part of speech** sort ascending (farthest first) and keep the first ``keep`` fraction (``neg_topk=0.15``) of
that part of speech; the selected list is the nouns followed by the adjectives. TDOS
(``song1248/TextDrivenOODSegmentation:models/segmentors/text_driven_ood_seg.py``) reads that list, keeps only the
adjective lines (``"This is a {w} photo"``), in order, and splits them into 50 equal groups (remainder dropped), so
group ``g`` is a band of CLIP-text distance from the ID classes. The defaults reproduce that selection: adjectives
only (``--pos adj``), percentile 0.95, keep 0.15, 50 groups. The model then regularises negative prompt ``g``
towards the mean frozen embedding of ``"a clean origami of a {w}"`` over group ``g``'s words.

Vocabulary: WordNet 3.0 lemma names through ``nltk`` (``--wordnet``; needs ``nltk`` and its ``wordnet`` corpus), or
any word-list file (``--wordlist FILE``: one word per line, ``#`` comments; its words take the first ``--pos``).

File format (JSON, ``--out``): ``{"format": "oodseg.tdos.negatives/1", "clip": …, "percentile": …, "keep": …,
"id_classes": [...], "groups": [[word, …], …], "scores": [[float, …], …]}``; groups ordered farthest first, words
inside a group in distance order. ``TDOS(negatives=<file>)`` reads ``groups``.

CLI: ``python -m oodseg.models.tdos.negatives --clip openai/clip-vit-base-patch16 --wordnet --out negatives.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

FORMAT = "oodseg.tdos.negatives/1"
TEMPLATES = {"noun": "the nice {}", "adj": "This is a {} photo"}  # NegLabel's file order: nouns, then adjectives
ID_TEMPLATE = "the nice {}"
PERCENTILE = 0.95  # NegLabel custom_config/clip.py pencentile
KEEP = 0.15  # NegLabel neg_topk (a fraction of each part of speech)



def read_word_list(path: str | Path) -> list[str]:
    """Words of a one-word-per-line file (blank lines and ``#`` comments skipped, duplicates dropped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: word list not found")
    words = [w.strip() for w in p.read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(w for w in words if w and not w.startswith("#")))


def wordnet_vocabulary(pos: Sequence[str]) -> list[tuple[str, str]]:
    """``(word, pos)`` for every WordNet lemma name of the requested parts of speech (``noun``, ``adj``)."""
    try:
        from nltk.corpus import wordnet as wn

        tags = {"noun": "n", "adj": "a"}
        out = [(w.replace("_", " "), p) for p in pos for w in sorted(wn.all_lemma_names(pos=tags[p]))]
    except (ImportError, LookupError, OSError) as e:
        raise RuntimeError(f"--wordnet needs nltk with its 'wordnet' corpus ({type(e).__name__}); pass "
                           "--wordlist FILE instead") from None
    return out


def similarity_scores(id_emb: torch.Tensor, cand_emb: torch.Tensor, percentile: float) -> torch.Tensor:
    """Per candidate, the ``percentile`` quantile of its cosine similarities to the ID embeddings (both normalised)."""
    sims = cand_emb.float() @ id_emb.float().T
    return torch.quantile(sims, q=percentile, dim=-1)


def _indexes_per_pos(cands: Sequence[tuple[str, str]]) -> dict[str, list[int]]:
    """Candidate indexes per part of speech, in NegLabel's order (nouns, adjectives)."""
    return {p: [i for i, (_, q) in enumerate(cands) if q == p] for p in TEMPLATES}


def mine_negative_groups(
    candidates: Sequence[tuple[str, str]],
    id_names: Sequence[str],
    encode: Callable[[list[str]], torch.Tensor],
    n_groups: int = 50,
    keep: float = KEEP,
    percentile: float = PERCENTILE,
    source: str = "vocabulary",
) -> tuple[list[list[str]], list[list[float]]]:
    """NegLabel's selection: score each candidate by the ``percentile`` quantile of its cosine similarity to the ID
    class prompts, keep the farthest ``keep`` fraction per part of speech (nouns, then adjectives), cut into
    ``n_groups`` equal groups (remainder dropped).

    Args:
        candidates: ``(word, part of speech)`` pairs, pos ``"noun"`` or ``"adj"``; ID class names are dropped.
        encode: prompts → L2-normalised CLIP text embeddings ``[n, D]``.
        source: names the vocabulary in errors.

    Returns:
        ``(groups, scores)``: word groups farthest first, and each word's score (lower = farther).
    """
    id_set = {n.lower() for n in id_names}
    cands = [(w, p) for w, p in dict.fromkeys(candidates) if w.lower() not in id_set]
    if len(cands) < n_groups:
        raise ValueError(f"{source}: {len(cands)} candidate words (after removing ID class names) for {n_groups} "
                         "groups; need at least one word per group")
    by_pos = _indexes_per_pos(cands)
    n_keep = sum(int(len(idx) * keep) for idx in by_pos.values())
    if n_keep < n_groups:
        raise ValueError(f"{source}: keep={keep} of {len(cands)} words leaves {n_keep} < {n_groups} groups; raise "
                         "--keep or use a larger vocabulary")
    id_emb = encode([ID_TEMPLATE.format(n) for n in id_names])
    cand_emb = encode([TEMPLATES[p].format(w) for w, p in cands])
    scores = similarity_scores(id_emb, cand_emb, percentile)
    order = []
    for idx in by_pos.values():
        ranked = torch.sort(scores[idx], stable=True).indices[: int(len(idx) * keep)].tolist()
        order += [idx[r] for r in ranked]
    size = n_keep // n_groups
    groups = [[cands[i][0] for i in order[g * size : (g + 1) * size]] for g in range(n_groups)]
    group_scores = [[float(scores[i]) for i in order[g * size : (g + 1) * size]] for g in range(n_groups)]
    return groups, group_scores


def write_groups(path: str | Path, groups: list[list[str]], scores: list[list[float]], **meta: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"format": FORMAT, **meta, "groups": groups, "scores": scores}, indent=1))
    return p


def read_groups(path: str | Path, n_groups: int | None = None) -> list[list[str]]:
    """The ``groups`` of a negatives file, validated (a one-line error naming the file otherwise)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: negatives file not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not a JSON negatives file ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{p}: not a {FORMAT} file (write one with python -m oodseg.models.tdos.negatives)")
    groups = data.get("groups")
    if not isinstance(groups, list) or not all(isinstance(g, list) and g and all(isinstance(w, str) for w in g)
                                               for g in groups):
        raise ValueError(f"{p}: 'groups' must be a list of non-empty lists of words")
    if n_groups is not None and len(groups) != n_groups:
        raise ValueError(f"{p}: holds {len(groups)} word groups but the model has n_negative={n_groups}")
    return groups


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m oodseg.models.tdos.negatives",
                                 description="Mine NegLabel-style negative word groups for TDOS (JSON output).")
    voc = ap.add_mutually_exclusive_group(required=True)
    voc.add_argument("--wordnet", action="store_true", help="WordNet lemma names via nltk (needs its corpus)")
    voc.add_argument("--wordlist", type=Path, help="one word per line (treated as nouns)")
    ap.add_argument("--clip", default="openai/clip-vit-base-patch16", help="CLIP hub id, local dir, or 'tiny'")
    ap.add_argument("--out", type=Path, required=True, help="output JSON file")
    ap.add_argument("--pos", default="adj", help="parts of speech: noun, adj (comma separated; TDOS: adj; a "
                                                 "--wordlist's words take the first)")
    ap.add_argument("--groups", type=int, default=50, help="number of word groups (TDOS: 50)")
    ap.add_argument("--keep", type=float, default=KEEP, help="fraction of each ranked part of speech kept (NegLabel "
                                                             "0.15)")
    ap.add_argument("--percentile", type=float, default=PERCENTILE, help="similarity quantile over ID classes "
                                                                         "(NegLabel 0.95; 1 = max)")
    ap.add_argument("--batch", type=int, default=256, help="text encoding batch size")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random tiny CLIP")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (see ``--help``); writes the groups file and returns 0."""
    from oodseg.models.tdos.clip import load_clip, load_tokenizer, text_features
    from oodseg.models.tdos.text import CITYSCAPES_OOD_CLASSES

    args = _parser().parse_args(argv)
    pos = [p.strip() for p in args.pos.split(",") if p.strip()]
    if not pos or any(p not in TEMPLATES for p in pos):
        raise SystemExit(f"--pos: expected a comma-separated subset of {sorted(TEMPLATES)}, got {args.pos!r}")
    if args.wordlist is not None:
        source = str(args.wordlist)
        cands = [(w, pos[0]) for w in read_word_list(args.wordlist)]
    else:
        source, cands = "WordNet", wordnet_vocabulary(pos)
    torch.manual_seed(args.seed)
    clip, _ = load_clip(args.clip)
    clip.to(args.device).eval()
    tok = load_tokenizer(args.clip, clip)

    def encode(prompts: list[str]) -> torch.Tensor:
        return text_features(clip, tok, prompts, batch=args.batch)

    groups, scores = mine_negative_groups(cands, CITYSCAPES_OOD_CLASSES[:-1], encode, args.groups, args.keep,
                                          args.percentile, source=source)
    write_groups(args.out, groups, scores, clip=str(args.clip), vocabulary=source, percentile=args.percentile,
                 keep=args.keep, id_classes=list(CITYSCAPES_OOD_CLASSES[:-1]))
    print(f"wrote {len(groups)} groups of {len(groups[0])} words to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
