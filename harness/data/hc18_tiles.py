"""HC18 cut into a fixed grid of tiles: samples in which the head is sometimes absent.

On whole HC18 images the head is always present, so a class-presence target is constant
and a presence head (TDSNet's ``L_cls`` and sync loss) learns nothing. Cutting each image
into non-overlapping ``tile`` = ``(h, w)`` tiles gives samples without the head (about a
quarter of the 80 x 80 tiles of the embedded 160 x 240 sample), so presence varies per
sample, and a network without the image's context must decide from the tile alone.

Splits are drawn over whole images exactly as :class:`~.hc18.HC18` draws them, so the
tiles of one image never fall into two splits. Each tile sample carries, besides the
usual keys (its own ``presence``, computed from the tile's mask):

* ``image_id`` (str): the HC18 case the tile was cut from;
* ``tile_origin`` int64 ``(2,)``: row and column of the tile's top-left pixel in that image.

The tiles of an image partition it, so per-image results can be pooled from the tiles
(:func:`stitch`). An image whose size is not a multiple of ``tile`` is an error naming
both sizes (tiles never overlap and never leave pixels out).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base import register_dataset
from .hc18 import HC18
from .io import DatasetError


@register_dataset("hc18_tiles")
class HC18Tiles(HC18):
    name = "hc18_tiles"

    def __init__(self, root, split="train", *, tile: tuple[int, int] = (80, 80), image_size: tuple[int, int] = (160, 240),
                 seed: int = 0, **kw):
        """``tile``: ``(h, w)`` of a tile; ``image_size``: ``(H, W)`` of every image of the
        folder (the embedded sample's by default), a multiple of ``tile`` on both axes."""
        tile, image_size = tuple(int(t) for t in tile), tuple(int(s) for s in image_size)
        if len(tile) != 2 or len(image_size) != 2 or min(tile + image_size) < 1:
            raise ValueError(f"tile and image_size must be two positive sizes (h, w), got {tile}, {image_size}")
        if image_size[0] % tile[0] or image_size[1] % tile[1]:
            raise ValueError(f"image_size {image_size} must be a multiple of tile {tile} on both axes")
        self.tile, self.image_size = tile, image_size
        super().__init__(root, split, seed=seed, **kw)

    def _select(self, records, split):
        (th, tw), (h, w) = self.tile, self.image_size
        return [{**rec, "case_id": f"{rec['case_id']}@{r}x{c}", "image_id": rec["case_id"], "tile_origin": [r, c]}
                for rec in super()._select(records, split) for r in range(0, h, th) for c in range(0, w, tw)]

    def _load(self, rec):
        sample = super()._load(rec)
        size = tuple(sample["mask"].shape)
        if size != self.image_size:
            raise DatasetError(rec["image"], f"image is {size[0]} x {size[1]}, data.options.image_size says "
                                             f"{self.image_size[0]} x {self.image_size[1]}")
        (r, c), (th, tw) = rec["tile_origin"], self.tile
        sample["image"] = sample["image"][:, r:r + th, c:c + tw].contiguous()
        sample["mask"] = sample["mask"][r:r + th, c:c + tw].contiguous()
        sample.pop("hc_mm", None)  # a property of the whole head, not of a tile
        sample.pop("presence", None)  # recomputed from the tile's mask
        sample["image_id"] = rec["image_id"]
        sample["tile_origin"] = torch.tensor([r, c], dtype=torch.int64)
        return sample


def stitch(tiles: Sequence[torch.Tensor], origins: Sequence[Sequence[int]], size: Sequence[int]) -> torch.Tensor:
    """Tiles ``(..., h, w)`` placed at ``origins`` ((row, col) each) into one ``(..., H, W)`` map, ``size = (H, W)``.

    Every pixel must be covered exactly once (the tiles of one image of :class:`HC18Tiles`);
    anything else is a ``ValueError``.
    """
    if not len(tiles) or len(tiles) != len(origins):
        raise ValueError(f"stitch: expected as many origins as tiles (at least one), got {len(tiles)} tiles, "
                         f"{len(origins)} origins")
    lead = tuple(tiles[0].shape[:-2])
    out = torch.zeros(lead + tuple(size), dtype=tiles[0].dtype)
    covered = torch.zeros(tuple(size), dtype=torch.int32)
    for t, (r, c) in zip(tiles, origins):
        r, c = int(r), int(c)
        h, w = t.shape[-2:]
        if r < 0 or c < 0 or r + h > size[0] or c + w > size[1] or tuple(t.shape[:-2]) != lead:
            raise ValueError(f"tile of shape {tuple(t.shape)} at ({r}, {c}) does not fit the {lead + tuple(size)} map")
        out[..., r:r + h, c:c + w] = t
        covered[r:r + h, c:c + w] += 1
    if not bool((covered == 1).all()):
        raise ValueError(f"tiles cover {int((covered == 0).sum())} pixels of the image zero times and "
                         f"{int((covered > 1).sum())} more than once; expected a partition")
    return out
