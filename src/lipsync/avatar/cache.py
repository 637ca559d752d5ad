"""On-disk avatar cache: one directory per portrait, keyed by the SHA-256 of its file bytes.

Layout (``root/v<version>/<sha256>/``)::

    source.jpg|png|webp   the uploaded bytes (engines that paste back decode them)
    avatar.png            the aligned square crop
    face_meta.json        landmarks, crop box, source size, rest mouth state, version, created
    manifest.json         size + SHA-256 of each file above, written last
    engines/<name>-v<n>/  engine-specific precompute, added later with ``write_file_atomic``

Crash safety: an entry is assembled in a staging directory on the same filesystem, every file
and the directory fsynced, then renamed into place in one ``os.replace``; a reader therefore
sees either no entry or a complete one. A concurrent writer that loses the rename discards its
copy. Entries are verified against the manifest on every load (they are small); anything that
does not match (disk errors, truncation, tampering) is moved aside and rebuilt, never served.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import AvatarNotFound, ConfigError
from ..fsutil import fsync_dir, write_file_atomic  # noqa: F401 - write_file_atomic is re-exported
from ..types import AVATAR_ID_PATTERN, Avatar, AvatarId

log = logging.getLogger(__name__)

#: What an avatar id looks like: the SHA-256 of the portrait file, lowercase hex (``types.AvatarId``).
ID_PATTERN = re.compile(AVATAR_ID_PATTERN)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

MANIFEST = "manifest.json"
FACE_META = "face_meta.json"
AVATAR_PNG = "avatar.png"
ENGINES_DIR = "engines"
STAGING_DIR = ".staging"
#: File extension of the stored source per ``types.Image.format``.
SOURCE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
#: A staging directory older than this is left over from a crash (a store takes well under 1 s).
STALE_SECONDS = 300.0
_PNG_LEVEL = 1  # 512x512: ~14 ms to write, ~8 ms to read; higher levels save ~5 % for 2-4x time


def validate_avatar_id(avatar_id: object) -> AvatarId:
    """The id as an ``AvatarId`` if it is 64 lowercase hex digits, else ``AvatarNotFound``."""
    try:
        return AvatarId(avatar_id)  # type: ignore[arg-type]
    except ValueError as e:
        raise AvatarNotFound(str(e)) from None


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class AvatarInfo:
    """One cache entry as listed: id, when it was built, and the oriented source size."""

    id: str
    created: float  # unix time
    source_size: tuple[int, int]  # width, height
    last_used: float  # unix time of the last load (LRU order)


@dataclass(frozen=True)
class FaceMeta:
    """What ``face_meta.json`` records besides the pixels.

    ``quarter_turns``: how many 90-degree counter-clockwise turns (``np.rot90``) were applied to
    the EXIF-oriented source to make the face upright; ``source_size``, ``crop_box`` and
    ``source_landmarks`` refer to that turned image.
    """

    id: str
    version: str
    created: float
    size: int
    source_size: tuple[int, int]
    source_format: str
    crop_box: tuple[float, float, float, float]
    landmarks: np.ndarray  # (68, 2) crop pixels
    source_landmarks: np.ndarray | None  # (68, 2) source pixels
    quarter_turns: int
    mouth_open_rest: float
    teeth_visible_rest: bool

    def to_json(self) -> bytes:
        d = dataclasses.asdict(self)
        d["landmarks"] = np.asarray(self.landmarks, dtype=np.float64).round(3).tolist()
        if self.source_landmarks is not None:
            d["source_landmarks"] = np.asarray(self.source_landmarks, dtype=np.float64).round(3).tolist()
        return json.dumps(d, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> FaceMeta:
        d = json.loads(data)
        lm = np.asarray(d["landmarks"], dtype=np.float32)
        src = d.get("source_landmarks")
        src_lm = None if src is None else np.asarray(src, dtype=np.float32)
        crop_box = tuple(float(v) for v in d["crop_box"])
        source_size = tuple(int(v) for v in d["source_size"])
        if lm.shape != (68, 2) or (src_lm is not None and src_lm.shape != (68, 2)):
            raise ValueError("landmarks are not (68, 2)")
        if len(crop_box) != 4 or len(source_size) != 2:
            raise ValueError("bad crop box or source size")
        return cls(
            id=str(d["id"]),
            version=str(d["version"]),
            created=float(d["created"]),
            size=int(d["size"]),
            source_size=source_size,  # type: ignore[arg-type]
            source_format=str(d["source_format"]),
            crop_box=crop_box,  # type: ignore[arg-type]
            landmarks=lm,
            source_landmarks=src_lm,
            quarter_turns=int(d.get("quarter_turns", 0)) % 4,
            mouth_open_rest=float(d["mouth_open_rest"]),
            teeth_visible_rest=bool(d["teeth_visible_rest"]),
        )


class _Corrupt(Exception):
    """An entry that exists but does not match its manifest."""


class AvatarCache:
    """Precomputed avatars on disk; safe across threads, processes and crashes.

    ``version`` is the precompute version: entries of other versions live in other
    directories and are never read. ``max_entries`` caps this version's entries; the least
    recently loaded ones are dropped first (never the one just stored).
    """

    def __init__(self, root: str | os.PathLike[str], version: str, max_entries: int = 1000, *,
                 max_image_pixels: int | None = None) -> None:
        if not _NAME_RE.fullmatch(str(version)):
            raise ConfigError(f"invalid avatar cache version {version!r}")
        if max_entries < 1:
            raise ConfigError("the avatar cache must keep at least one entry")
        self.root = Path(root).resolve()
        self.version = str(version)
        self.max_entries = int(max_entries)
        #: Decompression-bomb guard for decoding stored portraits (``upright_source``); None:
        #: ``io.load_image``'s default. The pipeline passes ``Settings.max_image_pixels``.
        self.max_image_pixels = max_image_pixels
        self._dir = self.root / f"v{self.version}"
        self._staging = self.root / STAGING_DIR
        self._evict_lock = threading.Lock()
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._staging.mkdir(exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the avatar cache in {self.root}: {e.strerror or e}") from None
        self._clean_staging()

    def __repr__(self) -> str:
        return f"AvatarCache({str(self.root)!r}, version={self.version!r}, max_entries={self.max_entries})"

    # --- paths -------------------------------------------------------------------------
    def entry_dir(self, avatar_id: str) -> Path:
        """The entry's directory (it may not exist). Raises ``AvatarNotFound`` for a malformed id."""
        path = self._dir / validate_avatar_id(avatar_id)
        # Belt and braces: the id is validated, but never hand out a path outside the cache.
        if not path.resolve().is_relative_to(self._dir):
            raise AvatarNotFound("invalid avatar id")
        return path

    def engine_dir(self, avatar_id: str, engine_name: str, engine_version: str) -> Path:
        """A directory inside the entry for one engine's precompute (created if missing).

        Write files there with ``write_file_atomic``. Raises ``AvatarNotFound`` when the entry
        does not exist.
        """
        for what, value in (("engine name", engine_name), ("engine version", engine_version)):
            if not _NAME_RE.fullmatch(str(value)):
                raise ValueError(f"invalid {what} {value!r}")
        entry = self.entry_dir(avatar_id)
        if not (entry / MANIFEST).is_file():
            raise AvatarNotFound("avatar not found; upload the portrait again", avatar_id=avatar_id)
        path = entry / ENGINES_DIR / f"{engine_name}-v{engine_version}"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except FileNotFoundError:  # the entry was deleted meanwhile
            raise AvatarNotFound("avatar not found; upload the portrait again", avatar_id=avatar_id) from None
        self._clean_temp_files(path)
        return path

    # --- queries -----------------------------------------------------------------------
    def contains(self, avatar_id: str) -> bool:
        """Whether an entry exists (cheap: not verified; ``load`` verifies)."""
        return (self.entry_dir(avatar_id) / MANIFEST).is_file()

    def load(self, avatar_id: str) -> Avatar | None:
        """The cached avatar, verified against its manifest, or None.

        A corrupt or partial entry is removed (and logged) and None returned, so the caller
        rebuilds it. A hit marks the entry as recently used.
        """
        loaded = self.load_with_meta(avatar_id)
        return None if loaded is None else loaded[0]

    def load_with_meta(self, avatar_id: str) -> tuple[Avatar, FaceMeta] | None:
        """``load`` plus the entry's ``FaceMeta``."""
        entry = self.entry_dir(avatar_id)
        try:
            inode = entry.stat().st_ino
        except FileNotFoundError:
            return None
        try:
            files = self._verified_files(entry)
            meta = FaceMeta.from_json(files[FACE_META])
            if meta.id != avatar_id or meta.version != self.version:
                raise _Corrupt("face_meta.json is for another id or version")
            bgr = cv2.imdecode(np.frombuffer(files[AVATAR_PNG], np.uint8), cv2.IMREAD_COLOR)
            if bgr is None or bgr.shape != (meta.size, meta.size, 3):
                raise _Corrupt("avatar.png does not decode to the recorded size")
            avatar = Avatar(
                id=avatar_id,
                image=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB),
                landmarks=meta.landmarks,
                crop_box=meta.crop_box,
                source_size=meta.source_size,
                mouth_open_rest=meta.mouth_open_rest,
                teeth_visible_rest=meta.teeth_visible_rest,
                directory=entry,
            )
        except FileNotFoundError as e:
            if not entry.exists():
                return None  # deleted or evicted while we read it
            self._discard_corrupt(entry, inode, f"missing file {Path(e.filename or '?').name}")
            return None
        except (_Corrupt, ValueError, KeyError, TypeError) as e:
            self._discard_corrupt(entry, inode, str(e) or type(e).__name__)
            return None
        except OSError as e:  # unreadable for another reason (permissions, I/O): not proof of corruption
            log.warning("avatar cache: cannot read entry %s: %s", entry.name, e)
            return None
        try:
            os.utime(entry / MANIFEST)  # LRU mark
        except OSError:
            pass
        return avatar, meta

    def face_meta(self, avatar_id: str) -> FaceMeta:
        """The entry's metadata (turn applied to the source, source landmarks, ...)."""
        loaded = self.load_with_meta(avatar_id)
        if loaded is None:
            raise AvatarNotFound("avatar not found; upload the portrait again", avatar_id=avatar_id)
        return loaded[1]

    def source_bytes(self, avatar_id: str) -> bytes:
        """The portrait file as uploaded (verified), or ``AvatarNotFound``."""
        entry = self.entry_dir(avatar_id)
        try:
            files = self._verified_files(entry, only_source=True)
        except FileNotFoundError:
            raise AvatarNotFound("avatar not found; upload the portrait again", avatar_id=avatar_id) from None
        except _Corrupt as e:
            self._discard_corrupt(entry, None, str(e))
            raise AvatarNotFound("avatar not found; upload the portrait again", avatar_id=avatar_id) from None
        return next(data for name, data in files.items() if name.startswith("source."))

    def upright_source(self, avatar_id: str) -> np.ndarray:
        """The stored portrait decoded (EXIF-oriented) and turned upright as when it was
        precomputed: (H, W, 3) uint8 RGB; ``Avatar.crop_box`` is in these pixels.

        Decoded under the same pixel guard as uploads (``ImageTooLarge`` past
        ``max_image_pixels``); ``AvatarNotFound`` when the entry is missing or corrupt.
        """
        from ..io import load_image

        meta = self.face_meta(avatar_id)
        data = self.source_bytes(avatar_id)
        guard = {} if self.max_image_pixels is None else {"max_pixels": self.max_image_pixels}
        pixels = load_image(data, **guard).pixels
        return np.ascontiguousarray(np.rot90(pixels, meta.quarter_turns))

    def list(self) -> list[AvatarInfo]:
        """Entries of this version, most recently used first (not verified: cheap)."""
        out = []
        try:
            names = os.listdir(self._dir)
        except FileNotFoundError:
            return []
        for name in names:
            if not ID_PATTERN.fullmatch(name):
                continue
            entry = self._dir / name
            try:
                last_used = (entry / MANIFEST).stat().st_mtime
                meta = json.loads((entry / FACE_META).read_bytes())
                out.append(
                    AvatarInfo(
                        id=name,
                        created=float(meta["created"]),
                        source_size=(int(meta["source_size"][0]), int(meta["source_size"][1])),
                        last_used=last_used,
                    )
                )
            except (OSError, ValueError, KeyError, TypeError, IndexError):
                continue  # half-deleted or corrupt: load() deals with it
        out.sort(key=lambda i: i.last_used, reverse=True)
        return out

    # --- changes -----------------------------------------------------------------------
    def store(
        self,
        avatar: Avatar,
        *,
        source_bytes: bytes,
        source_format: str,
        source_landmarks: np.ndarray | None = None,
        quarter_turns: int = 0,
    ) -> Avatar:
        """Write ``avatar`` (its ``id`` is the key) and return it with ``directory`` set.

        If another thread or process stored the same id first, theirs is kept and returned
        (precompute is deterministic, so both are the same avatar).
        """
        entry = self.entry_dir(avatar.id)
        ext = SOURCE_EXTENSIONS.get(source_format.upper())
        if ext is None:
            raise ValueError(f"unsupported source format {source_format!r}")
        if avatar.image.ndim != 3 or avatar.image.shape[0] != avatar.image.shape[1] or avatar.image.shape[2] != 3:
            raise ValueError(f"avatar image must be square RGB, got {avatar.image.shape}")
        meta = FaceMeta(
            id=avatar.id,
            version=self.version,
            created=time.time(),
            size=avatar.size,
            source_size=(int(avatar.source_size[0]), int(avatar.source_size[1])),
            source_format=source_format.upper(),
            crop_box=tuple(float(v) for v in avatar.crop_box),  # type: ignore[arg-type]
            landmarks=avatar.landmarks,
            source_landmarks=source_landmarks,
            quarter_turns=int(quarter_turns) % 4,
            mouth_open_rest=float(avatar.mouth_open_rest),
            teeth_visible_rest=bool(avatar.teeth_visible_rest),
        )
        ok, png = cv2.imencode(
            ".png", cv2.cvtColor(np.ascontiguousarray(avatar.image), cv2.COLOR_RGB2BGR),
            [cv2.IMWRITE_PNG_COMPRESSION, _PNG_LEVEL],
        )
        if not ok:
            raise RuntimeError("PNG encoding of the avatar crop failed")
        files = {f"source.{ext}": bytes(source_bytes), AVATAR_PNG: png.tobytes(), FACE_META: meta.to_json()}
        manifest = {
            "version": self.version,
            "id": avatar.id,
            "files": {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()},
        }

        for _attempt in range(3):
            tmp = self._staging / f"{avatar.id[:16]}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            tmp.mkdir(parents=True)
            self._dir.mkdir(parents=True, exist_ok=True)  # in case someone emptied the cache
            try:
                for name, data in files.items():
                    _write_synced(tmp / name, data)
                _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())  # last
                fsync_dir(tmp)
                try:
                    os.replace(tmp, entry)
                    won = True
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    won = False  # a complete entry is there already: a concurrent writer won
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            if won:
                fsync_dir(self._dir)
                self._evict(keep=avatar.id)
                return dataclasses.replace(avatar, directory=entry)
            existing = self.load(avatar.id)
            if existing is not None:
                return existing
            # It was corrupt and has been moved aside by load(); try again.
        raise RuntimeError(f"could not store avatar {avatar.id}: the entry keeps changing")

    def delete(self, avatar_id: str) -> bool:
        """Remove an entry; False when there was none."""
        entry = self.entry_dir(avatar_id)
        return self._remove(entry)

    # --- internals ---------------------------------------------------------------------
    def _verified_files(self, entry: Path, only_source: bool = False) -> dict[str, bytes]:
        """The core files of an entry, each checked against the manifest (``_Corrupt`` if not)."""
        try:
            manifest = json.loads((entry / MANIFEST).read_bytes())
            listed: dict[str, Any] = manifest["files"]
        except FileNotFoundError:
            if entry.is_dir():
                raise _Corrupt("manifest.json is missing") from None
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise _Corrupt(f"manifest.json is unreadable: {e}") from None
        if not isinstance(listed, dict):
            raise _Corrupt("manifest.json lists no files")
        sources = [n for n in listed if isinstance(n, str) and n.startswith("source.")]
        expected = {AVATAR_PNG, FACE_META}
        if len(sources) != 1 or sources[0].split(".", 1)[1] not in SOURCE_EXTENSIONS.values() or set(listed) != expected | set(sources):
            raise _Corrupt("manifest.json lists unexpected files")
        out = {}
        for name in sources if only_source else listed:
            data = (entry / name).read_bytes()
            info = listed[name]
            if len(data) != int(info["size"]) or hashlib.sha256(data).hexdigest() != info["sha256"]:
                raise _Corrupt(f"{name} does not match the manifest (size {len(data)}, expected {info['size']})")
            out[name] = data
        return out

    def _discard_corrupt(self, entry: Path, inode: int | None, why: str) -> None:
        try:
            if inode is not None and entry.stat().st_ino != inode:
                return  # replaced by a fresh entry meanwhile: not ours to remove
        except FileNotFoundError:
            return
        log.warning("avatar cache: removing corrupt entry %s (%s)", entry.name, why)
        self._remove(entry)

    def _remove(self, entry: Path) -> bool:
        """Rename the entry out of the way (atomic for readers), then delete it."""
        trash = self._staging / f"trash-{uuid.uuid4().hex}"
        try:
            os.replace(entry, trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _evict(self, keep: str) -> None:
        with self._evict_lock:
            try:
                names = [n for n in os.listdir(self._dir) if ID_PATTERN.fullmatch(n)]
            except FileNotFoundError:
                return
            excess = len(names) - self.max_entries
            if excess <= 0:
                return

            def last_used(name: str) -> float:
                try:
                    return (self._dir / name / MANIFEST).stat().st_mtime
                except OSError:
                    return 0.0

            for name in sorted((n for n in names if n != keep), key=last_used)[:excess]:
                if self._remove(self._dir / name):
                    log.info("avatar cache: evicted %s (over %d entries)", name, self.max_entries)

    def _clean_staging(self) -> None:
        """Remove what crashed writers left: old build directories, and any trash."""
        now = time.time()
        try:
            names = os.listdir(self._staging)
        except FileNotFoundError:
            return
        for name in names:
            path = self._staging / name
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue
            if name.startswith("trash-") or age > STALE_SECONDS:
                log.info("avatar cache: removing leftover %s", name)
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    @staticmethod
    def _clean_temp_files(directory: Path) -> None:
        now = time.time()
        try:
            for p in directory.glob(".*.tmp"):
                try:
                    if now - p.stat().st_mtime > STALE_SECONDS:
                        p.unlink(missing_ok=True)
                except FileNotFoundError:
                    pass
        except OSError:
            pass
