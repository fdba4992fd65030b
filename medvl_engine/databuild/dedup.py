"""`build-data dedup`: drop a row whose caption says what an earlier kept row's caption already said.

PubMedVision (appendix B.3) embeds the captions with a Sentence-BERT model (all-mpnet-base-v2) and drops
rows whose embedding is too similar to another's. Here:

- Encoder: any sentence-transformers folder, or any Hugging Face text model folder turned into one by
  sentence-transformers' own modules (Transformer -> mean Pooling -> Normalize). The offline default
  is the embedded SmolLM2-135M that way. Its mean-pooled states are anisotropic (every caption is close
  to every other): measured on medical captions, near-duplicates (a word or two changed) score
  0.996-0.999, captions of one template with other findings up to 0.991, unrelated captions 0.88-0.97;
  hence the default threshold 0.995. A real sentence encoder wants a lower one (e.g. 0.9 for
  all-mpnet-base-v2, pass its folder with --dedup.model).
- Rule: rows are taken in order, and a row is dropped when its cosine similarity to any earlier *kept*
  row exceeds `dedup.threshold` (a row similar only to dropped rows is kept).
- Search: exact. The kept embeddings live in fixed blocks of `dedup.block_rows` rows (float32, on
  the encoder's device); a batch of new rows is compared with each block in one matrix product
  (batch x block), and with the earlier rows of its own batch; no Python loop over pairs. Memory is
  the kept embeddings (rows x dim x 4 bytes: 1M x 576 is 2.3 GB) plus one batch x block product.
  Compute is rows x kept x dim multiply-adds: seconds per million rows on a GPU, hours on 2 CPU cores.

The kept embeddings are appended to `embeddings.f32` beside the outputs (checkpointed with them), so
a resumed run reloads its index from there instead of embedding the kept captions again.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import numpy as np

from medvl_engine.databuild.config import DedupConfig
from medvl_engine.databuild.stage import KEPT, Decision, Stage
from medvl_engine.errors import RunFolderError

EMBEDDINGS = "embeddings.f32"


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_encoder(model: str, *, device: str = "cpu", max_seq_length: int = 256):
    """A SentenceTransformer: the folder's own when it is a sentence-transformers folder, else the text model
    mean-pooled and normalised. `smollm2` is the embedded default model."""
    import torch
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Normalize, Pooling, Transformer

    from medvl_engine.models import resolve_model_path

    path = resolve_model_path(model)
    if (Path(path) / "modules.json").is_file():
        encoder = SentenceTransformer(path, device=device)
        encoder.max_seq_length = max_seq_length
        return encoder
    # float32: the embedded model is stored in bf16, which is slower than float32 on a CPU.
    transformer = Transformer(path, max_seq_length=max_seq_length, model_kwargs={"dtype": torch.float32})
    tokenizer = transformer.tokenizer
    if tokenizer.pad_token is None:  # causal LMs often have none; padding is masked out of the mean anyway
        tokenizer.pad_token = tokenizer.eos_token
    dim = transformer.get_embedding_dimension() if hasattr(transformer, "get_embedding_dimension") \
        else transformer.get_word_embedding_dimension()
    return SentenceTransformer(modules=[transformer, Pooling(dim, pooling_mode="mean"), Normalize()], device=device)


def embed(encoder, texts: list[str], batch_size: int) -> np.ndarray:
    """Unit-length float32 embeddings, one row per text."""
    out = encoder.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                         show_progress_bar=False)
    return np.ascontiguousarray(out, dtype=np.float32)


class Deduplicator:
    """Exact greedy deduplication of unit vectors against the kept ones (see the module docstring).

        dedup = Deduplicator(dim=576, threshold=0.995)
        keep, similarity, match = dedup.add(batch)   # match: index of the kept row it duplicates, or -1
    """

    def __init__(self, dim: int, threshold: float, *, device: str = "cpu", block_rows: int = 16384):
        import torch

        self.dim = dim
        self.threshold = float(threshold)
        self.device = torch.device(device)
        self.block_rows = block_rows
        self.blocks: list = []  # [block_rows, dim] float32 tensors; the last one is filled up to `count`
        self.count = 0

    @property
    def nbytes(self) -> int:
        return len(self.blocks) * self.block_rows * self.dim * 4

    def _append(self, vectors) -> None:
        import torch

        done = 0
        while done < len(vectors):
            offset = self.count % self.block_rows
            if offset == 0:
                self.blocks.append(torch.empty((self.block_rows, self.dim), dtype=torch.float32, device=self.device))
            take = min(self.block_rows - offset, len(vectors) - done)
            self.blocks[-1][offset:offset + take] = vectors[done:done + take]
            done += take
            self.count += take

    def load(self, vectors: np.ndarray) -> None:
        """Add vectors as kept without checking them (a resumed run's index)."""
        import torch

        self._append(torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(self.device))

    def nearest(self, queries) -> tuple:
        """Best similarity to the kept vectors and its index (-inf and -1 when none are kept)."""
        import torch

        best = torch.full((len(queries),), -float("inf"), device=self.device)
        where = torch.full((len(queries),), -1, dtype=torch.long, device=self.device)
        for b, block in enumerate(self.blocks):
            filled = min(self.block_rows, self.count - b * self.block_rows)
            sims = queries @ block[:filled].T  # one [batch, block] product
            value, index = sims.max(dim=1)
            better = value > best
            best = torch.where(better, value, best)
            where = torch.where(better, index + b * self.block_rows, where)
        return best, where

    def add(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decide a batch in order; kept rows join the index. Returns (keep, similarity, match) per row:
        `match` is the kept index a dropped row duplicates (for a kept row: its nearest, or -1)."""
        import torch

        if batch.ndim != 2 or batch.shape[1] != self.dim:
            raise ValueError(f"Deduplicator: expected [rows, {self.dim}] embeddings, got {batch.shape}")
        queries = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        best, where = self.nearest(queries)
        inside = (queries @ queries.T).cpu().numpy()  # the batch against itself, for rows kept earlier in it
        best, where = best.cpu().numpy(), where.cpu().numpy()
        keep = np.zeros(len(batch), dtype=bool)
        kept_here: list[int] = []
        for i in range(len(batch)):
            if best[i] > self.threshold:
                continue
            if kept_here:
                sims = inside[i, kept_here]
                j = int(np.argmax(sims))
                if sims[j] > self.threshold:
                    best[i], where[i] = sims[j], self.count + j  # the index it will have once appended
                    continue
            keep[i] = True
            kept_here.append(i)
        if kept_here:
            self._append(queries[kept_here])
        return keep, best, where


class DedupFilter(Stage):
    name = "dedup"
    extra_files = (EMBEDDINGS,)

    def __init__(self, cfg: DedupConfig, *, encoder=None):
        self.cfg = cfg
        self.batch_size = cfg.batch_size
        self.device = resolve_device(cfg.device)
        self.encoder = encoder or load_encoder(cfg.model, device=self.device, max_seq_length=cfg.max_seq_length)
        self.index: Deduplicator | None = None
        self.ids: list[str] = []
        self.out = None

    def identity(self) -> dict:
        model = self.cfg.model
        if Path(model).exists():
            model = str(Path(model).absolute())
        return {"model": model, "threshold": self.cfg.threshold, "max_seq_length": self.cfg.max_seq_length}

    def restore(self, run, extra: dict, counters: dict) -> None:
        from medvl_engine.databuild.records import decode_record

        self.out = run.files[EMBEDDINGS]
        dim = extra.get("dim")
        if not dim:
            return
        self._make_index(dim)
        kept = np.fromfile(run.folder / EMBEDDINGS, dtype=np.float32).reshape(-1, dim)
        self.index.load(kept)
        with (run.folder / KEPT).open("rb") as f:
            self.ids = [decode_record(line).id for line in f]
        if len(self.ids) != self.index.count:
            raise RunFolderError(f"{run.folder}: {len(self.ids)} kept rows but {self.index.count} kept embeddings")

    def _make_index(self, dim: int) -> None:
        self.index = Deduplicator(dim, self.cfg.threshold, device=self.device, block_rows=self.cfg.block_rows)

    def extra(self) -> dict:
        return {"dim": self.index.dim} if self.index is not None else {}

    def decide(self, records):
        vectors = embed(self.encoder, [r.caption for r in records], self.cfg.batch_size)
        if self.index is None:
            self._make_index(vectors.shape[1])
        keep, sims, match = self.index.add(vectors)
        self.out.write(vectors[keep].tobytes())
        out = []
        for record, k, s, m in zip(records, keep, sims, match):
            if k:
                self.ids.append(record.id)
                out.append(Decision(True))
            else:
                out.append(Decision(False, "near-duplicate caption", f"similarity {s:.4f} to kept row "
                                                                      f"{json.dumps(self.ids[m])}"))
        return out

    def summary(self, counters: dict) -> tuple[dict, str]:
        count = self.index.count if self.index is not None else 0
        dim = self.index.dim if self.index is not None else 0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        text = (f"\nindex: {count} kept embeddings x {dim} dims, {count * dim * 4 / 2**20:.1f} MiB of vectors "
                f"({self.index.nbytes / 2**20 if self.index else 0:.1f} MiB allocated); "
                f"process memory peak {peak / 2**20:.0f} MiB\n")
        return {"kept_embeddings": count, "dim": dim, "peak_rss_bytes": peak}, text
