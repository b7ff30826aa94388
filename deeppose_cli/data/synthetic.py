"""Offline, deterministic stand-in for the LSP Extended (LSPET) archive.

The demos and tests need a pose dataset that exists without a download. ``generate_dataset``
renders human-like figures (kinematic skeleton, thick limbs, head, torso) over cluttered
backgrounds and writes them in exactly the LSPET layout (``images/im00001.jpg`` and a
``joints.mat`` holding ``joints`` of shape 14 x 3 x N with flag 1 = visible), so the same
parser, indexer and training code run on it as on the real archive.

Conventions:

* joint order is the 14-joint LSP order (``JOINT_NAMES``); "right" is the person's right;
* coordinates are pixels, x right and y down, pixel centres at integer coordinates (OpenCV);
* most figures face the camera (the person's right side on the image's left); about one in
  ten faces away and is labelled accordingly;
* right-side limbs carry a light stripe along their axis and a darker shade, left-side limbs
  are plain, so left and right are distinguishable from the pixels even for figures seen from
  behind;
* every articulation is marked by a darker disc so joint positions are tied to visible
  structure;
* image ``i`` is drawn from ``numpy.random.default_rng([seed, i])``: it does not depend on how
  many images are generated, and the same seed gives byte-identical files.

cv2 and scipy are imported inside the functions that need them, so importing this module (and
starting the CLI) stays cheap.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

JOINT_NAMES: tuple[str, ...] = (
    "right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle",
    "right_wrist", "right_elbow", "right_shoulder", "left_shoulder", "left_elbow", "left_wrist",
    "neck", "head_top",
)
NUM_JOINTS = 14
JPEG_QUALITY = 90
IMAGE_TEMPLATE = "images/im{:05d}.jpg"

# Fractions of the figure's standing height (head top to sole).
_UPPER_ARM = 0.175
_LOWER_ARM = 0.150
_UPPER_LEG = 0.245
_LOWER_LEG = 0.245
_TORSO = 0.290            # hip line to shoulder line
_NECK_ABOVE_SHOULDERS = 0.030
_HEAD_ABOVE_NECK = 0.170  # neck joint to head top (neck segment plus head)
_HEAD_RADIUS = 0.062
_SHOULDER_HALF = 0.110
_HIP_HALF = 0.065

_PROB_OCCLUDED = 0.2
_PROB_BACK_FACING = 0.1
_PROB_CUT_OFF = 0.03

_SUBPIXEL_BITS = 4
_SUBPIXEL = float(1 << _SUBPIXEL_BITS)

# A fixed MAT-file header text: scipy stamps the creation time into it, which would make two
# generations with the same seed differ byte for byte.
_MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: deeppose_cli.synthetic"

_SKIN_TONES = (
    (189, 224, 255), (160, 200, 240), (120, 170, 225), (90, 135, 190), (60, 95, 140),
    (45, 70, 105),
)
_HAIR_COLOURS = ((20, 20, 25), (30, 50, 80), (40, 80, 130), (90, 140, 190), (60, 60, 60))


def generate_dataset(target_dir: Path, num_images: int = 600, seed: int = 0,
                     image_size: int = 160) -> None:
    """Write ``num_images`` rendered figures into ``target_dir`` in the LSPET layout.

    Same arguments, same bytes: image ``i`` depends only on ``(seed, i, image_size)``.
    """
    import cv2
    from scipy.io import savemat

    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    target_dir = Path(target_dir)
    image_dir = target_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)

    joints = np.zeros((NUM_JOINTS, 3, num_images), dtype=np.float64)
    params = [int(cv2.IMWRITE_JPEG_QUALITY), JPEG_QUALITY]
    for i in range(num_images):
        image, sample_joints = render_sample(seed, i, image_size)
        ok, encoded = cv2.imencode(".jpg", image, params)
        if not ok:
            raise RuntimeError(f"could not encode image {i + 1} as JPEG")
        (target_dir / IMAGE_TEMPLATE.format(i + 1)).write_bytes(encoded.tobytes())
        joints[:, :, i] = sample_joints

    buffer = io.BytesIO()
    savemat(buffer, {"joints": joints}, format="5", do_compression=False)
    data = bytearray(buffer.getvalue())
    data[:116] = _MAT_HEADER.ljust(116, b" ")
    (target_dir / "joints.mat").write_bytes(bytes(data))
    (target_dir / "README.txt").write_text(_readme(num_images, seed, image_size))


def render_sample(seed: int, index: int, image_size: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """Render image ``index`` (0-based) of the dataset for ``seed``.

    Returns the BGR uint8 image and its joints as a (14, 3) float64 array of x, y, visible.
    Exposed so tests and callers can inspect one sample without writing files.
    """
    import cv2

    rng = np.random.default_rng([seed, index])
    width = int(round(image_size * rng.uniform(0.92, 1.08)))
    height = int(round(image_size * rng.uniform(0.92, 1.08)))

    canvas = _background(cv2, rng, height, width)
    back_facing = bool(rng.random() < _PROB_BACK_FACING)
    body = _sample_body(rng, back_facing)
    _place(rng, body, width, height, image_size)
    _draw_figure(cv2, canvas, rng, body)
    xy = body["joints"]

    visible = np.ones(NUM_JOINTS, dtype=bool)
    if rng.random() < _PROB_OCCLUDED:
        visible &= ~_occlude(cv2, canvas, rng, xy, body["height"])
    _foreground_clutter(cv2, canvas, rng)

    inside = ((xy[:, 0] >= 0) & (xy[:, 0] <= width - 1)
              & (xy[:, 1] >= 0) & (xy[:, 1] <= height - 1))
    visible &= inside
    out = np.zeros((NUM_JOINTS, 3), dtype=np.float64)
    out[:, :2] = xy
    out[:, 2] = visible.astype(np.float64)
    return canvas, out


# --- skeleton --------------------------------------------------------------------------------

def _direction(angle_deg: float, side: float) -> np.ndarray:
    """Unit vector for a limb ``angle_deg`` away from straight down, towards ``side`` (-1/+1)."""
    a = math.radians(angle_deg)
    return np.array([side * math.sin(a), math.cos(a)])


def _rotate(points: np.ndarray, centre: np.ndarray, angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    rot = np.array([[c, -s], [s, c]])
    return (points - centre) @ rot.T + centre


def _arm_angles(rng: np.random.Generator) -> tuple[float, float]:
    """Upper-arm abduction and forearm angle (degrees from hanging down, outward positive)."""
    u = rng.random()
    if u < 0.45:
        upper = rng.uniform(-15.0, 55.0)       # lowered
    elif u < 0.75:
        upper = rng.uniform(55.0, 120.0)       # out to the side
    else:
        upper = rng.uniform(120.0, 175.0)      # raised
    v = rng.random()
    if v < 0.4:
        bend = rng.normal(0.0, 15.0)           # nearly straight
    elif v < 0.75:
        bend = rng.uniform(-140.0, -20.0)      # forearm folds towards the midline
    else:
        bend = rng.uniform(20.0, 110.0)        # forearm swings outward
    return upper, upper + bend


def _leg_angles(rng: np.random.Generator) -> tuple[float, float]:
    """Thigh abduction and shin angle (degrees from straight down, outward positive)."""
    if rng.random() < 0.85:
        upper = rng.uniform(-12.0, 32.0)
    else:
        upper = rng.uniform(32.0, 80.0)        # kicks, splits, wide stances
    v = rng.random()
    if v < 0.55:
        bend = rng.normal(0.0, 8.0)
    elif v < 0.9:
        bend = -rng.uniform(10.0, 70.0)        # bent knee seen from the front: shin comes in
    else:
        bend = rng.uniform(10.0, 45.0)
    return upper, upper + bend


def _sample_body(rng: np.random.Generator, back_facing: bool) -> dict[str, Any]:
    """Joint positions of a unit-height figure, pelvis at the origin, plus drawing widths."""
    j = np.zeros((NUM_JOINTS, 2))
    width_scale = rng.uniform(0.85, 1.15)
    turn = rng.uniform(0.65, 1.0)               # out-of-plane turn narrows the torso
    shoulder_half = _SHOULDER_HALF * width_scale * turn
    hip_half = _HIP_HALF * width_scale * turn

    # Legs. side -1 is the image-left side of a figure facing the camera: the person's right.
    for side, (hip, knee, ankle) in ((-1.0, (2, 1, 0)), (1.0, (3, 4, 5))):
        j[hip] = (side * hip_half, 0.0)
        upper, lower = _leg_angles(rng)
        shorten = rng.uniform(0.7, 1.0) if rng.random() < 0.3 else 1.0
        j[knee] = j[hip] + _UPPER_LEG * shorten * _direction(upper, side)
        shorten = rng.uniform(0.7, 1.0) if rng.random() < 0.3 else 1.0
        j[ankle] = j[knee] + _LOWER_LEG * shorten * _direction(lower, side)

    # Upper body, leaning about the pelvis.
    torso_len = _TORSO * rng.uniform(0.88, 1.05)
    shrug = rng.normal(0.0, 0.01, size=2)
    j[8] = (-shoulder_half, -torso_len + shrug[0])
    j[9] = (shoulder_half, -torso_len + shrug[1])
    j[12] = (0.0, -torso_len - _NECK_ABOVE_SHOULDERS)
    for side, (shoulder, elbow, wrist) in ((-1.0, (8, 7, 6)), (1.0, (9, 10, 11))):
        upper, lower = _arm_angles(rng)
        shorten = rng.uniform(0.65, 1.0) if rng.random() < 0.3 else 1.0
        j[elbow] = j[shoulder] + _UPPER_ARM * shorten * _direction(upper, side)
        shorten = rng.uniform(0.65, 1.0) if rng.random() < 0.3 else 1.0
        j[wrist] = j[elbow] + _LOWER_ARM * shorten * _direction(lower, side)
    head_tilt = float(np.clip(rng.normal(0.0, 10.0), -25.0, 25.0))
    j[13] = j[12] + _HEAD_ABOVE_NECK * np.array(
        [math.sin(math.radians(head_tilt)), -math.cos(math.radians(head_tilt))])
    lean = float(np.clip(rng.normal(0.0, 8.0), -22.0, 22.0))
    upper_body = [6, 7, 8, 9, 10, 11, 12, 13]
    j[upper_body] = _rotate(j[upper_body], np.zeros(2), lean)

    if back_facing:
        # Seen from behind the person's right side is on the image's right.
        j[:, 0] = -j[:, 0]

    roll = float(np.clip(rng.normal(0.0, 7.0), -18.0, 18.0))
    j = _rotate(j, np.zeros(2), roll)
    return {
        "joints": j,
        "back_facing": back_facing,
        "width_scale": width_scale,
        "turn": turn,
        "height": 1.0,
    }


def _place(rng: np.random.Generator, body: dict[str, Any], width: int, height: int,
           image_size: int) -> None:
    """Scale the unit figure to 45%-90% of the image and position it, usually fully inside."""
    j = body["joints"]
    figure_px = rng.uniform(0.45, 0.90) * image_size
    # Extent of what is drawn around the joints (head, hands, feet, limb thickness).
    pad = 0.08
    lo = j.min(axis=0) - pad
    hi = j.max(axis=0) + pad
    span = hi - lo
    margin = 2.0
    fit = min((width - 2 * margin) / (span[0] * figure_px),
              (height - 2 * margin) / (span[1] * figure_px), 1.0)
    figure_px *= fit
    lo_px, hi_px = lo * figure_px, hi * figure_px
    if rng.random() < _PROB_CUT_OFF:
        # Rarely let the figure run off one edge, as in real photographs.
        tx = rng.uniform(-lo_px[0] - 0.2 * figure_px, width - hi_px[0] + 0.2 * figure_px)
        ty = rng.uniform(-lo_px[1], height - hi_px[1] + 0.25 * figure_px)
    else:
        tx = rng.uniform(margin - lo_px[0], max(margin - lo_px[0], width - margin - hi_px[0]))
        ty = rng.uniform(margin - lo_px[1], max(margin - lo_px[1], height - margin - hi_px[1]))
    body["joints"] = j * figure_px + np.array([tx, ty])
    body["height"] = figure_px


# --- drawing ---------------------------------------------------------------------------------

def _fx(points: np.ndarray) -> np.ndarray:
    """Fixed-point coordinates for cv2's ``shift`` argument (sub-pixel accurate drawing)."""
    return np.round(np.asarray(points, dtype=np.float64) * _SUBPIXEL).astype(np.int32)


def _colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    c = rng.integers(low, high, size=3)
    return int(c[0]), int(c[1]), int(c[2])


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(round(c * factor), 0, 255)) for c in colour)  # type: ignore[return-value]


def _circle(cv2: Any, img: np.ndarray, centre: np.ndarray, radius: float,
            colour: tuple[int, int, int]) -> None:
    c = _fx(centre)
    cv2.circle(img, (int(c[0]), int(c[1])), int(round(max(radius, 0.5) * _SUBPIXEL)), colour,
               -1, cv2.LINE_AA, _SUBPIXEL_BITS)


def _capsule(cv2: Any, img: np.ndarray, a: np.ndarray, b: np.ndarray, ra: float, rb: float,
             colour: tuple[int, int, int]) -> None:
    """A tapered limb: discs of radius ``ra``/``rb`` at the ends joined by their tangents."""
    d = b - a
    length = float(np.hypot(d[0], d[1]))
    _circle(cv2, img, a, ra, colour)
    _circle(cv2, img, b, rb, colour)
    if length < 1e-6:
        return
    n = np.array([-d[1], d[0]]) / length
    quad = np.array([a + n * ra, b + n * rb, b - n * rb, a - n * ra])
    cv2.fillConvexPoly(img, _fx(quad), colour, cv2.LINE_AA, _SUBPIXEL_BITS)


def _line(cv2: Any, img: np.ndarray, a: np.ndarray, b: np.ndarray, colour: tuple[int, int, int],
          thickness: int) -> None:
    pa, pb = _fx(a), _fx(b)
    cv2.line(img, (int(pa[0]), int(pa[1])), (int(pb[0]), int(pb[1])), colour, thickness,
             cv2.LINE_AA, _SUBPIXEL_BITS)


def _background(cv2: Any, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Gradient plus blotchy and fine noise, then random shapes: the clutter of real photos."""
    c0 = np.array(_colour(rng, 20, 236), dtype=np.float32)
    c1 = np.array(_colour(rng, 20, 236), dtype=np.float32)
    angle = rng.uniform(0.0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (xx * math.cos(angle) + yy * math.sin(angle))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    img = c0 + (c1 - c0) * t[..., None]
    coarse = rng.normal(0.0, rng.uniform(8.0, 30.0), size=(6, 6, 3)).astype(np.float32)
    img += cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0.0, rng.uniform(2.0, 8.0), size=(height, width, 3)).astype(np.float32)
    canvas = np.clip(img, 0, 255).astype(np.uint8)

    size = max(height, width)
    for _ in range(int(rng.integers(4, 13))):
        colour = _colour(rng)
        kind = rng.integers(0, 5)
        p = rng.uniform(-0.1, 1.1, size=2) * (width, height)
        if kind == 0:    # filled or outlined rectangle
            q = p + rng.uniform(-0.5, 0.5, size=2) * size
            thick = -1 if rng.random() < 0.6 else int(rng.integers(1, 4))
            cv2.rectangle(canvas, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), colour, thick)
        elif kind == 1:  # circle
            r = int(rng.uniform(0.03, 0.25) * size)
            thick = -1 if rng.random() < 0.6 else int(rng.integers(1, 4))
            cv2.circle(canvas, (int(p[0]), int(p[1])), r, colour, thick, cv2.LINE_AA)
        elif kind == 2:  # straight line
            q = rng.uniform(-0.1, 1.1, size=2) * (width, height)
            _line(cv2, canvas, p, q, colour, int(rng.integers(1, 5)))
        elif kind == 3:  # ellipse
            axes = (int(rng.uniform(0.03, 0.3) * size), int(rng.uniform(0.02, 0.15) * size))
            cv2.ellipse(canvas, (int(p[0]), int(p[1])), axes, float(rng.uniform(0, 180)), 0, 360,
                        colour, -1, cv2.LINE_AA)
        else:            # polyline, like a fence or a branch
            pts = p + np.cumsum(rng.uniform(-0.2, 0.2, size=(int(rng.integers(3, 6)), 2)) * size,
                                axis=0)
            cv2.polylines(canvas, [_fx(pts)], False, colour, int(rng.integers(1, 4)), cv2.LINE_AA,
                          _SUBPIXEL_BITS)
    return canvas


def _draw_figure(cv2: Any, img: np.ndarray, rng: np.random.Generator,
                 body: dict[str, Any]) -> None:
    """Draw legs, torso, arms and head with outlines, side cues and joint discs."""
    j = body["joints"]
    h = body["height"]
    w = body["width_scale"]
    outline_px = max(1.0, 0.012 * h)

    skin = _SKIN_TONES[int(rng.integers(len(_SKIN_TONES)))]
    skin = _shade(skin, rng.uniform(0.9, 1.1))
    hair = _HAIR_COLOURS[int(rng.integers(len(_HAIR_COLOURS)))]
    shirt = _colour(rng, 30, 230)
    pants = _colour(rng, 20, 200)
    shoes = _colour(rng, 0, 120)
    outline = (15, 15, 15)
    stripe = (235, 245, 250)
    short_sleeves = rng.random() < 0.5
    shorts = rng.random() < 0.3
    right_factor = 0.72   # the person's right side is a darker shade of the same clothes

    # Radii as fractions of the figure height: (at the proximal joint, at the distal joint).
    r_thigh = (0.050 * w, 0.037 * w)
    r_shin = (0.034 * w, 0.026 * w)
    r_upper_arm = (0.032 * w, 0.026 * w)
    r_forearm = (0.024 * w, 0.019 * w)

    def limb(a: int, b: int, radii: tuple[float, float], colour: tuple[int, int, int],
             right: bool) -> None:
        ra, rb = radii[0] * h, radii[1] * h
        base = _shade(colour, right_factor) if right else colour
        _capsule(cv2, img, j[a], j[b], ra + outline_px, rb + outline_px, outline)
        _capsule(cv2, img, j[a], j[b], ra, rb, base)
        if right:
            _line(cv2, img, j[a], j[b], stripe, max(1, int(round(0.28 * min(ra, rb)))))

    def joint_disc(k: int, radius: float, colour: tuple[int, int, int], right: bool) -> None:
        base = _shade(colour, right_factor) if right else colour
        _circle(cv2, img, j[k], radius * h, _shade(base, 0.45))

    def foot(ankle: int, knee: int) -> None:
        d = j[ankle] - j[knee]
        n = float(np.hypot(*d)) or 1.0
        d = d / n
        toward = 1.0 if j[ankle][0] >= j[knee][0] else -1.0
        tip = j[ankle] + (0.6 * d + 0.8 * np.array([toward, 0.0])) * 0.055 * h
        _capsule(cv2, img, j[ankle], tip, 0.022 * h + outline_px, 0.018 * h + outline_px, outline)
        _capsule(cv2, img, j[ankle], tip, 0.022 * h, 0.018 * h, shoes)

    def hand(wrist: int, elbow: int) -> None:
        d = j[wrist] - j[elbow]
        n = float(np.hypot(*d)) or 1.0
        tip = j[wrist] + d / n * 0.045 * h
        _capsule(cv2, img, j[wrist], tip, 0.017 * h + outline_px, 0.020 * h + outline_px, outline)
        _capsule(cv2, img, j[wrist], tip, 0.017 * h, 0.020 * h, skin)

    # Legs (behind the torso).
    for right, (hip, knee, ankle) in ((True, (2, 1, 0)), (False, (3, 4, 5))):
        foot(ankle, knee)
        limb(hip, knee, r_thigh, pants, right)
        limb(knee, ankle, r_shin, skin if shorts else pants, right)
        joint_disc(ankle, 0.018, skin if shorts else pants, right)
        joint_disc(knee, 0.020, skin if shorts else pants, right)

    # Torso: a quadrilateral from the shoulders to slightly outside the hips.
    sh_r, sh_l, hip_r, hip_l = j[8], j[9], j[2], j[3]
    hip_mid = 0.5 * (hip_r + hip_l)
    hip_out_r = hip_mid + 1.45 * (hip_r - hip_mid)
    hip_out_l = hip_mid + 1.45 * (hip_l - hip_mid)
    torso = np.array([sh_r, sh_l, hip_out_l, hip_out_r])
    # Widen the shoulders a touch so the arms attach inside the outline.
    sh_mid = 0.5 * (sh_r + sh_l)
    torso[0] = sh_mid + 1.12 * (sh_r - sh_mid)
    torso[1] = sh_mid + 1.12 * (sh_l - sh_mid)
    cv2.fillPoly(img, [_fx(torso)], shirt, cv2.LINE_AA, _SUBPIXEL_BITS)
    # Belt line and shorts/trousers top across the hips.
    belt = np.array([hip_out_r, hip_out_l,
                     hip_out_l + 0.18 * (sh_l - hip_out_l), hip_out_r + 0.18 * (sh_r - hip_out_r)])
    cv2.fillPoly(img, [_fx(belt)], pants, cv2.LINE_AA, _SUBPIXEL_BITS)
    cv2.polylines(img, [_fx(torso)], True, outline, max(1, int(round(outline_px))), cv2.LINE_AA,
                  _SUBPIXEL_BITS)
    joint_disc(2, 0.020, pants, True)
    joint_disc(3, 0.020, pants, False)

    # Neck and head.
    head_dir = j[13] - j[12]
    head_len = float(np.hypot(*head_dir)) or 1.0
    head_dir = head_dir / head_len
    head_r = _HEAD_RADIUS / _HEAD_ABOVE_NECK * head_len
    head_c = j[13] - head_dir * head_r
    _capsule(cv2, img, j[12], head_c, 0.022 * h + outline_px, 0.022 * h + outline_px, outline)
    _capsule(cv2, img, j[12], head_c, 0.022 * h, 0.022 * h, skin)
    _circle(cv2, img, head_c, head_r + outline_px, outline)
    _circle(cv2, img, head_c, head_r, hair if body["back_facing"] else skin)
    perp = np.array([-head_dir[1], head_dir[0]])
    if not body["back_facing"]:
        # Hair cap at the top, two eyes and a mouth: a face says "facing the camera"; the back
        # of the head is all hair.
        cap = head_c + head_dir * head_r * 0.3
        cv2.ellipse(img, tuple(int(v) for v in _fx(cap)),
                    (int(head_r * 0.95 * _SUBPIXEL), int(head_r * 0.7 * _SUBPIXEL)),
                    math.degrees(math.atan2(perp[1], perp[0])), 180, 360, hair, -1, cv2.LINE_AA,
                    _SUBPIXEL_BITS)
        for s in (-1.0, 1.0):
            eye = head_c + perp * s * head_r * 0.38 + head_dir * head_r * 0.1
            _circle(cv2, img, eye, max(0.7, head_r * 0.14), (30, 30, 30))
        mouth = head_c - head_dir * head_r * 0.45
        _line(cv2, img, mouth - perp * head_r * 0.25, mouth + perp * head_r * 0.25,
              (60, 60, 150), 1)
    _circle(cv2, img, j[13], max(1.0, 0.012 * h), _shade(hair, 0.6))
    _circle(cv2, img, j[12], 0.016 * h, _shade(shirt, 0.45))

    # Arms on top of the torso.
    lower_colour = skin if short_sleeves else shirt
    for right, (shoulder, elbow, wrist) in ((True, (8, 7, 6)), (False, (9, 10, 11))):
        hand(wrist, elbow)
        limb(shoulder, elbow, r_upper_arm, shirt, right)
        limb(elbow, wrist, r_forearm, lower_colour, right)
        joint_disc(shoulder, 0.020, shirt, right)
        joint_disc(elbow, 0.017, lower_colour, right)
        joint_disc(wrist, 0.014, skin, right)


def _occlude(cv2: Any, img: np.ndarray, rng: np.random.Generator, xy: np.ndarray,
             figure_px: float) -> np.ndarray:
    """Draw a patch over 1-3 neighbouring joints; return which joints ended up under it."""
    first = int(rng.integers(NUM_JOINTS))
    count = int(rng.integers(1, 4))
    order = np.argsort(np.hypot(*(xy - xy[first]).T), kind="stable")
    chosen = xy[order[:count]]
    pad = rng.uniform(0.05, 0.09) * figure_px
    lo = chosen.min(axis=0) - pad * rng.uniform(0.7, 1.3, size=2)
    hi = chosen.max(axis=0) + pad * rng.uniform(0.7, 1.3, size=2)

    mask = np.zeros(img.shape[:2], dtype=np.uint8)
    if rng.random() < 0.6:
        cv2.rectangle(mask, (int(math.floor(lo[0])), int(math.floor(lo[1]))),
                      (int(math.ceil(hi[0])), int(math.ceil(hi[1]))), 255, -1)
    else:
        c = 0.5 * (lo + hi)
        axes = 0.5 * (hi - lo) * 1.3
        cv2.ellipse(mask, (int(round(c[0])), int(round(c[1]))),
                    (int(math.ceil(axes[0])), int(math.ceil(axes[1]))), 0.0, 0, 360, 255, -1)
    # Textured fill: a base colour with stripes, like a ball, a sign or another player.
    patch = np.empty_like(img)
    patch[:] = _colour(rng)
    stripe_colour = _colour(rng)
    step = int(rng.integers(3, 8))
    if rng.random() < 0.5:
        patch[::step] = stripe_colour
    else:
        patch[:, ::step] = stripe_colour
    img[mask > 0] = patch[mask > 0]

    xi = np.clip(np.round(xy[:, 0]).astype(int), 0, img.shape[1] - 1)
    yi = np.clip(np.round(xy[:, 1]).astype(int), 0, img.shape[0] - 1)
    return mask[yi, xi] > 0


def _foreground_clutter(cv2: Any, img: np.ndarray, rng: np.random.Generator) -> None:
    """A few thin lines over everything (wires, poles): clutter is not always behind people."""
    height, width = img.shape[:2]
    if rng.random() < 0.35:
        for _ in range(int(rng.integers(1, 3))):
            p = rng.uniform(0, 1, size=2) * (width, height)
            q = rng.uniform(0, 1, size=2) * (width, height)
            _line(cv2, img, p, q, _colour(rng), 1)


def _readme(num_images: int, seed: int, image_size: int) -> str:
    joint_list = "\n".join(f"  {k:2d} {name}" for k, name in enumerate(JOINT_NAMES))
    return f"""Synthetic DeepPose figures
==========================

Rendered human-like figures over cluttered backgrounds, written in the layout of the
Leeds Sports Pose Extended (LSPET) archive so the same reader handles both. It is generated
offline and deterministically by deeppose_cli.synthetic.generate_dataset; it is not a
photograph dataset and says nothing about real-world accuracy.

Parameters: num_images={num_images} seed={seed} image_size={image_size}
Images are about image_size pixels on a side (each dimension varies by up to 8%).

Files
  images/im00001.jpg ... images/im{num_images:05d}.jpg   JPEG, quality {JPEG_QUALITY}
  joints.mat   variable `joints`, float64, shape 14 x 3 x {num_images}: x, y, visible
               (1 = visible, 0 = occluded or outside the image). Coordinates are pixels,
               x right, y down, pixel centres at integer coordinates. Invisible joints keep
               their true coordinates.

Joint order (LSP; "right" is the person's right):
{joint_list}

Figures mostly face the camera (the person's right on the image's left); about one in ten
faces away (no face drawn, hair over the whole head) and is labelled from the person's point
of view. Right-side limbs are a darker shade of the clothing and carry a light stripe along
their axis. About {int(_PROB_OCCLUDED * 100)}% of images have an occluding patch over 1-3
joints; those joints are flagged 0.
"""
