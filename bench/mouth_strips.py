#!/usr/bin/env python3
"""Mouth close-ups of rendered clips, enlarged 4x (nearest neighbour: every pixel visible).

    python bench/mouth_strips.py OUT.png CLIP.mp4 [CLIP2.mp4 ...] [--frames 60 64 68]

One row per clip, the same frames of each; the mouth box comes from dlib's 68 landmarks on the
clip's first frame (the face barely moves in a clip), so rows of the same portrait line up for
a before/after comparison.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np


def _frames(path: Path, wanted: list[int]) -> dict[int, np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    out, i = {}, 0
    while len(out) < len(wanted):
        ok, f = cap.read()
        if not ok:
            break
        if i == 0 or i in wanted:
            out[i] = cv2.cvtColor(f, cv2.COLOR_BGR2RGB)
        i += 1
    return out


def main() -> int:
    from lipsync.avatar import default_detector

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("clips", type=Path, nargs="+")
    ap.add_argument("--frames", type=int, nargs="+", default=[60, 64, 68])
    ap.add_argument("--scale", type=int, default=4)
    args = ap.parse_args()
    rows, box = [], None
    for clip in args.clips:
        frames = _frames(clip, [0] + args.frames)
        if box is None:
            _, lm = default_detector().find_face(frames[0])
            c = lm[48:68].mean(0)
            w = np.linalg.norm(lm[48] - lm[54]) * 0.7
            box = (int(c[0] - w), int(c[1] - 0.5 * w), int(c[0] + w), int(c[1] + 0.6 * w))
        x0, y0, x1, y1 = box
        tiles = [cv2.resize(frames[i][y0:y1, x0:x1], None, fx=args.scale, fy=args.scale,
                            interpolation=cv2.INTER_NEAREST) for i in args.frames if i in frames]
        rows.append(np.hstack(tiles))
    cv2.imwrite(str(args.out), cv2.cvtColor(np.vstack(rows), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
