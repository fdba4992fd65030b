"""`build-data filter-image`: drop rows whose images are missing, unreadable, truncated or too small, and
optionally what a user's classifier rejects.

PubMedVision (appendix B.2) drops images under 336x336 pixels and then non-medical images with a
CLIP-based classifier of its own (not released; none is bundled here). Every image of a row is
decoded to the end (a truncated file fails there, not at open), on `image.workers` threads (PIL
releases the GIL while it decodes); JPEGs decode in draft mode, at the smallest DCT scale that is
still at least the minimum size, which reads the whole stream (truncation is still caught) for
a fraction of the work (not when a classifier is set: it gets the image whole). A row is kept when
every one of its images passes: its caption describes them all. Each dropped row names the first failing image and why.

The classifier hook is `--image.classifier module:function` (or `path/to/file.py:function`): the
function takes a list of RGB PIL images and returns one bool, or one score (kept at or above
`image.classifier_threshold`), per image.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from medvl_engine.databuild.config import ImageFilterConfig
from medvl_engine.databuild.stage import Decision, Stage
from medvl_engine.errors import ConfigError


@dataclass
class ImageCheck:
    ok: bool
    reason: str = ""
    detail: str = ""
    size: tuple[int, int] = (0, 0)
    image: Image.Image | None = None  # kept only for the classifier


def check_image(path: str, min_width: int, min_height: int, *, keep_image: bool = False) -> ImageCheck:
    """Decode one image file completely; whether it is there, readable, whole and large enough."""
    file = Path(path)
    if not file.is_file():
        return ImageCheck(False, "missing image file", f"{path} not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                size = image.size
                if size[0] < min_width or size[1] < min_height:
                    return ImageCheck(False, "image too small", f"{path}: {size[0]}x{size[1]} < "
                                                                f"{min_width}x{min_height}", size)
                if image.format == "JPEG" and not keep_image:  # a classifier sees the image whole
                    image.draft("RGB", (min_width, min_height))
                image.load()
                kept = image.convert("RGB") if keep_image else None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return ImageCheck(False, "image too large", f"{path}: {exc}")
    except OSError as exc:
        # PIL says "truncated" when the data ends early; anything else it cannot parse is undecodable.
        reason = "truncated image" if "truncated" in str(exc) else "undecodable image"
        return ImageCheck(False, reason, f"{path}: {exc}")
    except (ValueError, SyntaxError, Image.UnidentifiedImageError) as exc:  # SyntaxError: PIL's parsers
        return ImageCheck(False, "undecodable image", f"{path}: {exc}")
    return ImageCheck(True, size=size, image=kept)


def load_callable(spec: str):
    """`module:function` or `path/to/file.py:function` -> the function."""
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"image.classifier: {path} not found")
        module_spec = importlib.util.spec_from_file_location(f"medvl_classifier_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"image.classifier: {spec!r} names no callable")
    return fn


class ImageFilter(Stage):
    name = "filter-image"

    def __init__(self, cfg: ImageFilterConfig):
        self.cfg = cfg
        self.classifier = load_callable(cfg.classifier) if cfg.classifier else None
        # Decoded images wait for the classifier a batch at a time: bound the batch by its size.
        self.batch_size = cfg.classifier_batch if self.classifier else 256
        self.executor = ThreadPoolExecutor(cfg.workers, thread_name_prefix="filter-image")

    def identity(self) -> dict:
        return {"min_width": self.cfg.min_width, "min_height": self.cfg.min_height,
                "classifier": self.cfg.classifier, "classifier_threshold": self.cfg.classifier_threshold}

    def decide(self, records):
        paths = [(i, path) for i, record in enumerate(records) for path in record.images]
        checks = list(self.executor.map(
            lambda item: check_image(item[1], self.cfg.min_width, self.cfg.min_height,
                                     keep_image=self.classifier is not None), paths))
        failed: dict[int, Decision] = {}
        for (i, _), check in zip(paths, checks):
            if not check.ok and i not in failed:
                failed[i] = Decision(False, check.reason, check.detail)
        if self.classifier is not None:
            self._classify(paths, checks, failed)
        out = []
        for i, record in enumerate(records):
            if not record.images:
                out.append(Decision(False, "no images", "the row has no image"))
            else:
                out.append(failed.get(i, Decision(True)))
        return out

    def _classify(self, paths, checks, failed: dict[int, Decision]) -> None:
        todo = [(i, path, check) for (i, path), check in zip(paths, checks) if check.ok and i not in failed]
        if not todo:
            return
        verdicts = list(self.classifier([check.image for _, _, check in todo]))
        if len(verdicts) != len(todo):
            raise ConfigError(f"image.classifier returned {len(verdicts)} verdicts for {len(todo)} images")
        for (i, path, check), verdict in zip(todo, verdicts):
            check.image = None
            keep = bool(verdict) if isinstance(verdict, bool) else float(verdict) >= self.cfg.classifier_threshold
            if not keep and i not in failed:
                failed[i] = Decision(False, "rejected by classifier", f"{path}: {verdict!r}")

    def close(self) -> None:
        self.executor.shutdown(wait=True)
