"""Per-avatar precompute of the classic engine: a deformation rig for the face.

The renderer never triangulates or solves anything per frame. Everything that depends only on
the portrait is computed here once and cached on disk with the avatar:

* **Backward displacement fields** ("where does this output pixel come from") over a region of
  interest around the mouth and jaw, one per motion basis: jaw opening, lip closing (for
  portraits whose mouth is open at rest), rounding and spreading. A frame's sampling map is
  the identity grid plus a linear combination of the bases, so a frame costs one small
  matrix-vector product and one ``cv2.remap``.
* The fields are built from displacements at the 68 landmarks (smoothly interpolated with a
  thin-plate spline) and then *overridden* inside the lips with rigid per-column plateaus that
  switch at the rest lip line. That makes the lips translate exactly (a linear combination of
  rigid plateaus is exact), while the discontinuity sits inside the opening, which is painted
  over with the synthesized mouth interior.
* Analytic inner-lip curves in face coordinates, so the interior mask follows the lips exactly.
* Textures for the mouth interior (cavity, upper and lower teeth) lit like the face.
* Eyelid and brow geometry for blinks and brow raises.

Geometry is expressed in face axes: ``ex`` along the eye line, ``ey`` perpendicular (down), so
slightly rolled heads deform along their own axes.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import cv2
import numpy as np
from scipy.interpolate import PchipInterpolator, RBFInterpolator

from ...fsutil import atomic_write
from ...types import Avatar

RIG_VERSION = "9"  # 5: neck and clothes stay put; 6: a rising chin stretches the skin under it at most 1.5x;
# 7: a closing smile seals its lips (CLOSE_OVERLAP) and stretches the philtrum evenly; 8: a darker
# cavity over a lighter, rounded tongue; 9: every basis places the upper lip and philtrum that way

# Motion basis amplitudes, in inter-ocular distances (iod). At jaw=1 the inner-lip gap grows by
# JAW_LOWER + JAW_UPPER = 0.37 iod, a wide "AA"; ordinary speech uses a third to a half of that.
JAW_LOWER = 0.30
JAW_UPPER = 0.07
JAW_CORNER = 0.05  # mouth corners drop a little as the jaw opens
CHIN_GAIN = 1.08  # the chin is further from the jaw hinge than the lower lip
# Below the jaw line (the face contour, landmarks 3-13, where the motion has put it) nothing
# moves: the chin slides over the top of the neck, and the neck, a collar or a tie stay put. The
# motion fades out over NECK_FEATHER (iod), ending NECK_MARGIN (iod) below the line.
NECK_MARGIN = 0.06
NECK_FEATHER = 0.15
# A chin that RISES (closing a mouth open at rest) uncovers skin that the unmoved neck must fill:
# its fade is at least NECK_RISE_FEATHER times the rise. The fade is a smoothstep, steepest at
# 1.5 / feather, so the skin under the chin is stretched by at most 1 / (1 - 1.5 / 4.5) = 1.5x
# (with the 0.15 iod fade alone, a smile with a 0.23 iod rest gap folded over: mirrored skin).
NECK_RISE_FEATHER = 4.5
ROUND_IN = 0.24  # rounded vowels pull each corner in by this fraction of the half-width
ROUND_PROTRUDE = 0.025  # ... and thicken the lips (iod)
SPREAD_OUT = 0.10  # spread vowels pull the corners out by this fraction of the half-width
SPREAD_LIFT = 0.015  # ... and up a little (iod)
BROW_LIFT = 0.07  # brow raise at brow=1 (iod)
LIFT_UPPER = 0.06  # "lift" basis: the upper lip rises off the upper teeth by this much (iod)
TUCK_LOWER = 0.02  # "tuck" basis: the lower lip rises and tucks under the upper teeth (F/V)

# Closing a mouth that is open at rest brings each lip CLOSE_OVERLAP (iod) past the line where
# they meet, so that the seam shows the inside of both lips rather than their inner edges, where
# the portrait's teeth (or the dark of its open mouth) begin: landmarks place those edges only
# to a pixel or two, and a seam sampled right at them showed a dotted line of teeth.
CLOSE_OVERLAP = 0.025


def close_overlap(rest_gap: np.ndarray, iod: float) -> np.ndarray:
    """How far (pixels) each lip goes past the meeting line when the mouth closes fully, for the
    rest gap ``rest_gap`` (pixels, any shape): CLOSE_OVERLAP iod where the lips are apart at rest,
    fading to 0 where they already touch (a gap under 0.02 iod)."""
    return CLOSE_OVERLAP * iod * _smoothstep(np.asarray(rest_gap, np.float64) / (0.02 * iod))


# Basis order in ``MouthRig.fields``.
BASES = ("jaw", "close", "round", "spread", "lift", "tuck")

# Appearance limits for synthesized teeth, relative to measurements of the portrait (see
# ``photo_stats``): teeth are never brighter than this fraction of the eye whites' luminance,
# and never sharper (``sharpness``: fine detail relative to coarse) than this fraction of the
# skin around the mouth.
TEETH_MAX_OF_EYE_WHITE = 0.95
TEETH_MAX_OF_FACE_SHARPNESS = 1.0


@dataclass(frozen=True)
class MouthRig:
    """Everything the per-frame mouth renderer needs, in rig (output) pixels."""

    roi: np.ndarray  # int32 [x0, y0, x1, y1], even-aligned, of the deformable lower face
    grid: np.ndarray  # (h, w, 2) float32 identity sampling map of the ROI (absolute coordinates)
    fields: np.ndarray  # (K, h*w*2) float32 backward displacement per unit of each basis
    origin: np.ndarray  # (2,) mouth centre (absolute pixels)
    axes: np.ndarray  # (2, 2) rows ex, ey
    iod: float
    s_dense: np.ndarray  # (m,) horizontal face coordinate of the inner-lip samples
    up_rest: np.ndarray  # (m,) vertical face coordinate of the upper inner lip at rest
    lo_rest: np.ndarray  # (m,) ... of the lower inner lip
    q: np.ndarray  # (m,) opening profile (1 at the centre, 0 at the corners)
    half_width_inner: float
    half_width_outer: float
    rest_gap: float  # inner-lip gap at the centre at rest (iod)
    # mouth interior textures over the box ``ibox`` (absolute [x0, y0, x1, y1])
    ibox: np.ndarray
    cavity: np.ndarray  # (bh, bw, 3) float32 RGB
    upper_teeth: np.ndarray  # (bh, bw, 4) float32 RGBA, fixed to the skull
    lower_teeth: np.ndarray  # (bh, bw, 4) float32 RGBA, moves with the jaw
    # eyes: per eye the corner-to-corner columns of upper and lower lid lines
    eye_roi: np.ndarray  # int32 [x0, y0, x1, y1] covering both eyes and brows
    eye_grid: np.ndarray  # (eh, ew, 2) float32
    lid_upper: np.ndarray  # (ew,) absolute y of the upper lid per ROI column (nan outside eyes)
    lid_lower: np.ndarray  # (ew,) absolute y of the lower lid
    lid_top: np.ndarray  # (ew,) where the stretched lid skin starts
    brow_field: np.ndarray  # (eh, ew, 2) float32 backward displacement per unit brow raise
    # photo measurements: [eye-white luminance (0..255), face high-frequency energy, noise sigma]
    photo: np.ndarray
    own_teeth: float  # 1.0 when the upper teeth layer is the portrait's own teeth, else 0.0

    def save(self, path: Path) -> None:
        arrays = {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}
        arrays["rig_version"] = np.asarray(RIG_VERSION)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
                np.savez(f, **arrays)

        atomic_write(path, write)

    @classmethod
    def load(cls, path: Path) -> MouthRig | None:
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["rig_version"]) != RIG_VERSION:
                    return None
                values = {}
                for f in fields(cls):
                    v = data[f.name]
                    values[f.name] = float(v) if v.ndim == 0 else v
                return cls(**values)
        except (OSError, KeyError, ValueError):
            return None


# ----------------------------------------------------------------------------- geometry helpers
def _face_axes(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    eye_l = lm[36:42].mean(0)
    eye_r = lm[42:48].mean(0)
    d = eye_r - eye_l
    iod = float(np.linalg.norm(d))
    ex = d / iod
    ey = np.array([-ex[1], ex[0]])
    return ex, ey, iod


def _to_face(p: np.ndarray, origin: np.ndarray, ex: np.ndarray, ey: np.ndarray) -> np.ndarray:
    q = p - origin
    return np.stack([q @ ex, q @ ey], axis=-1)


def _from_face(st: np.ndarray, origin: np.ndarray, ex: np.ndarray, ey: np.ndarray) -> np.ndarray:
    return origin + st[..., :1] * ex + st[..., 1:2] * ey


def _curve(points_st: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Vertical coordinate of a lip contour at horizontal positions ``s`` (monotone in s)."""
    order = np.argsort(points_st[:, 0])
    xs, ts = points_st[order, 0], points_st[order, 1]
    keep = np.concatenate([[True], np.diff(xs) > 1e-3])
    xs, ts = xs[keep], ts[keep]
    if len(xs) < 2:
        return np.full_like(s, ts.mean() if len(ts) else 0.0)
    return PchipInterpolator(xs, ts, extrapolate=True)(np.clip(s, xs[0], xs[-1]))


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


# ----------------------------------------------------------------------------- the rig
def build_mouth_rig(image: np.ndarray, landmarks: np.ndarray) -> MouthRig:
    """Precompute the deformation rig of a portrait crop (RGB uint8) and its 68 landmarks."""
    h_img, w_img = image.shape[:2]
    lm = np.asarray(landmarks, dtype=np.float64)
    ex, ey, iod = _face_axes(lm)
    origin = (lm[60] + lm[64]) / 2.0  # inner mouth corners' midpoint
    st = _to_face(lm, origin, ex, ey)

    hw_out = max(abs(st[54, 0] - st[48, 0]) / 2.0, 0.1 * iod)
    # The opening spans the outer corners: real smiles show teeth and dark corners beyond the
    # inner-lip landmarks 60/64, and closing the mouth must close those too.
    hw_in = hw_out

    # Inner-lip contours, densely in s (about two samples per pixel across the mouth).
    s_dense = np.linspace(-hw_in, hw_in, max(16, int(4 * hw_in)))
    up_pts = st[[48, 60, 61, 62, 63, 64, 54]]
    lo_pts = st[[48, 60, 67, 66, 65, 64, 54]]
    up_rest = _curve(up_pts, s_dense)
    lo_rest = np.maximum(_curve(lo_pts, s_dense), up_rest)
    q = np.sqrt(np.clip(1.0 - (s_dense / hw_in) ** 2, 0.0, 1.0))
    gap_rest_dense = lo_rest - up_rest
    rest_gap = float(np.interp(0.0, s_dense, gap_rest_dense)) / iod

    # ROI of the deformable lower face: from under the nose to below the chin, jaw to jaw.
    chin_drop = CHIN_GAIN * JAW_LOWER * iod
    pts = np.vstack([lm[2:15], lm[31:36], lm[48:68]])
    x0 = pts[:, 0].min() - 0.18 * iod
    x1 = pts[:, 0].max() + 0.18 * iod
    y0 = min(lm[31:36, 1].min(), lm[48:55, 1].min() - 0.2 * iod)
    y1 = lm[5:12, 1].max() + chin_drop + 0.45 * iod
    roi = _even_box(x0, y0, x1, y1, w_img, h_img)
    rx0, ry0, rx1, ry1 = roi
    gy, gx = np.mgrid[ry0:ry1, rx0:rx1].astype(np.float32)
    grid = np.stack([gx, gy], axis=-1)
    pix_st = _to_face(grid.reshape(-1, 2).astype(np.float64), origin, ex, ey)

    # Anchors with zero displacement: nose, eyes, upper jaw, and a ring on the ROI border.
    border = _ring(roi, step=max(8.0, 0.15 * iod))
    anchors = np.vstack([lm[27:36], lm[0:3], lm[14:17], border])

    def prof(s: np.ndarray) -> np.ndarray:
        return np.sqrt(np.clip(1.0 - (s / hw_in) ** 2, 0.0, 1.0))

    def lip_field(upper_d, lower_d, chin_d, corner_d, inner=True):
        """Backward field for a vertical lip motion (pixels along ey per unit of the basis).

        upper_d(s) / lower_d(s): displacement of the upper / lower lip at s (down positive).
        chin_d: displacement of the chin (landmark 8); the jaw line follows with falloff.
        inner: the inner-lip landmarks carry the lip motion too. Off for closing, where the two
        lips' inner targets meet within a pixel with opposite values and the thin-plate field
        overshoots around them (the rigid plateaus carry the lips there).
        """
        ctrl, disp = [], []
        # lips: outer and inner contours carry the lip displacement
        for idx in (49, 50, 51, 52, 53, 61, 62, 63)[: None if inner else 5]:
            ctrl.append(st[idx]); disp.append((0.0, upper_d(st[idx, 0])))
        for idx in (55, 56, 57, 58, 59, 65, 66, 67)[: None if inner else 5]:
            ctrl.append(st[idx]); disp.append((0.0, lower_d(st[idx, 0])))
        for idx in (48, 54, 60, 64):
            ctrl.append(st[idx]); disp.append((0.0, corner_d))
        if not inner:
            # the philtrum between the still nose and the upper lip stretches evenly (the thin-plate
            # field alone kept it still near the nose and stretched it 5x just above the lip)
            for lip, nose in ((49, 31), (50, 32), (51, 33), (52, 34), (53, 35)):
                for k in (1 / 3, 2 / 3):
                    ctrl.append(st[nose] + k * (st[lip] - st[nose]))
                    disp.append((0.0, k * upper_d(st[lip, 0])))
        # jaw line: the chin moves most, the jaw angles barely
        falloff = {3: 0.12, 4: 0.32, 5: 0.55, 6: 0.8, 7: 0.95, 8: 1.0, 9: 0.95, 10: 0.8, 11: 0.55,
                   12: 0.32, 13: 0.12}
        for idx, f in falloff.items():
            ctrl.append(st[idx]); disp.append((0.0, chin_d * f))
        # between lower lip and chin: rigid with the jaw
        for a, b in ((57, 8), (58, 7), (56, 9), (59, 6), (55, 10)):
            m = (st[a] + st[b]) / 2
            ctrl.append(m); disp.append((0.0, (lower_d(st[a, 0]) + chin_d) / 2))
        # cheeks beside the corners stretch a little
        for side in (-1, 1):
            c = st[54] if side > 0 else st[48]
            for k, f in ((0.25, 0.55), (0.5, 0.3)):
                ctrl.append(c + np.array([side * k * iod, 0.1 * iod])); disp.append((0.0, corner_d * f + chin_d * 0.15 * f))
        # under the chin the skin follows part of the way, then the neck stays
        chin = st[8]
        ctrl.append(chin + np.array([0.0, 0.25 * iod])); disp.append((0.0, 0.55 * chin_d))
        for dx in (-0.35, 0.35):
            ctrl.append(chin + np.array([dx * iod, 0.2 * iod])); disp.append((0.0, 0.35 * chin_d))
        ctrl = np.array(ctrl)
        disp = np.array(disp)
        anchor_st = _to_face(anchors, origin, ex, ey)
        # Backward field: specified at the *target* positions (rest + displacement), value -disp.
        targets = np.vstack([ctrl + disp, anchor_st])
        values = np.vstack([-disp, np.zeros((len(anchor_st), 2))])
        field_st = _rbf_field(targets, values, pix_st, grid.shape[:2])
        # Rigid plateaus inside the lips, switching at the rest lip midline.
        s = pix_st[:, 0]
        t = pix_st[:, 1]
        inside = np.abs(s) < hw_in
        # where the lips meet when a mouth that is open at rest closes (see f_close)
        mid = np.interp(s, s_dense, up_rest + 0.4 * (lo_rest - up_rest))
        lip_top = np.interp(s, s_dense, _curve(st[[48, 49, 50, 51, 52, 53, 54]], s_dense))
        bot = np.interp(s, s_dense, _curve(st[[48, 59, 58, 57, 56, 55, 54]], s_dense)) + max(
            abs(lower_d(0.0)), 1.0) + 4
        upv = -_vec(upper_d, s)
        lov = -_vec(lower_d, s)
        # fade the plateaus out towards the corners so they meet the smooth field there
        edge = _smoothstep((hw_in - np.abs(s)) / (0.15 * hw_in))
        # The upper lip is rigid from where its top goes (a backward field: its output position),
        # and the skin between the still nose and there stretches or shrinks evenly. A plateau
        # reaching above the lip sampled the nose tip a second time when a smile's lip came down
        # (a ghost nose under the nose), and the thin-plate field alone stretched that skin 5x.
        lip_out = lip_top - upv
        nose = np.interp(s, s_dense, _curve(st[31:36], s_dense))
        w_up = inside * (t >= lip_out) * (t < mid) * edge
        w_ph = inside * (t > nose) * (t < lip_out) * edge
        ph = upv * np.clip((t - nose) / np.maximum(lip_out - nose, 1.0), 0.0, 1.0)
        # the lower lip: rigid at the lip, blending into the smooth field over ~0.1 iod below it
        feather = max(3.0, 0.1 * iod)
        w_lo = inside * _smoothstep((bot - t) / feather + 1.0) * (t >= mid) * edge
        field_st[:, 1] = field_st[:, 1] * (1 - w_up - w_lo - w_ph) + upv * w_up + lov * w_lo + ph * w_ph
        # below the moved jaw line: still (a backward field, so "below" is where the line went)
        moved = np.array([st[i] + (0.0, chin_d * f) for i, f in falloff.items()])
        line = _curve(moved, s)  # smooth (PCHIP) through the moved contour, flat beyond its ends
        feather = max(NECK_FEATHER * iod, NECK_RISE_FEATHER * max(0.0, -chin_d))
        start = line + (NECK_MARGIN - NECK_FEATHER) * iod  # the fade starts here whatever its length
        field_st *= _smoothstep((start + feather - t) / feather)[:, None]
        return _face_to_pixels(field_st, ex, ey)

    # jaw opening
    def jaw_up(s):
        return -(JAW_UPPER * iod) * prof(s) + JAW_CORNER * iod * (1 - prof(s))

    def jaw_lo(s):
        return (JAW_LOWER * iod) * prof(s) + JAW_CORNER * iod * (1 - prof(s))

    f_jaw = lip_field(jaw_up, jaw_lo, chin_drop, JAW_CORNER * iod)

    # closing a mouth that is open at rest: lips meet at the midline, the jaw comes up with
    # the lower lip
    gap_at = lambda s: np.interp(s, s_dense, gap_rest_dense)
    overlap = lambda s: close_overlap(gap_at(s), iod)
    f_close = lip_field(lambda s: 0.4 * gap_at(s) + overlap(s), lambda s: -0.6 * gap_at(s) - overlap(s),
                        -0.6 * rest_gap * iod, 0.0, inner=False)

    # rounding / spreading: corners move along ex, lips thicken or lift
    f_round = _corner_field(st, origin, ex, ey, iod, hw_out, anchors, pix_st, grid.shape[:2],
                            inward=ROUND_IN, vertical=ROUND_PROTRUDE * iod, lift=0.0)
    f_spread = _corner_field(st, origin, ex, ey, iod, hw_out, anchors, pix_st, grid.shape[:2],
                             inward=-SPREAD_OUT, vertical=0.0, lift=SPREAD_LIFT * iod)

    # teeth show / labiodental: the upper lip rises off the teeth (its corners stay); the lower
    # lip rises towards the upper teeth' biting edge, the jaw barely moves
    f_lift = lip_field(lambda s: -(LIFT_UPPER * iod) * prof(s), lambda s: 0.0 * s, 0.0, 0.0)
    f_tuck = lip_field(lambda s: 0.0 * s, lambda s: -(TUCK_LOWER * iod) * prof(s), -0.5 * TUCK_LOWER * iod, 0.0)

    stacked = np.stack([f_jaw, f_close, f_round, f_spread, f_lift, f_tuck]).reshape(len(BASES), -1).astype(np.float32)

    interior = _interior_textures(image, lm, st, origin, ex, ey, iod, s_dense, up_rest, lo_rest,
                                  hw_in, chin_drop)
    eyes = _eye_rig(image, lm, ex, ey, iod)

    return MouthRig(
        roi=np.asarray(roi, np.int32), grid=grid, fields=stacked, origin=origin.astype(np.float64),
        axes=np.stack([ex, ey]), iod=iod, s_dense=s_dense, up_rest=up_rest, lo_rest=lo_rest, q=q,
        half_width_inner=float(hw_in), half_width_outer=float(hw_out), rest_gap=rest_gap,
        **interior, **eyes,
    )


def _vec(fn, s: np.ndarray) -> np.ndarray:
    out = fn(s)
    return np.broadcast_to(np.asarray(out, dtype=np.float64), s.shape).copy()


def _even_box(x0, y0, x1, y1, w, h) -> tuple[int, int, int, int]:
    """Integer box clipped to the image with even corners (I420 chroma alignment)."""
    bx0 = max(0, int(np.floor(x0)) & ~1)
    by0 = max(0, int(np.floor(y0)) & ~1)
    bx1 = min(w, (int(np.ceil(x1)) + 1) & ~1)
    by1 = min(h, (int(np.ceil(y1)) + 1) & ~1)
    return bx0, by0, bx1, by1


def _ring(box, step: float) -> np.ndarray:
    x0, y0, x1, y1 = box
    xs = np.arange(x0, x1 + step, step)
    ys = np.arange(y0, y1 + step, step)
    pts = [(x, y0) for x in xs] + [(x, y1) for x in xs] + [(x0, y) for y in ys] + [(x1, y) for y in ys]
    return np.array(pts, dtype=np.float64)


def _rbf_field(targets: np.ndarray, values: np.ndarray, pix_st: np.ndarray, shape) -> np.ndarray:
    """Thin-plate interpolation of displacements, evaluated on a 4x coarser grid then upsampled
    (the field is smooth; this keeps precompute in the tens of milliseconds)."""
    h, w = shape
    step = 4
    ch, cw = (h + step - 1) // step + 1, (w + step - 1) // step + 1
    grid_st = pix_st.reshape(h, w, 2)
    # coarse sample positions: every `step` pixels, clamped to the ROI
    yi = np.minimum(np.arange(ch) * step, h - 1)
    xi = np.minimum(np.arange(cw) * step, w - 1)
    coarse_pts = grid_st[yi][:, xi].reshape(-1, 2)
    rbf = RBFInterpolator(targets, values, kernel="thin_plate_spline", smoothing=1e-3, degree=1)
    coarse = rbf(coarse_pts).reshape(ch, cw, 2).astype(np.float32)
    # upsample: the coarse samples sit at multiples of `step`
    full = cv2.resize(coarse, ((cw - 1) * step + 1, (ch - 1) * step + 1), interpolation=cv2.INTER_LINEAR)
    return full[:h, :w].reshape(-1, 2).astype(np.float64)


def _face_to_pixels(field_st: np.ndarray, ex: np.ndarray, ey: np.ndarray) -> np.ndarray:
    return field_st[:, :1] * ex + field_st[:, 1:2] * ey


def _corner_field(st, origin, ex, ey, iod, hw_out, anchors, pix_st, shape, *, inward, vertical, lift):
    """Backward field that moves the mouth corners along the lip line (rounding or spreading)."""
    ctrl, disp = [], []

    def dx(s):
        return -inward * s  # corners (|s| = hw) move by inward * hw towards the centre

    for idx in range(48, 68):
        s = st[idx, 0]
        frac = min(1.0, abs(s) / hw_out)
        dy = 0.0
        if idx in (49, 50, 51, 52, 53):
            dy = -vertical * (1 - frac)
        elif idx in (55, 56, 57, 58, 59):
            dy = vertical * (1 - frac)
        if idx in (48, 54, 60, 64):
            dy -= lift
        ctrl.append(st[idx]); disp.append((dx(s), dy))
    for side in (-1, 1):
        c = st[54] if side > 0 else st[48]
        for k, f in ((0.2, 0.45), (0.45, 0.15)):
            p = c + np.array([side * k * iod, 0.0])
            ctrl.append(p); disp.append((dx(c[0]) * f, -lift * f))
        for dy_off in (-0.2, 0.25):
            p = c + np.array([side * 0.1 * iod, dy_off * iod])
            ctrl.append(p); disp.append((dx(c[0]) * 0.3, 0.0))
    ctrl = np.array(ctrl)
    disp = np.array(disp)
    anchor_st = _to_face(anchors, origin, ex, ey)
    jaw_st = st[3:14]
    targets = np.vstack([ctrl + disp, anchor_st, jaw_st])
    values = np.vstack([-disp, np.zeros((len(anchor_st) + len(jaw_st), 2))])
    field_st = _rbf_field(targets, values, pix_st, shape)
    return _face_to_pixels(field_st, ex, ey)


# ----------------------------------------------------------------------------- mouth interior
def _luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of RGB values (the weights of the encoder's own YUV conversion)."""
    return np.asarray(rgb, np.float64)[..., :3] @ np.array([0.299, 0.587, 0.114])


def high_frequency_energy(gray: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute difference between a luma image and its Gaussian blur (sigma 1 px).

    A cheap measure of fine detail (sharpness + grain): a soft or heavily compressed photo
    scores 1-2, a crisp one 4-8. ``mask`` (bool, same shape) restricts the mean to a region.
    """
    g = np.asarray(gray, np.float32)
    hf = np.abs(g - cv2.GaussianBlur(g, (0, 0), sigmaX=1.0))
    if mask is not None:
        hf = hf[mask]
    return float(hf.mean()) if hf.size else 0.0


def sharpness(gray: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Detail at 1 px relative to detail at 4 px: the mean absolute residual of a sigma-1
    Gaussian blur over that of a sigma-4 blur. Independent of contrast (high-contrast teeth
    against a dark mouth and low-contrast skin compare fairly); soft photos score ~0.1,
    crisp or grainy ones 0.2-0.4.
    """
    g = np.asarray(gray, np.float32)
    h1 = np.abs(g - cv2.GaussianBlur(g, (0, 0), sigmaX=1.0))
    h4 = np.abs(g - cv2.GaussianBlur(g, (0, 0), sigmaX=4.0))
    if mask is not None:
        h1, h4 = h1[mask], h4[mask]
    return float(h1.mean() / max(float(h4.mean()), 1e-6)) if h1.size else 0.0


def photo_stats(image: np.ndarray, lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Measurements of the portrait that synthesized teeth must match.

    Returns ``(eye_white_rgb, [eye_white_luma, face_hf, noise_sigma, face_sharpness])``: the mean colour of the
    brightest 15 % of the pixels inside both eye outlines (the sclera; landmarks 36-47), the
    high-frequency energy (``high_frequency_energy``) and ``sharpness`` of the skin around the
    mouth (cheeks and chin, lips excluded), and the noise sigma of that skin (1.4826 x the median absolute
    high-pass value, the robust MAD estimate).
    """
    h, w = image.shape[:2]
    lum = _luma(image).astype(np.float32)
    eyes = np.zeros((h, w), np.uint8)
    for a in (36, 42):
        cv2.fillPoly(eyes, [np.round(lm[a:a + 6]).astype(np.int32)], 1)
    inside = eyes.astype(bool)
    _, _, iod = _face_axes(lm)
    skin_lum = float(_luma(_skin_tone(image, lm)))
    if inside.sum() >= 6:
        vals = lum[inside]
        bright = vals >= np.percentile(vals, 85)
        white_rgb = image[inside][bright].astype(np.float64).mean(0)
    else:  # eyes too small to measure (a tiny face): a conservative guess from the skin
        white_rgb = np.full(3, min(255.0, skin_lum * 1.1))
    white_lum = float(_luma(white_rgb))
    # skin around the mouth: lower face outline minus the lips (dilated) and the nose
    face = np.zeros((h, w), np.uint8)
    cv2.fillPoly(face, [np.round(np.vstack([lm[3:14], lm[[35, 33, 31]]])).astype(np.int32)], 1)
    lips = np.zeros((h, w), np.uint8)
    cv2.fillPoly(lips, [np.round(lm[48:60]).astype(np.int32)], 1)
    k = max(3, int(0.08 * iod) | 1)
    lips = cv2.dilate(lips, np.ones((k, k), np.uint8))
    region = (face > 0) & (lips == 0)
    if region.sum() < 50:
        region = np.ones((h, w), bool)
    face_hf = high_frequency_energy(lum, region)
    hp = lum - cv2.GaussianBlur(lum, (0, 0), sigmaX=1.0)
    noise = float(1.4826 * np.median(np.abs(hp[region] - np.median(hp[region]))))
    return white_rgb, np.array([white_lum, face_hf, noise, sharpness(lum, region)], np.float64)


def _match_photo(layer: np.ndarray, photo: np.ndarray, seed: int, backdrop: np.ndarray) -> np.ndarray:
    """Soften and grain a synthesized RGBA teeth layer until its detail matches the photo.

    The layer is blurred (premultiplied, so edges do not darken) with the smallest sigma that
    brings the ``sharpness`` of the teeth, as painted over ``backdrop`` (the cavity), under
    ``TEETH_MAX_OF_FACE_SHARPNESS`` of the face's; then the photo's own noise level is added back
    (fixed seed: the same avatar always gets the same grain) as far as that limit allows.
    """
    _, _, noise, face_sharp = (float(v) for v in photo)
    limit = TEETH_MAX_OF_FACE_SHARPNESS * face_sharp
    rgb, a = layer[..., :3], layer[..., 3:4]
    opaque = layer[..., 3] > 0.6
    if not opaque.any():
        return layer
    # the teeth and a margin around them (their edges against the cavity count)
    teeth = cv2.dilate(opaque.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    out = layer

    def hf(lay: np.ndarray) -> float:
        shown = lay[..., :3] * lay[..., 3:4] + backdrop * (1.0 - lay[..., 3:4])
        return sharpness(_luma(shown), teeth)

    for sigma in (0.0, 0.5, 0.8, 1.1, 1.5, 2.0, 2.8, 4.0, 5.6):
        if sigma > 0:
            pre = cv2.GaussianBlur(np.concatenate([rgb * a, a], -1).astype(np.float32), (0, 0), sigmaX=sigma)
            pa = pre[..., 3:4]
            out = np.concatenate([pre[..., :3] / np.maximum(pa, 1e-4), pa], -1)
        if hf(out) <= 0.9 * limit:
            break
    _match_photo.last_sigma = sigma  # for inspection
    rng = np.random.default_rng(seed)
    grain = rng.standard_normal(out.shape[:2]).astype(np.float32)
    for amp in (noise, 0.6 * noise, 0.3 * noise, 0.0):
        trial = out.copy()
        trial[..., :3] += (amp * grain)[..., None]
        if hf(trial) <= limit:
            return trial
    return out


def _skin_tone(image: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Median RGB of the cheeks (between eye and mouth corner on each side)."""
    samples = []
    for a, b in ((41, 48), (46, 54)):
        c = (lm[a] * 0.5 + lm[b] * 0.5).astype(int)
        r = 4
        patch = image[max(0, c[1] - r):c[1] + r, max(0, c[0] - r):c[0] + r].reshape(-1, 3)
        if len(patch):
            samples.append(patch)
    if not samples:
        return np.array([180.0, 140.0, 120.0])
    return np.median(np.vstack(samples).astype(np.float64), axis=0)


# Tooth boundaries from the midline outwards, in iod: central incisors, laterals, canines,
# premolars. Real teeth narrow towards the back; evenly spaced "piano keys" read as fake.
_TOOTH_EDGES = np.array([0.0, 0.135, 0.235, 0.325, 0.40, 0.47])


def _teeth_layer(s, v, sn, iod, colour, length, brightness, seams=0.28, scale=1.0):
    """RGBA of one row of teeth. ``v`` runs 0 (root side, under the lip) to 1 (biting edge)."""
    a = np.abs(s) / (iod * scale)
    k = np.clip(np.searchsorted(_TOOTH_EDGES, a) - 1, 0, len(_TOOTH_EDGES) - 2)
    lo, hi = _TOOTH_EDGES[k], _TOOTH_EDGES[k + 1]
    u = (a - lo) / (hi - lo) * 2 - 1  # -1..1 across each tooth
    # each tooth is convex: brighter in its middle, a soft dark seam between neighbours
    shade = 1.0 - 0.10 * u ** 2 - seams * np.exp(-((1 - np.abs(u)) / 0.08) ** 2)
    # shadow under the lip at the root side, slightly translucent (greyer) biting edge
    shade = shade * (0.8 + 0.2 * _smoothstep(v * 2.5)) * (1 - 0.12 * _smoothstep((v - 0.75) * 4))
    # teeth further back sit in the shade of the cheeks
    shade = shade * (1.0 - 0.55 * np.clip(np.abs(sn), 0, 1) ** 2) * brightness
    # rounded biting edge per tooth; back teeth are shorter
    edge = length * (1.0 - 0.07 * u ** 2) * (1.0 - 0.25 * np.clip(a / _TOOTH_EDGES[-1], 0, 1) ** 2)
    alpha = _smoothstep(v * 8) * _smoothstep((edge - v) * 10) * _smoothstep((0.96 - np.abs(sn)) / 0.2)
    rgb = colour * shade[..., None]
    return np.concatenate([rgb, alpha[..., None]], axis=-1)


def _shows_teeth(image: np.ndarray, lm: np.ndarray, eye_white_luma: float) -> bool:
    """Whether the portrait's own teeth show between its lips (inner-lip outline 60-67).

    Teeth pixels are light and nearly grey: luma above 0.7 x the eye whites' and saturation
    ((max - min) / max of RGB) under 0.4. A parted mouth showing only dark cavity or lip
    does not count: its "teeth" would be a dark band.
    """
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(lm[60:68]).astype(np.int32)], 1)
    px = image[mask > 0].astype(np.float64)
    if len(px) < 8:
        return False
    sat = (px.max(1) - px.min(1)) / np.maximum(px.max(1), 1.0)
    toothy = (_luma(px) > 0.7 * eye_white_luma) & (sat < 0.4)
    return float(toothy.mean()) > 0.25


def _interior_textures(image, lm, st, origin, ex, ey, iod, s_dense, up_rest, lo_rest, hw_in, chin_drop):
    """Cavity and teeth images over a box that covers the widest possible opening.

    Layers, back to front: the cavity (static, dark), the jaw layer (tongue + lower teeth, moves
    with the jaw), the upper teeth (fixed to the skull). For a portrait whose mouth is open at
    rest the upper layer is the portrait's own teeth, so the person keeps their smile.
    """
    h_img, w_img = image.shape[:2]
    top_t = up_rest.min() - JAW_UPPER * iod - 2
    bot_t = lo_rest.max() + CHIN_GAIN * JAW_LOWER * iod * 1.3 + 2
    corners = np.array([[-hw_in * 1.1, top_t], [hw_in * 1.1, top_t], [-hw_in * 1.1, bot_t], [hw_in * 1.1, bot_t]])
    pts = _from_face(corners, origin, ex, ey)
    box = _even_box(pts[:, 0].min() - 2, pts[:, 1].min() - 2, pts[:, 0].max() + 2, pts[:, 1].max() + 2, w_img, h_img)
    bx0, by0, bx1, by1 = box
    gy, gx = np.mgrid[by0:by1, bx0:bx1].astype(np.float64)
    pst = _to_face(np.stack([gx, gy], -1), origin, ex, ey)
    s, t = pst[..., 0], pst[..., 1]
    sn = s / hw_in  # -1..1 across the opening

    skin = _skin_tone(image, lm)
    lum = float(skin @ np.array([0.299, 0.587, 0.114]))
    light = np.clip(lum / 170.0, 0.45, 1.25)
    up_at = np.interp(s, s_dense, up_rest)
    lo_at = np.interp(s, s_dense, lo_rest)

    # Cavity: almost black-red at the back and the sides, a little warmer in the middle.
    depth = np.clip((t - up_at) / (0.3 * iod), 0, 1)
    radial = np.clip(sn ** 2 + (depth - 0.55) ** 2 * 1.5, 0, 1)
    inner = np.array([48.0, 15.0, 18.0]) * light
    outer = np.array([16.0, 5.0, 6.0]) * light
    cav = inner + (outer - inner) * _smoothstep(radial)[..., None]
    cav = cav * (1.0 - 0.35 * _smoothstep(1.0 - depth * 4))[..., None]  # shadow under the top teeth

    # Teeth take the colour of the eye whites (the same light and white balance), a little
    # warmer, and at most TEETH_MAX_OF_EYE_WHITE of their luminance: teeth brighter than the
    # sclera are what makes a synthesized mouth read as dentures.
    white_rgb, photo = photo_stats(image, lm)
    teeth_colour = np.asarray(white_rgb, np.float64) * np.array([1.0, 0.97, 0.9])
    teeth_colour *= TEETH_MAX_OF_EYE_WHITE * photo[0] / max(float(_luma(teeth_colour)), 1e-3)

    # Jaw layer: tongue (a soft, lighter red mound) and the lower teeth, both riding the jaw.
    # the tongue's top is rounded: highest in the middle, falling towards the corners
    tongue_v = (t - (lo_at - (0.12 - 0.05 * sn ** 2) * iod)) / (0.07 * iod)
    tongue_a = 0.9 * _smoothstep(tongue_v) * _smoothstep((0.8 - np.abs(sn)) / 0.35)
    tongue_rgb = np.array([150.0, 68.0, 72.0]) * light * (0.55 + 0.45 * _smoothstep(tongue_v))[..., None]
    lower_v = (t - (lo_at - 0.05 * iod)) / (0.09 * iod)
    lower_teeth = _teeth_layer(s, 1.0 - lower_v, sn, iod, teeth_colour, 1.0, 0.85, seams=0.12, scale=0.7)
    la = lower_teeth[..., 3:4]
    jaw_rgb = tongue_rgb * (1 - la) + lower_teeth[..., :3] * la
    jaw_a = np.maximum(tongue_a, lower_teeth[..., 3])
    jaw_layer = _match_photo(np.concatenate([jaw_rgb, jaw_a[..., None]], axis=-1), photo, seed=1,
                             backdrop=cav)

    rest_gap = lo_rest - up_rest
    own = float(np.max(rest_gap)) > 0.035 * iod and _shows_teeth(image, lm, photo[0])
    if own:
        # The portrait's own teeth (and whatever shows between the lips at rest). When the upper
        # lip lifts above its rest line, the teeth continue upwards: sample the top rows again.
        gap_at = np.maximum(lo_at - up_at, 1e-3)
        t_src = np.maximum(t, up_at + np.minimum(0.15 * gap_at, 2.0))
        src = origin + s[..., None] * ex + t_src[..., None] * ey
        img = cv2.remap(image, src[..., 0].astype(np.float32), src[..., 1].astype(np.float32),
                        cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE).astype(np.float64)
        above = np.clip((up_at - t) / (JAW_UPPER * iod), 0, 1)
        img = img * (1.0 - 0.25 * above)[..., None]  # towards the gums, in the lip's shadow
        v = (t - up_at) / gap_at
        alpha = _smoothstep((1.0 - v) * 4) * _smoothstep((0.97 - np.abs(sn)) / 0.12)
        upper = np.concatenate([img, alpha[..., None]], axis=-1)
    else:
        upper_v = (t - (up_at - 0.03 * iod)) / (0.125 * iod)
        upper = _match_photo(_teeth_layer(s, upper_v, sn, iod, teeth_colour, 1.0, 1.0), photo, seed=2,
                             backdrop=cav)

    return {
        "ibox": np.asarray(box, np.int32),
        "cavity": cav.astype(np.float32),
        "upper_teeth": upper.astype(np.float32),
        "lower_teeth": jaw_layer.astype(np.float32),
        "photo": photo.astype(np.float64),
        "own_teeth": float(own),
    }


# ----------------------------------------------------------------------------- eyes and brows
def _eye_rig(image, lm, ex, ey, iod):
    h_img, w_img = image.shape[:2]
    brows = lm[17:27]
    eyes = lm[36:48]
    x0 = min(brows[:, 0].min(), eyes[:, 0].min()) - 0.12 * iod
    x1 = max(brows[:, 0].max(), eyes[:, 0].max()) + 0.12 * iod
    y0 = brows[:, 1].min() - 0.45 * iod
    y1 = eyes[:, 1].max() + 0.12 * iod
    roi = _even_box(x0, y0, x1, y1, w_img, h_img)
    rx0, ry0, rx1, ry1 = roi
    gy, gx = np.mgrid[ry0:ry1, rx0:rx1].astype(np.float32)
    grid = np.stack([gx, gy], -1)
    cols = np.arange(rx0, rx1, dtype=np.float64)

    lid_upper = np.full(len(cols), np.nan)
    lid_lower = np.full(len(cols), np.nan)
    lid_top = np.full(len(cols), np.nan)
    for a in (36, 42):  # each eye: corners a, a+3; upper lid a+1, a+2; lower lid a+5, a+4
        upper = lm[[a, a + 1, a + 2, a + 3]]
        lower = lm[[a, a + 5, a + 4, a + 3]]
        in_eye = (cols >= lm[a, 0]) & (cols <= lm[a + 3, 0])
        if in_eye.sum() < 2:
            continue
        uy = _curve(upper, cols[in_eye])
        ly = np.maximum(_curve(lower, cols[in_eye]), uy)
        lid_upper[in_eye] = uy
        lid_lower[in_eye] = ly
        # the upper lid skin between the lid and a bit below the brow is what slides down
        brow_y = np.interp(cols[in_eye], lm[17:22, 0] if a == 36 else lm[22:27, 0],
                           lm[17:22, 1] if a == 36 else lm[22:27, 1])
        lid_top[in_eye] = uy - np.maximum(0.6 * (uy - brow_y), 0.1 * iod)

    # brow raise: brows move up (against ey); the upper lid skin stretches, the forehead follows
    st_pix = grid.reshape(-1, 2).astype(np.float64)
    ctrl, disp = [], []
    for idx in range(17, 27):
        ctrl.append(lm[idx]); disp.append(-ey * BROW_LIFT * iod)
        ctrl.append(lm[idx] - ey * 0.2 * iod); disp.append(-ey * BROW_LIFT * iod * 0.8)
    anchors = np.vstack([lm[36:48], lm[27:31], _ring(roi, max(8.0, 0.15 * iod))])
    ctrl = np.array(ctrl)
    disp = np.array(disp)
    targets = np.vstack([ctrl + disp, anchors])
    values = np.vstack([-disp, np.zeros((len(anchors), 2))])
    field = _rbf_field(targets, values, st_pix, grid.shape[:2]).reshape(grid.shape).astype(np.float32)
    return {"eye_roi": np.asarray(roi, np.int32), "eye_grid": grid, "lid_upper": lid_upper,
            "lid_lower": lid_lower, "lid_top": lid_top, "brow_field": field}


def rig_for_avatar(avatar: Avatar, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The avatar image and landmarks scaled to the output size."""
    if avatar.size == size:
        return np.asarray(avatar.image), np.asarray(avatar.landmarks, np.float64)
    interp = cv2.INTER_AREA if size < avatar.size else cv2.INTER_CUBIC
    img = cv2.resize(np.asarray(avatar.image), (size, size), interpolation=interp)
    scale = size / avatar.size
    return img, (np.asarray(avatar.landmarks, np.float64) + 0.5) * scale - 0.5
