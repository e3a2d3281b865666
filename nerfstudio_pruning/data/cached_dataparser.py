"""`nerfstudio-data` for read-only datasets: downscaled images are made once in a cache, not next to the data.

nerfstudio's parser expects `images_<factor>/` beside `images/` when `--downscale-factor` is given and fails
when it is missing. Shared or read-only captures (such as ../shared/data here) cannot hold those folders, so
this parser builds a mirror in the user's cache: links to the original files plus the downscaled images, made
once with a progress bar. Everything else is nerfstudio's own `nerfstudio-data` parser.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Type

from nerfstudio.data.dataparsers.nerfstudio_dataparser import Nerfstudio, NerfstudioDataParserConfig
from nerfstudio.plugins.registry_dataparser import DataParserSpecification


def default_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nerfstudio-pruning"


def downscaled_mirror(data_dir: Path, factor: int, cache_root: Path) -> Path:
    """A directory that looks like `data_dir` and also holds `images_<factor>/`. Built once, atomically."""
    from PIL import Image
    from tqdm import tqdm

    data_dir = data_dir.resolve()
    key = hashlib.sha1(str(data_dir).encode()).hexdigest()[:10]
    mirror = cache_root / f"{data_dir.name}-{key}"
    target = mirror / f"images_{factor}"
    if target.is_dir():
        return mirror
    mirror.mkdir(parents=True, exist_ok=True)
    for entry in data_dir.iterdir():
        link = mirror / entry.name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(entry)
    sources = sorted(p for p in (data_dir / "images").iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    staging = Path(tempfile.mkdtemp(dir=mirror, prefix=f".images_{factor}-"))
    try:
        for src in tqdm(sources, desc=f"downscaling {data_dir.name} by {factor} into {mirror}", unit="img"):
            with Image.open(src) as im:
                # floor, as nerfstudio's default `downscale_rounding_mode` and Cameras.rescale_output_resolution
                size = (im.width // factor, im.height // factor)
                im.resize(size, Image.BICUBIC).save(staging / src.name, quality=95)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return mirror


@dataclass
class CachedNerfstudioDataParserConfig(NerfstudioDataParserConfig):
    """nerfstudio-data that makes missing downscaled images in a cache instead of failing."""

    _target: Type = field(default_factory=lambda: CachedNerfstudio)
    cache_dir: Path = field(default_factory=default_cache_root)
    """Where downscaled copies of read-only datasets are kept."""
    load_3D_points: bool = True
    """Seed splatfacto from the capture's sparse points (nerfstudio-data's own default is False)."""


class CachedNerfstudio(Nerfstudio):
    config: CachedNerfstudioDataParserConfig

    def _generate_dataparser_outputs(self, split: str = "train", **kwargs):
        factor = self.config.downscale_factor
        data = self.config.data
        if factor is not None and factor > 1 and data.is_dir() and not (data / f"images_{factor}").is_dir():
            if not (data / "images").is_dir():
                raise FileNotFoundError(f"{data} has no images/ folder to downscale")
            # Only this parser sees the mirror; the run's saved config keeps the user's path.
            self.config = replace(self.config, data=downscaled_mirror(data, factor, self.config.cache_dir))
        return super()._generate_dataparser_outputs(split, **kwargs)


cached_nerfstudio_dataparser = DataParserSpecification(
    config=CachedNerfstudioDataParserConfig(),
    description="nerfstudio-data that keeps downscaled images of read-only datasets in a cache",
)
