#!/usr/bin/env python3
"""Build the dev corpus described by corpus/manifest.json from ../shared (nothing is copied into
the repository; third-party media stay in ../shared and the gitignored .cache/).

* real clips: ``realsync.py prepare CLIP .cache/realsync/<name>`` (rest portrait, 16 kHz speech,
  the real mouth per 25 fps frame), skipped when already prepared;
* speech clips: checked to exist (with their phone alignment or transcript).

Prints a summary: speakers and languages per split (the split is by speaker: no speaker is in
both). Exit status 1 if material is missing or the split leaks a speaker.

    python scripts/build_corpus.py [--shared ../shared] [--cases .cache/realsync] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prepare(shared: Path, cases: Path, name: str) -> Path:
    """The prepared case directory of real clip ``name`` (prepared now if missing)."""
    out = cases / name
    if not (out / "reference.json").exists():
        clip = shared / "assets" / "real" / f"{name}.mp4"
        if not clip.exists():
            raise FileNotFoundError(clip)
        subprocess.run([sys.executable, str(shared / "eval" / "realsync.py"), "prepare", str(clip), str(out)],
                       check=True, capture_output=True, text=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--cases", type=Path, default=ROOT / ".cache" / "realsync")
    ap.add_argument("--only", nargs="*")
    a = ap.parse_args()
    manifest = json.loads((ROOT / "corpus" / "manifest.json").read_text())
    missing, splits = [], {}
    for c in manifest["real"]["clips"]:
        if a.only and c["name"] not in a.only:
            continue
        try:
            prepare(a.shared, a.cases, c["name"])
        except (FileNotFoundError, subprocess.CalledProcessError) as e:
            missing.append(f"{c['name']}: {e}")
        splits.setdefault(c["split"], set()).add((c["speaker"], c["language"]))
    for c in manifest["speech"]["clips"]:
        for key in ("path", "phones", "text"):
            if key in c and not (a.shared / c[key]).exists():
                missing.append(str(a.shared / c[key]))
        splits.setdefault(c["split"], set()).add((c["speaker"], c["language"]))
    speakers = {k: {s for s, _ in v} for k, v in splits.items()}
    leak = set.intersection(*speakers.values()) if len(speakers) > 1 else set()
    print(json.dumps({k: {"speakers": len(speakers[k]), "languages": sorted({lang for _, lang in v})}
                      for k, v in splits.items()} | {"missing": missing, "speaker_leak": sorted(leak)}))
    return 1 if missing or leak else 0


if __name__ == "__main__":
    raise SystemExit(main())
