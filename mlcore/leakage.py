"""Near-duplicate detection between training and test images.

Public skin-lesion sets contain the same photo twice, resized or re-encoded; a test image that
also sits in the training set inflates every metric. Detection has two stages:

1. pHash (64-bit DCT hash) finds candidates: it survives resizing and JPEG re-encoding.
2. A 32x32 colour thumbnail confirms them: the mean absolute difference (0-255) must be at most
   2.8. Re-encoded (JPEG quality 50) and resized (0.5x to 2x) copies measured at most 2.7; the
   closest distinct pair among 600 test and 1,500 training synthetic lesions measured 2.9. Lesion
   photos look alike at pHash resolution (a dark blob on skin), so pHash alone would flag 14% of
   distinct synthetic test images. Two distinct photos closer than 2.8 are indistinguishable from a
   copy at thumbnail size, and inflate test metrics the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.fft import dctn

MAX_HAMMING = 12  # of 64 bits: generous, candidates only
MAX_THUMBNAIL_DIFFERENCE = 2.8  # mean absolute difference of 32x32 RGB thumbnails, 0-255


@dataclass(frozen=True)
class Fingerprint:
    phash: int
    thumbnail: np.ndarray  # 32x32x3 uint8


def perceptual_hash(image: Image.Image) -> int:
    """pHash: the signs of the low-frequency 8x8 DCT coefficients of a 32x32 grey image against
    their median (the DC term excluded from the median)."""
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dctn(grey, norm="ortho")[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


def fingerprint(image: Image.Image) -> Fingerprint:
    thumbnail = np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BOX), dtype=np.uint8)
    return Fingerprint(perceptual_hash(image), thumbnail)


@dataclass(frozen=True)
class DuplicateReport:
    test_indices: list[int]  # test images that have a near-duplicate in train
    train_indices: list[int]  # the matching training image for each
    hamming: list[int]
    thumbnail_difference: list[float]

    @property
    def count(self) -> int:
        return len(self.test_indices)


def find_near_duplicates(
    test: list[Fingerprint],
    train: list[Fingerprint],
    *,
    max_hamming: int = MAX_HAMMING,
    max_thumbnail_difference: float = MAX_THUMBNAIL_DIFFERENCE,
) -> DuplicateReport:
    found: list[int] = []
    matches: list[int] = []
    hamming_distances: list[int] = []
    differences: list[float] = []
    if not train:
        return DuplicateReport(found, matches, hamming_distances, differences)
    train_hashes = np.asarray([f.phash for f in train], dtype=np.uint64)
    train_thumbnails = np.stack([f.thumbnail for f in train]).astype(np.float32)
    for index, item in enumerate(test):
        hamming = np.bitwise_count(train_hashes ^ np.uint64(item.phash))
        candidates = np.flatnonzero(hamming <= max_hamming)
        if len(candidates) == 0:
            continue
        difference = np.abs(train_thumbnails[candidates] - item.thumbnail.astype(np.float32)).mean(axis=(1, 2, 3))
        best = int(difference.argmin())
        if difference[best] <= max_thumbnail_difference:
            found.append(index)
            matches.append(int(candidates[best]))
            hamming_distances.append(int(hamming[candidates[best]]))
            differences.append(float(difference[best]))
    return DuplicateReport(found, matches, hamming_distances, differences)
