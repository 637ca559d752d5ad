#!/usr/bin/env python3
"""Held-out figures of the classic engine against real speakers (realsync) — the README's numbers.

For every held-out real clip of corpus/manifest.json (prepared under .cache/realsync by
scripts/build_corpus.py): generate a video from its rest portrait and speech with the product,
then score it with ../shared/eval/realsync.py. Prints one JSON line per clip and the means.

    python scripts/eval_heldout.py [--split heldout] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REALSYNC = ROOT.parent / "shared" / "eval" / "realsync.py"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="heldout")
    ap.add_argument("--cases", type=Path, default=ROOT / ".cache" / "realsync")
    ap.add_argument("--out", type=Path, default=ROOT / ".cache" / "heldout")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from lipsync.pipeline import LipSyncPipeline

    pipe = LipSyncPipeline.from_settings(cache_dir=a.out / "avatars")
    clips = [c for c in json.loads((ROOT / "corpus" / "manifest.json").read_text())["real"]["clips"]
             if c["split"] == a.split]
    keys = ("real_corr", "loud_corr", "closed_agree", "open_agree", "width_corr")
    rows = []
    for c in clips:
        case = a.cases / c["name"]
        video = a.out / (c["name"] + ".mp4")
        a.out.mkdir(parents=True, exist_ok=True)
        pipe.generate(case / "speech.wav", video, avatar=case / "portrait.png")
        res = json.loads(subprocess.run([sys.executable, str(REALSYNC), "score", str(video), str(case)],
                                        capture_output=True, text=True, check=True).stdout)
        rows.append(res)
        print(json.dumps({"clip": c["name"]} | {k: res[k] for k in keys}), flush=True)
    print(json.dumps({"split": a.split, "clips": len(rows)} | {
        "mean_" + k: round(sum(r[k] for r in rows) / len(rows), 3) for k in keys}
        | {"above_loud": sum(r["real_corr"] > r["loud_corr"] for r in rows)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
