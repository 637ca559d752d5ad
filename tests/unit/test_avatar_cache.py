"""The on-disk avatar cache: round trips, crash safety, id validation, LRU, concurrency.

Faces come from a stand-in detector with synthetic landmarks, so these run without dlib.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from lipsync.avatar import (
    AvatarCache,
    FaceDetector,
    UprightFace,
    precompute_avatar,
    write_file_atomic,
)
from lipsync.avatar.cache import MANIFEST, STAGING_DIR, STALE_SECONDS
from lipsync.errors import AvatarNotFound, NoFaceFound
from lipsync.types import Avatar, FaceBox, Image

from .test_avatar_align import synthetic_landmarks


# --- helpers -------------------------------------------------------------------------------
def make_image(seed: int = 0, size: tuple[int, int] = (320, 400)) -> tuple[Image, bytes]:
    """A decodable PNG portrait stand-in and its bytes (sha256 matches)."""
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)
    ok, png = cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
    assert ok
    data = png.tobytes()
    return Image(pixels=pixels, sha256=hashlib.sha256(data).hexdigest(), format="PNG"), data


class FakeDetector(FaceDetector):
    """Finds one synthetic face in the middle of any image; counts calls; can be slowed."""

    def __init__(self, delay: float = 0.0, face: bool = True) -> None:
        super().__init__(detector=None, predictor=None)
        self.calls = 0
        self.delay = delay
        self.face = face
        self._count_lock = threading.Lock()

    def find_upright_face(self, rgb: np.ndarray) -> UprightFace:
        with self._count_lock:
            self.calls += 1
        time.sleep(self.delay)
        if not self.face:
            raise NoFaceFound("no face found in the image")
        h, w = rgb.shape[:2]
        lm = synthetic_landmarks(w / 2, h * 0.4, w / 6, mouth_gap=w / 60)
        lo, hi = lm.min(axis=0), lm.max(axis=0)
        return UprightFace(0, np.asarray(rgb), FaceBox(lo[0], lo[1], hi[0], hi[1]), lm)


def build(cache: AvatarCache, seed: int = 0, **kw) -> tuple[Avatar, bool, Image, bytes]:
    image, data = make_image(seed)
    kw.setdefault("detector", FakeDetector())
    avatar, hit = precompute_avatar(image, cache=cache, source_bytes=data, **kw)
    return avatar, hit, image, data


@pytest.fixture
def cache(tmp_path: Path) -> AvatarCache:
    return AvatarCache(tmp_path / "cache", version="t1", max_entries=50)


def assert_same_avatar(a: Avatar, b: Avatar) -> None:
    assert a.id == b.id
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-3)
    assert a.crop_box == b.crop_box
    assert a.source_size == b.source_size
    assert a.mouth_open_rest == pytest.approx(b.mouth_open_rest)
    assert a.teeth_visible_rest == b.teeth_visible_rest


# --- round trip ----------------------------------------------------------------------------
def test_store_then_load_round_trips_and_lays_out_the_entry(cache: AvatarCache) -> None:
    avatar, hit, image, data = build(cache)
    assert hit is False
    entry = cache.entry_dir(image.sha256)
    assert entry == cache.root / "vt1" / image.sha256
    assert avatar.directory == entry
    assert sorted(p.name for p in entry.iterdir()) == ["avatar.png", "face_meta.json", "manifest.json", "source.png"]
    assert (entry / "source.png").read_bytes() == data

    manifest = json.loads((entry / MANIFEST).read_bytes())
    for name, info in manifest["files"].items():
        blob = (entry / name).read_bytes()
        assert info == {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    meta = json.loads((entry / "face_meta.json").read_bytes())
    assert meta["version"] == "t1" and meta["source_size"] == [320, 400]
    assert len(meta["landmarks"]) == 68 and len(meta["source_landmarks"]) == 68

    loaded = cache.load(image.sha256)
    assert loaded is not None
    assert_same_avatar(loaded, avatar)
    assert loaded.directory == entry
    assert cache.contains(image.sha256)
    assert cache.source_bytes(image.sha256) == data


def test_second_precompute_is_a_hit_without_detection(cache: AvatarCache) -> None:
    detector = FakeDetector()
    first, hit1, image, data = build(cache, detector=detector)
    second, hit2 = precompute_avatar(image, cache=cache, detector=detector, source_bytes=data)
    assert (hit1, hit2) == (False, True)
    assert detector.calls == 1
    assert_same_avatar(first, second)


def test_cache_survives_a_restart(tmp_path: Path) -> None:
    first_cache = AvatarCache(tmp_path / "c", version="t1")
    avatar, _, image, data = build(first_cache)
    del first_cache
    reopened = AvatarCache(tmp_path / "c", version="t1")
    loaded = reopened.load(image.sha256)
    assert loaded is not None
    assert_same_avatar(loaded, avatar)
    detector = FakeDetector()
    _, hit = precompute_avatar(image, cache=reopened, detector=detector, source_bytes=data)
    assert hit and detector.calls == 0


def test_versions_do_not_share_entries(tmp_path: Path) -> None:
    v1 = AvatarCache(tmp_path / "c", version="1")
    _, _, image, _ = build(v1)
    v2 = AvatarCache(tmp_path / "c", version="2")
    assert v2.load(image.sha256) is None
    assert v1.load(image.sha256) is not None


def test_force_rebuilds(cache: AvatarCache) -> None:
    detector = FakeDetector()
    _, _, image, data = build(cache, detector=detector)
    _avatar, hit = precompute_avatar(image, cache=cache, detector=detector, source_bytes=data, force=True)
    assert hit is False and detector.calls == 2
    assert cache.load(image.sha256) is not None


def test_other_size_is_rebuilt_from_stored_landmarks(cache: AvatarCache) -> None:
    detector = FakeDetector()
    big, _, image, data = build(cache, detector=detector, size=512)
    small, hit = precompute_avatar(image, cache=cache, detector=detector, source_bytes=data, size=256)
    assert hit is False and detector.calls == 1  # no second detection
    assert small.image.shape == (256, 256, 3)
    assert small.crop_box == big.crop_box
    np.testing.assert_allclose(small.landmarks, (big.landmarks + 0.5) / 2 - 0.5, atol=1e-2)
    again, hit = precompute_avatar(image, cache=cache, detector=detector, size=256)
    assert hit and again.size == 256


def test_without_source_bytes_the_pixels_are_kept_as_png(cache: AvatarCache) -> None:
    image, _ = make_image(3)
    avatar, _ = precompute_avatar(image, cache=cache, detector=FakeDetector())
    stored = cache.source_bytes(image.sha256)
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(stored, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(decoded, image.pixels)
    assert (avatar.directory / "source.png").exists()


def test_source_bytes_must_match_the_image(cache: AvatarCache) -> None:
    image, _ = make_image(0)
    with pytest.raises(ValueError):
        precompute_avatar(image, cache=cache, detector=FakeDetector(), source_bytes=b"other bytes")


def test_no_face_leaves_nothing_behind(cache: AvatarCache) -> None:
    image, data = make_image(0)
    with pytest.raises(NoFaceFound):
        precompute_avatar(image, cache=cache, detector=FakeDetector(face=False), source_bytes=data)
    assert not cache.contains(image.sha256)
    assert cache.list() == []
    assert list((cache.root / STAGING_DIR).iterdir()) == []


# --- id validation -------------------------------------------------------------------------
BAD_IDS = [
    "../../etc/passwd",
    "A" * 64,  # uppercase
    "ab" * 31,  # short
    "a" * 65,
    "a" * 63 + "\n",
    "a" * 63 + "/",
    "/" + "a" * 63,
    "",
    "g" * 64,
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_malformed_ids_are_refused_before_any_path_is_built(cache: AvatarCache, bad: str) -> None:
    calls = [
        lambda: cache.load(bad),
        lambda: cache.entry_dir(bad),
        lambda: cache.contains(bad),
        lambda: cache.delete(bad),
        lambda: cache.source_bytes(bad),
        lambda: cache.engine_dir(bad, "classic", "1"),
    ]
    for call in calls:
        with pytest.raises(AvatarNotFound) as info:
            call()
        assert info.value.code == "avatar_not_found"
        assert "64 lowercase hex" in info.value.message and "\n" not in info.value.message


def test_non_string_id_is_refused(cache: AvatarCache) -> None:
    with pytest.raises(AvatarNotFound):
        cache.load(None)  # type: ignore[arg-type]


def test_unknown_but_valid_id_is_a_miss(cache: AvatarCache) -> None:
    unknown = "0" * 64
    assert cache.load(unknown) is None
    assert not cache.contains(unknown)
    assert cache.delete(unknown) is False
    with pytest.raises(AvatarNotFound):
        cache.source_bytes(unknown)
    with pytest.raises(AvatarNotFound):
        cache.engine_dir(unknown, "classic", "1")


# --- crash safety and corruption -----------------------------------------------------------
def test_stale_staging_dirs_are_cleaned_on_open_and_fresh_ones_kept(tmp_path: Path) -> None:
    root = tmp_path / "c"
    AvatarCache(root, version="t1")
    staging = root / STAGING_DIR
    stale = staging / "deadbeef-123-crashed"
    stale.mkdir()
    (stale / "avatar.png").write_bytes(b"half")
    old = time.time() - STALE_SECONDS - 60
    os.utime(stale, (old, old))
    fresh = staging / "cafebabe-456-writing"  # another process is writing this one right now
    fresh.mkdir()
    trash = staging / "trash-0123"
    trash.mkdir()
    AvatarCache(root, version="t1")
    assert not stale.exists() and not trash.exists()
    assert fresh.exists()


def test_a_crash_while_writing_publishes_nothing(cache: AvatarCache, monkeypatch: pytest.MonkeyPatch) -> None:
    import lipsync.avatar.cache as cache_module

    real_write = cache_module._write_synced
    written: list[str] = []

    def dying_write(path: Path, data: bytes) -> None:
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        written.append(path.name)
        real_write(path, data)

    monkeypatch.setattr(cache_module, "_write_synced", dying_write)
    image, data = make_image(0)
    with pytest.raises(OSError):
        precompute_avatar(image, cache=cache, detector=FakeDetector(), source_bytes=data)
    assert not cache.entry_dir(image.sha256).exists()
    assert cache.load(image.sha256) is None
    assert list((cache.root / STAGING_DIR).iterdir()) == []


def _corrupt_and_check(cache: AvatarCache, damage) -> None:
    detector = FakeDetector()
    avatar, _, image, data = build(cache, detector=detector)
    entry = cache.entry_dir(image.sha256)
    damage(entry)
    assert cache.load(image.sha256) is None  # never served
    assert not entry.exists()  # removed, so it is rebuilt
    rebuilt, hit = precompute_avatar(image, cache=cache, detector=detector, source_bytes=data)
    assert hit is False and detector.calls == 2
    assert_same_avatar(rebuilt, avatar)
    assert cache.load(image.sha256) is not None


def test_missing_manifest_is_rebuilt(cache: AvatarCache) -> None:
    _corrupt_and_check(cache, lambda e: (e / "manifest.json").unlink())


def test_truncated_avatar_png_is_rebuilt(cache: AvatarCache) -> None:
    def truncate(entry: Path) -> None:
        blob = (entry / "avatar.png").read_bytes()
        (entry / "avatar.png").write_bytes(blob[: len(blob) // 2])

    _corrupt_and_check(cache, truncate)


def test_tampered_face_meta_is_rebuilt(cache: AvatarCache) -> None:
    def tamper(entry: Path) -> None:
        meta = json.loads((entry / "face_meta.json").read_bytes())
        meta["mouth_open_rest"] = 0.9  # same size or not, the hash no longer matches
        (entry / "face_meta.json").write_text(json.dumps(meta))

    _corrupt_and_check(cache, tamper)


def test_missing_avatar_png_is_rebuilt(cache: AvatarCache) -> None:
    _corrupt_and_check(cache, lambda e: (e / "avatar.png").unlink())


def test_garbage_manifest_is_rebuilt(cache: AvatarCache) -> None:
    _corrupt_and_check(cache, lambda e: (e / "manifest.json").write_bytes(b"\x00not json"))


def test_manifest_listing_foreign_files_is_rebuilt(cache: AvatarCache) -> None:
    def add_foreign(entry: Path) -> None:
        manifest = json.loads((entry / "manifest.json").read_bytes())
        manifest["files"]["../../escape"] = {"size": 0, "sha256": hashlib.sha256(b"").hexdigest()}
        (entry / "manifest.json").write_text(json.dumps(manifest))

    _corrupt_and_check(cache, add_foreign)


def test_corrupt_source_is_not_served(cache: AvatarCache) -> None:
    _, _, image, _ = build(cache)
    entry = cache.entry_dir(image.sha256)
    (entry / "source.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(AvatarNotFound):
        cache.source_bytes(image.sha256)
    assert not entry.exists()


# --- engine files --------------------------------------------------------------------------
def test_engine_dir_lives_in_the_entry_and_does_not_break_verification(cache: AvatarCache) -> None:
    avatar, _, image, _ = build(cache)
    d = cache.engine_dir(image.sha256, "sadtalker", "2")
    assert d == avatar.directory / "engines" / "sadtalker-v2" and d.is_dir()
    write_file_atomic(d / "first_coeff.npy", b"coefficients")
    assert (d / "first_coeff.npy").read_bytes() == b"coefficients"
    assert cache.load(image.sha256) is not None  # engine files are not part of the manifest
    for bad in ("../x", "", ".hidden", "a/b"):
        with pytest.raises(ValueError):
            cache.engine_dir(image.sha256, bad, "1")
    cache.delete(image.sha256)
    assert not d.exists()


def test_write_file_atomic_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "coeff.bin"
    write_file_atomic(target, b"first version")
    write_file_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    with pytest.raises(TypeError):
        write_file_atomic(target, "not bytes")  # type: ignore[arg-type]  # fails mid-write
    assert target.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["coeff.bin"]  # no temp files left


# --- listing, deleting, LRU ----------------------------------------------------------------
def test_list_and_delete(cache: AvatarCache) -> None:
    ids = [build(cache, seed=s)[2].sha256 for s in range(3)]
    infos = cache.list()
    assert sorted(i.id for i in infos) == sorted(ids)
    assert all(i.source_size == (320, 400) and i.created > 0 for i in infos)
    assert cache.delete(ids[0]) is True
    assert cache.delete(ids[0]) is False
    assert not cache.contains(ids[0])
    assert sorted(i.id for i in cache.list()) == sorted(ids[1:])


def _set_last_used(cache: AvatarCache, avatar_id: str, when: float) -> None:
    os.utime(cache.entry_dir(avatar_id) / MANIFEST, (when, when))


def test_lru_cap_drops_the_least_recently_used(tmp_path: Path) -> None:
    cache = AvatarCache(tmp_path / "c", version="t1", max_entries=3)
    a, b, c = (build(cache, seed=s)[2].sha256 for s in range(3))
    now = time.time()
    _set_last_used(cache, a, now - 300)
    _set_last_used(cache, b, now - 200)
    _set_last_used(cache, c, now - 100)
    assert cache.load(a) is not None  # a is now the most recently used
    d = build(cache, seed=3)[2].sha256
    assert {i.id for i in cache.list()} == {a, c, d}  # b was the least recently used
    assert cache.load(b) is None


def test_eviction_never_drops_the_entry_just_stored(tmp_path: Path) -> None:
    cache = AvatarCache(tmp_path / "c", version="t1", max_entries=2)
    a, b = (build(cache, seed=s)[2].sha256 for s in range(2))
    future = time.time() + 10_000  # make both look more recently used than anything new
    _set_last_used(cache, a, future)
    _set_last_used(cache, b, future)
    c = build(cache, seed=2)[2].sha256
    ids = {i.id for i in cache.list()}
    assert c in ids and len(ids) == 2


# --- concurrency ---------------------------------------------------------------------------
def test_concurrent_precompute_of_the_same_portrait(cache: AvatarCache) -> None:
    image, data = make_image(7)
    detector = FakeDetector(delay=0.05)
    results: list[tuple[Avatar, bool]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker() -> None:
        try:
            start.wait()
            results.append(precompute_avatar(image, cache=cache, detector=detector, source_bytes=data))
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 8
    assert sum(not hit for _, hit in results) == 1 and detector.calls == 1
    for avatar, _ in results:
        assert_same_avatar(avatar, results[0][0])
    assert [p.name for p in (cache.root / "vt1").iterdir()] == [image.sha256]
    assert list((cache.root / STAGING_DIR).iterdir()) == []
    assert cache.load(image.sha256) is not None


def test_concurrent_stores_race_on_the_rename_safely(tmp_path: Path) -> None:
    # Separate cache objects (as separate processes would have) storing the same entry at once.
    root = tmp_path / "c"
    image, data = make_image(8)
    template, _ = precompute_avatar(image, cache=AvatarCache(tmp_path / "other", "t1"), detector=FakeDetector())
    caches = [AvatarCache(root, "t1") for _ in range(6)]
    results: list[Avatar] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(caches))

    def worker(c: AvatarCache) -> None:
        try:
            start.wait()
            results.append(c.store(template, source_bytes=data, source_format="PNG"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == len(caches)
    for r in results:
        assert_same_avatar(r, template)
    assert [p.name for p in (root / "vt1").iterdir()] == [image.sha256]
    assert list((root / STAGING_DIR).iterdir()) == []
    loaded = AvatarCache(root, "t1").load(image.sha256)
    assert loaded is not None
    assert_same_avatar(loaded, template)


def test_loads_during_deletes_never_see_a_broken_entry(cache: AvatarCache) -> None:
    _, _, image, data = build(cache)
    stop = threading.Event()
    seen: list[object] = []

    def reader() -> None:
        while not stop.is_set():
            got = cache.load(image.sha256)
            seen.append(None if got is None else got.image.shape)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(8):
            cache.delete(image.sha256)
            precompute_avatar(image, cache=cache, detector=FakeDetector(), source_bytes=data)
    finally:
        stop.set()
        t.join()
    assert seen and all(s in (None, (512, 512, 3)) for s in seen)
    assert cache.load(image.sha256) is not None


# --- classic path stays torch-free ---------------------------------------------------------
def test_avatar_stage_does_not_import_torch() -> None:
    code = "import sys, lipsync.avatar; sys.exit(1 if 'torch' in sys.modules else 0)"
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0
