"""Per-frame rendering of the classic engine: motion controls -> video frames.

A frame is the portrait with three small regions redrawn: the lower face (jaw, lips, mouth
interior), the eyes/brows, and, when still mode is off, the whole head moved by a smooth
rigid warp. The renderer composites straight into planar I420 (the encoder's native input),
converting only the redrawn regions, so the untouched 80 % of every frame costs a memcpy.
"""
from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict

import cv2
import numpy as np

from ...types import Frames
from .rig import (
    JAW_LOWER,
    JAW_UPPER,
    LIFT_UPPER,
    ROUND_IN,
    SPREAD_OUT,
    TUCK_LOWER,
    MouthRig,
    close_overlap,
)

_OPEN_GAIN = JAW_LOWER + JAW_UPPER  # inner-lip gap (iod) added at jaw = 1
#: Inner-lip gap (iod) under which a mouth open at rest seals (its lips overlap): about a pixel at
#: 512 px, so small openings still show as drawn.
SEAL_GAP = 0.01

# OpenCV's own worker threads cost more than they gain on patches this small (a 270x214 remap is
# split into tasks of a few thousand pixels) and they fight the background H.264 encoder for the
# cores: measured on the bundled portrait (198 mouth shapes, 2-core machine shared with other
# work, the two settings interleaved six times in one process), median 4.0 ms wall and 2.3 ms CPU
# per new mouth shape with cv2's default 2 threads, 2.7 ms wall and 1.8 ms CPU with one. Rendering
# therefore runs with cv2 single-threaded; the process-wide setting is restored when the last
# concurrent render ends (``_cv2_single_threaded``).
_cv2_lock = threading.Lock()
_cv2_users = 0
_cv2_saved_threads = 0


@contextlib.contextmanager
def _cv2_single_threaded():
    """cv2 calls use one thread while any render is running (counted across threads)."""
    global _cv2_users, _cv2_saved_threads
    with _cv2_lock:
        if _cv2_users == 0:
            _cv2_saved_threads = cv2.getNumThreads()
            cv2.setNumThreads(1)
        _cv2_users += 1
    try:
        yield
    finally:
        with _cv2_lock:
            _cv2_users -= 1
            if _cv2_users == 0:
                cv2.setNumThreads(_cv2_saved_threads)


class FaceRenderer:
    """Renders frames of one avatar at one size from per-frame motion controls."""

    def __init__(self, image: np.ndarray, rig: MouthRig) -> None:
        self.image = np.ascontiguousarray(image)
        self.rig = rig
        self.size = int(image.shape[0])
        self.height, self.width = image.shape[:2]
        self.base_yuv = cv2.cvtColor(self.image, cv2.COLOR_RGB2YUV_I420)
        r = rig
        self._mx0, self._my0, self._mx1, self._my1 = (int(v) for v in r.roi)
        self._mh, self._mw = self._my1 - self._my0, self._mx1 - self._mx0
        self._grid_flat = r.grid.reshape(-1)
        self._ix0, self._iy0, self._ix1, self._iy1 = (int(v) for v in r.ibox)
        ex0, ey0, ex1, ey1 = (int(v) for v in r.eye_roi)
        ey1 = min(ey1, self._my0) if ey0 < self._my0 else ey1  # never overlap the mouth ROI
        ey1 -= (ey1 - ey0) % 2
        self._eye = (ex0, ey0, ex1, ey1)
        eh = ey1 - ey0
        self._eye_grid = np.ascontiguousarray(r.eye_grid[:eh])
        self._brow = np.ascontiguousarray(r.brow_field[:eh])
        self._lid_cols = np.flatnonzero(~np.isnan(r.lid_upper))
        # face coordinates of the interior box, for the analytic lip curves
        gy, gx = np.mgrid[self._iy0:self._iy1, self._ix0:self._ix1].astype(np.float64)
        rel = np.stack([gx, gy], -1) - r.origin
        self._box_s = rel @ r.axes[0]
        self._box_t = rel @ r.axes[1]
        self._box_s32 = self._box_s.astype(np.float32)
        self._box_t32 = self._box_t.astype(np.float32)
        # ambient occlusion under the upper lip; the portrait's own teeth carry their shadow
        self._ao_depth = np.float32(0.2 if r.own_teeth else 0.3)
        self._rest_gap_px = np.maximum(r.lo_rest - r.up_rest, 0.0)
        self._overlap_px = close_overlap(self._rest_gap_px, r.iod)
        self._rest_gap_max = float(self._rest_gap_px.max())
        s = r.s_dense
        hw = r.half_width_inner
        prof = np.sqrt(np.clip(1 - (s / hw) ** 2, 0, 1))
        corner = 0.05 * r.iod
        self._jaw_up = -(JAW_UPPER * r.iod) * prof + corner * (1 - prof)
        self._jaw_lo = (JAW_LOWER * r.iod) * prof + corner * (1 - prof)
        self._lift_up = -(LIFT_UPPER * r.iod) * prof
        self._tuck_lo = -(TUCK_LOWER * r.iod) * prof
        self._head_weight: np.ndarray | None = None
        self._head_box: tuple = (0, 0, 0, 0)
        self._head_grid: tuple[np.ndarray, np.ndarray] | None = None
        self._mouth_cache: OrderedDict[bytes, tuple] = OrderedDict()
        self._eye_cache: OrderedDict[bytes, tuple] = OrderedDict()
        # RGB patches for still mode off (the head warp needs RGB around them)
        self._mouth_rgb_cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._eye_rgb_cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0
        self._lash = 0.03 * r.iod

    # ------------------------------------------------------------------ coefficients
    def coefficients(self, jaw: float, lip_close: float, lip_round: float, labiodental: float = 0.0,
                     teeth: float = 0.0) -> np.ndarray:
        """Basis weights (jaw, close, round, spread, lift, tuck) for one frame's mouth controls.

        ``labiodental`` (0..1) brings the lower lip up under the upper teeth instead of
        dropping it with the jaw (F/V): the upper lip lifts, the lower lip tucks. ``teeth``
        (0..1) lifts the upper lip off the teeth, only as far as the mouth is open (so a shut
        mouth stays shut whatever the track says).
        """
        one = lambda v: np.array([v], np.float64)
        return self.coefficients_batch(one(jaw), one(lip_close), one(lip_round), one(labiodental), one(teeth))[0]

    def coefficients_batch(self, jaw, lip_close, lip_round, labiodental, teeth) -> np.ndarray:
        """``coefficients`` for n frames at once: (n,) arrays in, (n, 6) float32 out (computed
        in float64 like the per-frame formula, so the weights are the same to the bit)."""
        r = self.rig
        f64 = lambda v: np.asarray(v, np.float64)
        close = np.clip(f64(lip_close), 0.0, 1.0)
        lab = np.clip(f64(labiodental), 0.0, 1.0) * (1.0 - close)
        opening = np.maximum(0.0, f64(jaw)) * (1.0 - close) * (1.0 - lab)
        gap = opening * _OPEN_GAIN  # target inner-lip gap at the centre, iod
        wide = gap >= r.rest_gap
        c_jaw = np.where(wide, (gap - r.rest_gap) / _OPEN_GAIN, 0.0)
        if r.rest_gap > 1e-4:
            # The close basis ends CLOSE_OVERLAP past the meeting line (see rig.close_overlap),
            # so that a gap g shows as g, c_close = (rest - g) / (rest + 2 overlap), down to
            # SEAL_GAP; under it c_close runs on to 1, where the lips seal.
            ov = float(close_overlap(r.rest_gap * r.iod, r.iod)) / r.iod
            g0 = min(SEAL_GAP, 0.5 * r.rest_gap)
            c0 = (r.rest_gap - g0) / (r.rest_gap + 2.0 * ov)
            c_lin = (r.rest_gap - gap) / (r.rest_gap + 2.0 * ov)
            c_seal = c0 + (1.0 - c0) * (1.0 - gap / g0)
            c_close = np.where(wide, 0.0, np.where(gap >= g0, c_lin, c_seal))
        else:
            c_close = np.zeros_like(gap)
        c_round = np.maximum(0.0, f64(lip_round))
        c_spread = np.maximum(0.0, -f64(lip_round))
        c_lift = np.maximum(lab, np.clip(f64(teeth), 0.0, 1.0) * np.minimum(1.0, opening / 0.15))
        # + 0.0 turns -0.0 (np.maximum(0.0, -0.0)) into 0.0: the weights are cache keys, byte-wise
        return (np.stack([c_jaw, c_close, c_round, c_spread, c_lift, lab], axis=1) + 0.0).astype(np.float32)

    # ------------------------------------------------------------------ mouth
    def _mouth(self, coeffs: np.ndarray) -> np.ndarray:
        """The lower-face ROI (RGB uint8) for one frame."""
        r = self.rig
        # identity + sum of the active bases (cv2.scaleAdd: one SIMD pass per basis; a BLAS
        # gemv here would spin up threads that fight the encoder for the two cores)
        sample = self._grid_flat
        for k in np.flatnonzero(coeffs > 1e-4):
            sample = cv2.scaleAdd(r.fields[k], float(coeffs[k]), sample)
        # fixed-point maps: the conversion plus a fixed-point remap beats a float remap
        m1, m2 = cv2.convertMaps(np.asarray(sample).reshape(self._mh, self._mw, 2), None, cv2.CV_16SC2)
        out = cv2.remap(self.image, m1, m2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        self._paint_interior(out, coeffs)
        return out

    def _lip_curves(self, coeffs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r = self.rig
        c_jaw, c_close, c_round, c_spread, c_lift, c_tuck = (float(c) for c in coeffs)
        up = (r.up_rest + c_jaw * self._jaw_up + c_close * (0.4 * self._rest_gap_px + self._overlap_px)
              + c_lift * self._lift_up)
        lo = (r.lo_rest + c_jaw * self._jaw_lo - c_close * (0.6 * self._rest_gap_px + self._overlap_px)
              + c_tuck * self._tuck_lo)
        s = r.s_dense * (1.0 - ROUND_IN * c_round + SPREAD_OUT * c_spread)
        return s, up, lo

    def _paint_interior(self, roi: np.ndarray, coeffs: np.ndarray) -> None:
        r = self.rig
        s, up, lo = self._lip_curves(coeffs)
        gap = float(np.max(lo - up))
        if coeffs[1] > 0 and gap < 2.0:
            self._paint_seam(roi, s, up, lo, strength=float(coeffs[1]) * (1.0 - gap / 2.0))
        if gap < 0.6:
            return  # lips together: nothing of the inside shows
        # inner-lip polygon in pixels, relative to the interior box; all the compositing below
        # runs on the polygon's bounding box only (a speaking mouth is a fraction of the box)
        upper = r.origin + s[:, None] * r.axes[0] + up[:, None] * r.axes[1]
        lower = r.origin + s[::-1, None] * r.axes[0] + lo[::-1, None] * r.axes[1]
        poly = np.vstack([upper, lower]) - np.array([self._ix0, self._iy0])
        bh, bw = self._iy1 - self._iy0, self._ix1 - self._ix0
        pad = 3
        sx0 = max(0, int(np.floor(poly[:, 0].min())) - pad)
        sy0 = max(0, int(np.floor(poly[:, 1].min())) - pad)
        sx1 = min(bw, int(np.ceil(poly[:, 0].max())) + pad + 1)
        sy1 = min(bh, int(np.ceil(poly[:, 1].max())) + pad + 1)
        if sx1 <= sx0 or sy1 <= sy0:
            return
        sw, sh = sx1 - sx0, sy1 - sy0
        mask = np.zeros((sh, sw), np.uint8)
        cv2.fillPoly(mask, [np.round((poly - (sx0, sy0)) * 16).astype(np.int32)], 255,
                     lineType=cv2.LINE_AA, shift=4)
        m = mask.astype(np.float32) * (1.0 / 255.0)
        # lower teeth and tongue ride with the jaw: shift their texture by the lower lip's
        # centre motion (sampled straight into the sub-window)
        c_jaw, c_close = float(coeffs[0]), float(coeffs[1])
        jaw_shift = (c_jaw * JAW_LOWER * r.iod - c_close * 0.6 * self._rest_gap_max
                     - float(coeffs[5]) * 0.5 * TUCK_LOWER * r.iod)
        dx, dy = jaw_shift * r.axes[1]
        lower = cv2.warpAffine(r.lower_teeth, np.float32([[1, 0, dx - sx0], [0, 1, dy - sy0]]), (sw, sh),
                               flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        # depth: the cavity darkens towards the lips; teeth and tongue carry their own shading
        soft = cv2.GaussianBlur(m, (0, 0), sigmaX=max(1.0, 0.02 * r.iod))
        col = r.cavity[sy0:sy1, sx0:sx1] * (0.55 + 0.45 * soft)[..., None]
        la = lower[..., 3:4]
        col += (lower[..., :3] - col) * la
        upper_teeth = r.upper_teeth[sy0:sy1, sx0:sx1]
        col += (upper_teeth[..., :3] - col) * upper_teeth[..., 3:4]
        # shading: ambient occlusion under the upper lip (teeth included: the lip shades their
        # roots) and darker corners, where the cheeks close in
        bs = self._box_s32[sy0:sy1, sx0:sx1]
        below = self._box_t32[sy0:sy1, sx0:sx1] - np.interp(bs, s, up).astype(np.float32)
        # exp(-d/k) for d >= 0, evaluated as cv2.exp on float32 (a fraction of numpy's cost)
        ao = cv2.exp(np.maximum(below, np.float32(0.0)) * np.float32(-1.0 / (0.035 * r.iod)))
        shade = np.float32(1.0) - self._ao_depth * ao
        reach = np.abs(bs) * np.float32(1.0 / max(float(np.abs(s).max()), 1e-3))
        x = np.clip((reach - np.float32(0.55)) * np.float32(1.0 / 0.45), 0.0, 1.0)
        shade *= np.float32(1.0) - np.float32(0.35) * x * x * (np.float32(3.0) - 2 * x)
        col *= shade[..., None]
        # the lip edge: a feather about a pixel wide at 512 px (wider on bigger frames)
        edge = cv2.GaussianBlur(m, (0, 0), sigmaX=max(0.7, 0.009 * r.iod))
        # the corners: the inner-lip outline meets at a point there, and a cavity painted to the
        # tip reads as a sharp black wedge; over the last CORNER_FADE of the half-width it fades
        # out into the lips (the commissure, where the lips meet, is lip, not cavity)
        fade = np.clip((np.float32(1.0) - reach) * np.float32(1.0 / CORNER_FADE), 0.0, 1.0)
        edge = (edge * (fade * fade * (np.float32(3.0) - 2 * fade)))[..., None]
        oy, ox = self._iy0 - self._my0 + sy0, self._ix0 - self._mx0 + sx0
        box = roi[oy:oy + sh, ox:ox + sw]
        blended = box.astype(np.float32) * (1.0 - edge) + col * edge
        box[...] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)

    def _paint_seam(self, roi: np.ndarray, s, up, lo, strength: float) -> None:
        """Darken the line where closed lips meet (a natural contact shadow; it also hides the
        one-pixel step of the warp's switch line)."""
        r = self.rig
        mid = (up + lo) / 2.0
        keep = np.abs(s) < 0.96 * np.abs(s).max()
        pts = r.origin + s[keep, None] * r.axes[0] + mid[keep, None] * r.axes[1]
        pts = pts - np.array([self._mx0, self._my0])
        pad = 4
        x0 = max(0, int(pts[:, 0].min()) - pad)
        y0 = max(0, int(pts[:, 1].min()) - pad)
        x1 = min(roi.shape[1], int(pts[:, 0].max()) + pad + 1)
        y1 = min(roi.shape[0], int(pts[:, 1].max()) + pad + 1)
        if x1 <= x0 or y1 <= y0:
            return
        line = np.zeros((y1 - y0, x1 - x0), np.float32)
        cv2.polylines(line, [np.round((pts - (x0, y0)) * 16).astype(np.int32)], False, 1.0, thickness=1,
                      lineType=cv2.LINE_AA, shift=4)
        line = cv2.GaussianBlur(line, (0, 0), sigmaX=1.0)
        fade = np.float32(0.3 * min(1.0, strength))
        band = roi[y0:y1, x0:x1]
        shade = 1.0 - fade * np.minimum(line * 1.6, 1.0)
        band[...] = np.clip(band.astype(np.float32) * shade[..., None], 0, 255).astype(np.uint8)

    # ------------------------------------------------------------------ eyes and brows
    def _eyes(self, blink: float, brow: float) -> np.ndarray | None:
        if blink < 0.02 and abs(brow) < 0.02:
            return None
        r = self.rig
        sample = self._eye_grid.copy()
        if abs(brow) >= 0.02:
            sample += self._brow * float(brow)
        if blink >= 0.02 and len(self._lid_cols):
            cols = self._lid_cols
            up = r.lid_upper[cols]
            lo = r.lid_lower[cols]
            top = r.lid_top[cols]
            lid = up + float(min(blink, 1.0)) * (lo - up)
            lash = self._lash
            ys = self._eye_grid[:, cols, 1].astype(np.float64)  # (eh, n) absolute y
            # The lid skin between `top` and the lash line stretches down to the new lid
            # margin; the lash line itself moves down unstretched (a stretched lash line reads
            # as a smudge); below the margin the eye shows unchanged.
            skin_src_end = up - lash
            skin_dst_end = np.maximum(lid - lash, top + 1e-3)
            t = (ys - top) / np.maximum(skin_dst_end - top, 1e-3)
            sy = np.where(ys < top, ys, top + t * (skin_src_end - top))
            sy = np.where(ys >= skin_dst_end, ys - (lid - up), sy)
            sy = np.where(ys > lid, ys, sy)
            sample[:, cols, 1] = sy + (sample[:, cols, 1] - ys)
        return cv2.remap(self.image, sample, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    # ------------------------------------------------------------------ head
    def _head_map(self, yaw: float, pitch: float, roll: float) -> tuple[np.ndarray, np.ndarray, tuple]:
        """Backward map moving the head rigidly (small angles), fading out to the shoulders.

        Returns (map_x, map_y, (x0, y0, x1, y1)): float32 source coordinates for the pixels of the
        box where the head weight is above HEAD_WEIGHT_MIN (outside it a pixel moves by under
        HEAD_WEIGHT_MIN of the head's shift: it stays). The map is the identity plus the weight
        times the rigid motion's displacement, an affine function of the pixel position, so a
        frame costs two weighted sums over the box (cv2, one pass each) instead of building full
        coordinate grids: 11 ms -> ~1 ms per 512-px frame here.
        """
        r = self.rig
        if self._head_weight is None:
            self._head_weight, self._head_box, self._head_grid = self._make_head_weight()
        iod = r.iod
        pivot = (r.origin + r.axes[1] * (0.9 * iod)).astype(np.float64)  # roughly the top of the neck
        a = np.deg2rad(roll)
        # yaw/pitch of a few degrees read as small shifts of the face in the picture plane
        shift = np.array([np.deg2rad(yaw) * 1.6 * iod, np.deg2rad(pitch) * 1.6 * iod])
        c, s = np.cos(a), np.sin(a)
        rot_inv = np.array([[c, s], [-s, c]])
        # source = rot_inv @ (p - pivot - shift) + pivot, so displacement = (rot_inv - I) p + b
        b = pivot - rot_inv @ (pivot + shift)
        gx, gy = self._head_grid
        wgt = self._head_weight
        dx = cv2.addWeighted(gx, float(rot_inv[0, 0] - 1.0), gy, float(rot_inv[0, 1]), float(b[0]))
        dy = cv2.addWeighted(gx, float(rot_inv[1, 0]), gy, float(rot_inv[1, 1] - 1.0), float(b[1]))
        mx, my = cv2.multiply(dx, wgt), cv2.multiply(dy, wgt)
        # Every source pixel stays inside the picture: a head that would pull pixels from beyond
        # an edge (a big nod on a portrait cropped at the hair) moves only as far as the picture
        # allows in this frame, instead of showing a mirrored copy of the hair (reflected border).
        k = min(_room(gx, mx, self.width - 1), _room(gy, my, self.height - 1))
        if k < 1.0:
            mx, my = mx * np.float32(k), my * np.float32(k)
        return cv2.add(gx, mx), cv2.add(gy, my), self._head_box

    def _make_head_weight(self) -> tuple[np.ndarray, tuple, tuple[np.ndarray, np.ndarray]]:
        """The head's weight (1 inside a soft ellipse over the head, fading to 0 at the
        shoulders), cut to the box where it exceeds HEAD_WEIGHT_MIN, with that box's pixel
        coordinates (float32 grids)."""
        r = self.rig
        h, w = self.height, self.width
        mask = np.zeros((h, w), np.float32)
        centre = r.origin - r.axes[1] * (0.9 * r.iod)
        axes = (int(1.55 * r.iod), int(2.1 * r.iod))
        angle = float(np.degrees(np.arctan2(r.axes[0][1], r.axes[0][0])))
        cv2.ellipse(mask, (int(centre[0]), int(centre[1])), axes, angle, 0, 360, 1.0, -1)
        weight = cv2.GaussianBlur(mask, (0, 0), sigmaX=0.45 * r.iod)
        # fade to 0 at the picture's edges (linear over HEAD_EDGE_RAMP iod): a portrait cropped at
        # the hair stretches the hair a little when the head nods down, instead of pulling in
        # pixels from beyond the edge (``_room`` caps a motion larger than the ramp)
        ramp = HEAD_EDGE_RAMP * r.iod
        yy = np.minimum(np.arange(h), np.arange(h)[::-1]).astype(np.float32)
        xx = np.minimum(np.arange(w), np.arange(w)[::-1]).astype(np.float32)
        weight *= np.minimum(1.0, np.minimum(yy[:, None], xx[None, :]) / ramp)
        ys, xs = np.nonzero(weight > HEAD_WEIGHT_MIN)
        if len(xs) == 0:
            box = (0, 0, 1, 1)
        else:
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        x0, y0, x1, y1 = box
        gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        return np.ascontiguousarray(weight[y0:y1, x0:x1]), box, (gx, gy)

    # ------------------------------------------------------------------ patch caches
    def clear_caches(self) -> None:
        """Forget rendered patches (memory pressure, or benchmarking unseen speech)."""
        with self._cache_lock:
            self._mouth_cache.clear()
            self._eye_cache.clear()
            self._mouth_rgb_cache.clear()
            self._eye_rgb_cache.clear()

    def _cached(self, cache: OrderedDict, key: bytes, limit: int, build):
        with self._cache_lock:
            hit = cache.get(key)
            if hit is not None:
                cache.move_to_end(key)
                self.cache_hits += 1
                return hit
        value = build()
        with self._cache_lock:
            cache[key] = value
            while len(cache) > limit:
                cache.popitem(last=False)
            self.cache_misses += 1
        return value

    def mouth_patch(self, coeffs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """I420 planes of the lower-face ROI for quantized basis weights (LRU-cached: speech
        revisits the same mouth shapes, and silence is one shape)."""
        return self._cached(self._mouth_cache, coeffs.tobytes(), MOUTH_CACHE_SIZE,
                            lambda: _i420_planes(self._mouth(coeffs)))

    def mouth_rgb(self, coeffs: np.ndarray) -> np.ndarray:
        """The lower-face ROI as RGB for quantized basis weights (still mode off), LRU-cached."""
        return self._cached(self._mouth_rgb_cache, coeffs.tobytes(), MOUTH_RGB_CACHE_SIZE,
                            lambda: self._mouth(coeffs))

    def eye_rgb(self, blink: float, brow: float) -> np.ndarray | None:
        """The eye region as RGB (still mode off), LRU-cached; None when the eyes are at rest."""
        if blink < 0.02 and abs(brow) < 0.02:
            return None
        return self._cached(self._eye_rgb_cache, np.array([blink, brow], np.float32).tobytes(), EYE_CACHE_SIZE,
                            lambda: self._eyes(blink, brow))

    def eye_patch(self, blink: float, brow: float) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        rgb_key = np.array([blink, brow], np.float32).tobytes()
        if blink < 0.02 and abs(brow) < 0.02:
            return None
        return self._cached(self._eye_cache, rgb_key, EYE_CACHE_SIZE,
                            lambda: _i420_planes(self._eyes(blink, brow)))

    # ------------------------------------------------------------------ frames
    def render(self, first_frame: int, jaw, lip_round, lip_close, blink, brow, head=None, *,
               labiodental=None, teeth=None) -> Frames:
        """I420 frames for per-frame control arrays (all of length n; ``head`` (n, 3) degrees;
        ``labiodental`` and ``teeth`` 0..1, None meaning zeros)."""
        with _cv2_single_threaded():
            return self._render(first_frame, jaw, lip_round, lip_close, blink, brow, head, labiodental, teeth)

    def _render(self, first_frame, jaw, lip_round, lip_close, blink, brow, head, labiodental, teeth) -> Frames:
        n = len(jaw)
        h, w = self.height, self.width
        lab = np.zeros(n, np.float32) if labiodental is None else np.asarray(labiodental, np.float32)
        tee = np.zeros(n, np.float32) if teeth is None else np.asarray(teeth, np.float32)
        out = np.empty((n, h * 3 // 2, w), np.uint8)
        out[:] = self.base_yuv
        if head is not None and np.any(np.abs(head) > 1e-3):
            return self._render_moving(first_frame, out, jaw, lip_round, lip_close, blink, brow, head, lab, tee)
        blink_q = np.round(np.asarray(blink, np.float64) * EYE_STEPS) / EYE_STEPS
        brow_q = np.round(np.asarray(brow, np.float64) * EYE_STEPS) / EYE_STEPS
        all_coeffs = _quantize(self.coefficients_batch(jaw, lip_close, lip_round, lab, tee))
        shaped = np.any(all_coeffs > 0, axis=1)
        for i in range(n):
            coeffs = all_coeffs[i]
            if shaped[i]:
                _paste_planes(out[i], self.mouth_patch(coeffs), self._mx0, self._my0, h, w)
            eyes = self.eye_patch(float(blink_q[i]), float(brow_q[i]))
            if eyes is not None:
                _paste_planes(out[i], eyes, self._eye[0], self._eye[1], h, w)
        return Frames(first_index=first_frame, data=out, pixel_format="yuv420p")

    def _render_moving(self, first_frame, out, jaw, lip_round, lip_close, blink, brow, head, lab, tee) -> Frames:
        """Still mode off: compose in RGB, move the head, convert the whole frame."""
        mx0, my0, mx1, my1 = self._mx0, self._my0, self._mx1, self._my1
        ex0, ey0, ex1, ey1 = self._eye
        blink_q = np.round(np.asarray(blink, np.float64) * EYE_STEPS) / EYE_STEPS
        brow_q = np.round(np.asarray(brow, np.float64) * EYE_STEPS) / EYE_STEPS
        all_coeffs = _quantize(self.coefficients_batch(jaw, lip_close, lip_round, lab, tee))
        for i in range(len(jaw)):
            coeffs = all_coeffs[i]
            frame = self.image.copy()
            if np.any(coeffs > 0):  # the same quantized shapes as still mode, cached as RGB
                frame[my0:my1, mx0:mx1] = self.mouth_rgb(coeffs)
            eyes = self.eye_rgb(float(blink_q[i]), float(brow_q[i]))
            if eyes is not None:
                frame[ey0:ey1, ex0:ex1] = eyes
            map_x, map_y, (x0, y0, x1, y1) = self._head_map(*(float(v) for v in head[i]))
            moved = cv2.remap(frame, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
            frame[y0:y1, x0:x1] = moved
            out[i] = cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420)
        return Frames(first_index=first_frame, data=out, pixel_format="yuv420p")


def _room(grid: np.ndarray, move: np.ndarray, last: float) -> float:
    """Largest k <= 1 with 0 <= grid + k * move <= last everywhere (grid: pixel coordinates,
    move: their backward displacement; ``last`` the picture's last pixel index)."""
    k = 1.0
    back, fwd = move < -1e-3, move > 1e-3
    if back.any():
        k = min(k, float(np.min(grid[back] / -move[back])))
    if fwd.any():
        k = min(k, float(np.min((last - grid[fwd]) / move[fwd])))
    return max(0.0, k)


# Quantization of the per-frame mouth weights (jaw, close, round, spread). One jaw step moves the
# lower lip by 0.37/64 iod (under a pixel at 512x512): invisible, and it lets the patch cache
# serve repeated shapes.
_QUANT = np.array([64.0, 32.0, 24.0, 24.0, 16.0, 16.0], np.float32)
EYE_STEPS = 20
MOUTH_CACHE_SIZE = 192  # ~100 KB each at 512x512
EYE_CACHE_SIZE = 64
#: Share of the mouth's half-width, at each corner, over which the painted interior fades out
#: into the lips (see _paint_interior).
CORNER_FADE = 0.12
MOUTH_RGB_CACHE_SIZE = 96  # still mode off: ~170 KB each at 512x512
#: Head motion leaves pixels whose head weight is at most this alone (they would move by less
#: than this fraction of the head's shift: under 0.01 px for a shift of a few pixels).
HEAD_WEIGHT_MIN = 1e-3
#: The head's weight falls linearly to 0 over this distance (iod) from the picture's edges.
HEAD_EDGE_RAMP = 0.5


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _quantize(coeffs: np.ndarray) -> np.ndarray:
    return (np.round(coeffs * _QUANT) / _QUANT).astype(np.float32)


def _i420_planes(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ph, pw = rgb.shape[:2]
    yuv = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).reshape(-1)
    n_y, n_c = ph * pw, (ph // 2) * (pw // 2)
    return (yuv[:n_y].reshape(ph, pw), yuv[n_y:n_y + n_c].reshape(ph // 2, pw // 2),
            yuv[n_y + n_c:].reshape(ph // 2, pw // 2))


def _paste_planes(frame: np.ndarray, planes, x0: int, y0: int, h: int, w: int) -> None:
    """Write I420 planes of a patch (even size and offset) into a planar I420 frame in place."""
    py, pu, pv = planes
    ph, pw = py.shape
    flat = frame.reshape(-1)
    quarter = (h // 2) * (w // 2)
    flat[: h * w].reshape(h, w)[y0:y0 + ph, x0:x0 + pw] = py
    flat[h * w: h * w + quarter].reshape(h // 2, w // 2)[y0 // 2:(y0 + ph) // 2, x0 // 2:(x0 + pw) // 2] = pu
    flat[h * w + quarter:].reshape(h // 2, w // 2)[y0 // 2:(y0 + ph) // 2, x0 // 2:(x0 + pw) // 2] = pv


__all__ = ["FaceRenderer"]
