"""Pick, per row, the valid variant most similar to the correct response.

Default: cosine similarity of mean-pooled UnixCoder embeddings through
sentence-transformers (any local path or Hub name; batched; on GPU when present).
``levenshtein`` is a model-free alternative (normalised edit similarity).
"""

from __future__ import annotations

from collections.abc import Sequence

import Levenshtein
import numpy as np

DEFAULT_EMBEDDER = "microsoft/unixcoder-base"


def levenshtein_scores(
    correct: Sequence[str], candidates: Sequence[Sequence[str]]
) -> list[list[float]]:
    """Normalised edit similarity (1 = identical) of each candidate to its correct code."""
    return [[Levenshtein.ratio(c, v) for v in vs] for c, vs in zip(correct, candidates)]


class EmbeddingScorer:
    """Cosine similarity of sentence-transformers embeddings, batched over all rows."""

    def __init__(
        self, model: str = DEFAULT_EMBEDDER, batch_size: int = 64, device: str | None = None
    ):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model, device=device)
        self.batch_size = batch_size

    def __call__(
        self, correct: Sequence[str], candidates: Sequence[Sequence[str]], progress: bool = True
    ) -> list[list[float]]:
        texts = list(correct) + [v for vs in candidates for v in vs]
        emb = self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=progress,
        )
        ref, rest = emb[: len(correct)], emb[len(correct) :]
        scores, at = [], 0
        for i, vs in enumerate(candidates):
            scores.append((rest[at : at + len(vs)] @ ref[i]).astype(float).tolist())
            at += len(vs)
        return scores


def choose(scores: Sequence[Sequence[float]]) -> list[tuple[int, float] | None]:
    """Index and score of the most similar candidate per row (first on ties), or None."""
    return [(int(np.argmax(s)), float(max(s))) if len(s) else None for s in scores]
