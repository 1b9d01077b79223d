"""Synthetic data for demos, tests and benchmarks, made from real bundled data (nothing is downloaded).

- `images`: scikit-image's bundled photographs, crops, encoding, EXIF-rotated JPEGs and web-size
  photos of scikit-learn's real handwritten digits;
- `crawls`: crawls on disk made of those digit photos (WebVision layout, class folders, the
  sklearn digits set, the benchmarks' grainy web-size crawl), a real, learnable 10-class set
  with WebVision's problems switchable on: class imbalance, label noise, near-duplicate re-uploads;
- `duplicates`: near-duplicate and look-alike sets, the ground truth for dedup.

Needs the `synth` extra (`pip install 'wvdata[synth]'`).
"""
from __future__ import annotations

from .crawls import (
                     Crawl,
                     make_digits_folder,
                     make_folder_crawl,
                     make_grainy_crawl,
                     make_noisy_digits,
                     make_webvision_crawl,
)
from .images import DIGIT_NAMES, WEB_SIZES, crop, digit_image, digits, encode, exif_jpeg, jpeg, photo, photos

__all__ = ["DIGIT_NAMES", "WEB_SIZES", "Crawl", "crop", "digit_image", "digits", "encode", "exif_jpeg", "jpeg",
           "make_digits_folder", "make_folder_crawl", "make_grainy_crawl", "make_noisy_digits",
           "make_webvision_crawl", "photo", "photos"]
