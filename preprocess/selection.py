"""Pick, per row, the valid variant most similar to the correct response.

Default: cosine similarity of mean-pooled UnixCoder embeddings through
sentence-transformers (any local path or Hub name; batched; on GPU when present).
``levenshtein`` is a model-free alternative (normalised edit similarity).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import Levenshtein
import numpy as np

DEFAULT_EMBEDDER = "microsoft/unixcoder-base"
CPU_BATCH = 16  # on a CPU a bigger batch only pads more
MAX_BATCH = 1024  # past this a GPU gains nothing and one batch holds up the progress bar
LOG = logging.getLogger("fgit.selection")


def gpu_batch_size(
    free_bytes: int, seq_len: int, hidden: int, intermediate: int, heads: int, itemsize: int
) -> int:
    """Rows per batch whose encoder activations fit in half of ``free_bytes``.

    One row of ``seq_len`` tokens holds at most, inside one layer of a forward without
    gradients: about six hidden-sized tensors (input, Q, K, V, context, output), two of
    the feed-forward width (before and after the activation) and two attention maps (scores
    and probabilities, when the kernel materialises them). Batches are length-sorted,
    longest first, so the first batch is the largest one the run will need.
    """
    per_row = seq_len * (6 * hidden + 2 * intermediate + 2 * heads * seq_len) * itemsize
    return int(max(1, min(MAX_BATCH, free_bytes // 2 // per_row)))


def levenshtein_scores(
    correct: Sequence[str], candidates: Sequence[Sequence[str]]
) -> list[list[float]]:
    """Normalised edit similarity (1 = identical) of each candidate to its correct code."""
    return [[Levenshtein.ratio(c, v) for v in vs] for c, vs in zip(correct, candidates)]


class EmbeddingScorer:
    """Cosine similarity of sentence-transformers embeddings, batched over all rows.

    Every distinct text is encoded once, in length-sorted batches, on the GPU when there is
    one. ``batch_size=None`` sizes the batches to the GPU's free memory (``gpu_batch_size``;
    16 on a CPU); a batch that still runs out of GPU memory is halved and retried.

    The encoder runs in float32 unless asked otherwise, so the dataset does not depend on
    the hardware: a row's candidates often differ by a token and their cosines by about
    1e-4, near half-precision rounding. On mutation variants of 256 functions, bfloat16
    (2x faster on AMX CPUs) picked another candidate on 3.5% of rows, float16 on 0.8%.
    """

    def __init__(
        self,
        model: str = DEFAULT_EMBEDDER,
        batch_size: int | None = None,
        device: str | None = None,
        dtype: str = "float32",
    ):
        import torch
        from sentence_transformers import SentenceTransformer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        try:
            self.model = SentenceTransformer(
                model, device=device, model_kwargs={"dtype": getattr(torch, self.dtype)}
            )
        except Exception as err:  # the Hub and sentence-transformers raise many types
            raise OSError(
                f"--embedder {model} cannot be loaded ({type(err).__name__}: "
                f"{str(err)[:300]}); pass a local sentence-transformers folder"
            ) from err
        self.batch_size = batch_size or self._fitting_batch_size()

    def _fitting_batch_size(self) -> int:
        """``gpu_batch_size`` for this encoder on its GPU; ``CPU_BATCH`` elsewhere."""
        import torch

        if self.model.device.type != "cuda":
            return CPU_BATCH
        config = getattr(getattr(self.model[0], "auto_model", None), "config", None)
        dims = [getattr(config, k, None) for k in ("hidden_size", "intermediate_size")]
        dims.append(getattr(config, "num_attention_heads", None))
        if None in dims or not self.model.max_seq_length:
            LOG.info("embedder is not a transformer encoder: batches of %d rows", CPU_BATCH)
            return CPU_BATCH
        free, _ = torch.cuda.mem_get_info(self.model.device)
        itemsize = torch.finfo(getattr(torch, self.dtype)).bits // 8
        size = gpu_batch_size(free, self.model.max_seq_length, *dims, itemsize)
        LOG.info("embedding batches of %d rows (%.1f GB of GPU memory free)", size, free / 2**30)
        return size

    def _encode(self, texts: list[str], progress: bool) -> np.ndarray:
        """Embeddings of ``texts``; halves the batch while the GPU runs out of memory."""
        import torch

        while True:
            try:
                return self.model.encode(
                    texts,
                    batch_size=self.batch_size,
                    convert_to_numpy=True,
                    show_progress_bar=progress,
                )
            except torch.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                torch.cuda.empty_cache()
                self.batch_size //= 2
                LOG.warning(
                    "the embedder ran out of GPU memory; retrying with batches of %d rows "
                    "(pass --embed-batch-size to choose)",
                    self.batch_size,
                )

    def __call__(
        self, correct: Sequence[str], candidates: Sequence[Sequence[str]], progress: bool = True
    ) -> list[list[float]]:
        texts = list(dict.fromkeys([*correct, *(v for vs in candidates for v in vs)]))
        emb = self._encode(texts, progress).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12)  # cosine in float32
        at = {text: i for i, text in enumerate(texts)}
        return [
            [min(1.0, float(emb[at[v]] @ emb[at[c]])) for v in vs]
            for c, vs in zip(correct, candidates)
        ]


def choose(scores: Sequence[Sequence[float]]) -> list[tuple[int, float] | None]:
    """Index and score of the most similar candidate per row (first on ties), or None."""
    return [(int(np.argmax(s)), float(max(s))) if len(s) else None for s in scores]
