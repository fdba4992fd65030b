"""The `build-data` run config: one section per stage, composed into `BuildDataConfig`.

Flags derive from the fields (`--input.source`, `--text.min-terms`, `--image.min-width`,
`--dedup.threshold`, `--reformat.model`, `--rollout.temperature`, ...), and `--config FILE` reads the
same keys from YAML or TOML, so `medvl-engine build-data all --config build.yaml` runs every stage
with one file. Defaults are the paper's (PubMedVision, section 3.1 and appendix B) where it gives one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from medvl_engine.config import param
from medvl_engine.errors import ConfigError
from medvl_engine.rollout.config import RolloutConfig

STAGES = ("filter-text", "filter-image", "dedup", "reformat")
Stage = Literal["filter-text", "filter-image", "dedup", "reformat", "all"]


@dataclass
class InputConfig:
    """Where the image-caption rows come from and which fields hold what."""

    source: str = param("", "a jsonl or parquet file, a save_to_disk folder or a hub name")
    split: str = param("train", "split to read when the source has several")
    id_field: str = param("", "field with the row's source id (empty: id, pair_id, ...; else row-N)")
    image_field: str = param("", "field with the image path(s) or bytes (empty: images, image, ...)")
    caption_field: str = param("", "field with the caption (empty: caption, fig_caption, text)")
    context_field: str = param("", "field with the inline mentions (empty: context, in_text_mention, ...)")
    image_root: str = param("", "folder relative image paths start from (empty: the source's folder)")
    max_rows: int = param(0, "read only the first N rows (0: all)")

    def __post_init__(self):
        if self.max_rows < 0:
            raise ConfigError(f"input.max_rows: must be >= 0, got {self.max_rows}")


@dataclass
class TextFilterConfig:
    """filter-text: keep captions (+ inline mentions) with enough medical terms."""

    lexicon: str = param("", "term file, one term per line (text after a tab ignored; empty: the bundled one)")
    min_terms: int = param(5, "keep rows with at least this many terms (PubMedVision: 5)")
    count: Literal["occurrences", "distinct"] = param("occurrences", "count every occurrence, or distinct terms")

    def __post_init__(self):
        if self.min_terms < 0:
            raise ConfigError(f"text.min_terms: must be >= 0, got {self.min_terms}")


@dataclass
class ImageFilterConfig:
    """filter-image: drop unreadable and small images, and what a classifier rejects."""

    min_width: int = param(336, "smallest width kept, in pixels (PubMedVision: 336)")
    min_height: int = param(336, "smallest height kept, in pixels (PubMedVision: 336)")
    classifier: str = param("", "`module:function` or `file.py:function` taking a list of PIL images and "
                                "returning one bool or score per image (empty: none)")
    classifier_threshold: float = param(0.5, "a score at or above this keeps the image")
    classifier_batch: int = param(32, "images per classifier call")
    workers: int = param(2, "threads decoding images (PIL releases the GIL while decoding)")

    def __post_init__(self):
        if self.min_width < 1 or self.min_height < 1:
            raise ConfigError("image.min_width and image.min_height: must be >= 1")
        if self.classifier and ":" not in self.classifier:
            raise ConfigError(f"image.classifier: {self.classifier!r} is not `module:function` or `file.py:function`")
        if self.classifier_batch < 1 or self.workers < 1:
            raise ConfigError("image.classifier_batch and image.workers: must be >= 1")


@dataclass
class DedupConfig:
    """dedup: drop a row whose caption embedding is too similar to an earlier kept row's."""

    model: str = param("smollm2", "sentence-transformers folder, any Hugging Face text model folder "
                                  "(mean-pooled), or `smollm2` (the embedded default)")
    threshold: float = param(0.995, "drop when cosine similarity to an earlier kept row exceeds this "
                                   "(0.995 suits the default encoder: see medvl_engine/databuild/dedup.py)")
    batch_size: int = param(64, "captions embedded per encoder call and compared per step")
    max_seq_length: int = param(256, "caption tokens embedded (longer ones are cut: dedup only)")
    device: str = param("auto", "torch device for the encoder and the search (auto: cuda when present)")
    block_rows: int = param(16384, "kept embeddings per block of the search (one matrix product each)")

    def __post_init__(self):
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"dedup.threshold: a cosine similarity in [-1, 1], got {self.threshold}")
        for name in ("batch_size", "max_seq_length", "block_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"dedup.{name}: must be >= 1, got {getattr(self, name)}")


def reformat_rollout() -> RolloutConfig:
    return RolloutConfig(n=1, temperature=0.7, top_p=0.95, max_response_tokens=1024, max_prompt_tokens=8192,
                         seed=42, max_in_flight=16)


@dataclass
class ReformatConfig:
    """reformat: an image-text model writes a description and a question-answer pair per row (as JSON)."""

    model: str = param("", "image-text model folder (Qwen2.5-VL family) that sees the images and the context")
    max_attempts: int = param(3, "replies per row before an invalid one is reported (each with a new seed)")
    seed: int = param(42, "scenario and alignment-question sampling seed")
    dataset_name: str = param("pubmedvision", "dataset_name of the records written")

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ConfigError(f"reformat.max_attempts: must be >= 1, got {self.max_attempts}")
        if self.seed < 0:
            raise ConfigError(f"reformat.seed: must be >= 0, got {self.seed}")


@dataclass
class BuildDataConfig:
    """`medvl-engine build-data STAGE`: one stage, or `all` of them in order, on one config."""

    stage: Stage = param(help="filter-text, filter-image, dedup, reformat, or all (in that order)", positional=True)
    output: str = param("", "run folder (one stage: its files; all: one subfolder per stage)")
    overwrite: bool = param(False, "delete the run folder first instead of resuming it")
    checkpoint_rows: int = param(1000, "rows between two checkpoints (a crash redoes at most this many)")
    progress: bool = param(True, "show a progress bar")
    input: InputConfig = field(default_factory=InputConfig)
    text: TextFilterConfig = field(default_factory=TextFilterConfig)
    image: ImageFilterConfig = field(default_factory=ImageFilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    reformat: ReformatConfig = field(default_factory=ReformatConfig)
    rollout: RolloutConfig = field(default_factory=reformat_rollout)

    def __post_init__(self):
        if not self.output:
            raise ConfigError("output: is required (the run folder)")
        if not self.input.source:
            raise ConfigError("input.source: is required (the image-caption rows)")
        if self.checkpoint_rows < 1:
            raise ConfigError(f"checkpoint_rows: must be >= 1, got {self.checkpoint_rows}")
        if self.stage in ("reformat", "all"):
            if not self.reformat.model:
                raise ConfigError("reformat.model: is required for the reformat stage (an image-text model folder)")
            if self.rollout.n != 1:
                raise ConfigError(f"rollout.n: reformat asks one reply per attempt, got {self.rollout.n}")
            if self.rollout.dynamic_sampling:
                raise ConfigError("rollout.dynamic_sampling: reformat keeps every reply")
            if self.reformat.max_attempts > 1:
                self.rollout.require_sampling("every attempt would get the same reply; or set reformat.max_attempts 1")
