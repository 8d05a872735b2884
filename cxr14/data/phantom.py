"""The phantom radiograph: anatomy and 14 planted findings, drawn with numpy from distance fields.

Kept apart from the demo stage (which decides labels, splits and files) because it is the part a
reader tunes: each finding is its own localised, learnable pattern (DESIGN.md's table), some
deliberately alike, and geometry is in fractions of the image side so it scales with image_size.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np
from PIL import Image

from cxr14.data.nih import CLASSES


@functools.lru_cache(maxsize=4)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[None, :], c[:, None]


def soft(d: np.ndarray, edge: float) -> np.ndarray:
    """1 inside (d < 1), 0 outside, a ramp `edge` wide: anti-aliased shapes from distance fields."""
    return np.clip((1 - d) / edge + 0.5, 0, 1)


def dist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.sqrt(x * x + y * y)  # faster than np.hypot on broadcast float32


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    coarse = Image.fromarray(rng.standard_normal((cells, cells), dtype=np.float32))
    return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC))


def segment(c: SimpleNamespace, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((c.u - x0) * dx + (c.v - y0) * dy) / (dx * dx + dy * dy), 0, 1)
    return dist(c.u - x0 - t * dx, c.v - y0 - t * dy)


def lung_point(c: SimpleNamespace, g: np.random.Generator, side: int, qlo: float, qhi: float,
               r: float = 0.0) -> tuple[float, float]:
    """A point at least r inside one lung, off the heart; q runs from the lung's centre (0) to its base (0.8)."""
    lx, s, _, mask = c.lungs[side]
    for _ in range(200):
        x, y = lx + s * g.uniform(-0.6, 0.7) * c.la, c.ly + g.uniform(qlo, qhi) * c.lb
        around = [(x, y), (x - r, y), (x + r, y), (x, y - r), (x, y + r)]
        if all(0 < a < 1 and 0 < b < 1 and mask[int(b * c.size), int(a * c.size)] > 0.9 for a, b in around) \
                and c.heart[int(y * c.size), int(x * c.size)] < 0.3:
            return x, y
    return lx, c.ly


def band(c: SimpleNamespace, side: int, t: float, centre: float, span: float) -> tuple[np.ndarray, np.ndarray]:
    """A strip t lung radii deep along the chest wall (angle 0 lateral, -pi/2 apex), and its inner edge line."""
    lx, s, e, mask = c.lungs[side]
    toward = (s * (c.u - lx) / c.la * math.cos(centre) + (c.v - c.ly) / c.lb * math.sin(centre)) / (e + 1e-3)
    arc = mask * np.clip((toward - math.cos(span / 2)) * 8, 0, 1)
    return arc * np.clip((e - 1 + t) / 0.04 + 0.5, 0, 1), arc * np.exp(-0.5 * ((e - 1 + t) * c.la / 0.005) ** 2)


FOCAL = ("Nodule", "Mass", "Atelectasis", "Infiltration", "Pneumonia")  # drawn by plant_focal


def plant(k: int, c: SimpleNamespace, g: np.random.Generator) -> np.ndarray:
    """Draw finding k into c.img (geometry from g, which is fixed per patient and class); return its footprint."""
    name, side = CLASSES[k], int(g.integers(2))
    return plant_focal(name, c, g, side) if name in FOCAL else plant_regional(name, c, g, side)


def plant_focal(name: str, c: SimpleNamespace, g: np.random.Generator, side: int) -> np.ndarray:
    """An opacity at a point inside one lung (`FOCAL`)."""
    u, v = c.u, c.v
    s, lung = c.lungs[side][1], c.lungs[side][3]
    if name in ("Nodule", "Mass"):  # a small round opacity; a large, lobulated one
        r = g.uniform(0.018, 0.026) if name == "Nodule" else g.uniform(0.05, 0.07)
        x, y = lung_point(c, g, side, -0.7, 0.45, r)
        m = soft(dist(u - x, v - y) / r, 0.25)
        if name == "Mass":
            a = g.uniform(0, 2 * math.pi)  # a second, smaller lobe
            x, y = x + 0.55 * r * math.cos(a), y + 0.55 * r * math.sin(a)
            m = np.maximum(m, soft(dist(u - x, v - y) / (0.7 * r), 0.25))
        c.img += g.uniform(65, 80) * m
    elif name == "Atelectasis":  # plate-like: a thin tilted dense band
        x, y = lung_point(c, g, side, 0.1, 0.5)
        a, du, dv = g.uniform(-0.4, 0.4), u - x, v - y
        along, across = du * math.cos(a) + dv * math.sin(a), dv * math.cos(a) - du * math.sin(a)
        m = soft(dist(along / g.uniform(0.07, 0.1), across / g.uniform(0.01, 0.014)), 0.2) * lung
        c.img += g.uniform(60, 75) * m
    elif name == "Infiltration":  # patchy, ill-defined
        x, y = lung_point(c, g, side, -0.6, 0.5)
        m = np.zeros_like(c.img)
        for _ in range(int(g.integers(4, 7))):
            bx, by, sd = x + g.normal(0, 0.035), y + g.normal(0, 0.045), g.uniform(0.016, 0.028)
            m = np.maximum(m, np.exp(((u - bx) ** 2 + (v - by) ** 2) / (-2 * sd * sd)))
        m *= c.lung
        c.img += g.uniform(45, 55) * m
    elif name == "Pneumonia":  # dense patch with dark branching air bronchograms
        r = g.uniform(0.055, 0.08)
        x, y = lung_point(c, g, side, 0.2, 0.55, 0.5 * r)
        m = soft(dist((u - x) / r, (v - y) / (r * 1.2)), 0.3) * lung
        x0, y0, a = x - s * 0.5 * r, y - 0.7 * r, g.uniform(-0.3, 0.3)
        x1, y1 = x0 + s * 0.7 * r * math.cos(a + 0.9), y0 + 0.7 * r * math.sin(a + 0.9)
        ends = [(x1 + s * 0.8 * r * math.cos(a + b), y1 + 0.8 * r * math.sin(a + b)) for b in (0.3, 1.4)]
        d = np.minimum.reduce([segment(c, x0, y0, x1, y1)] + [segment(c, x1, y1, *p) for p in ends])
        c.img += g.uniform(60, 70) * m * (1 - 0.6 * soft(d / 0.007, 0.5))
    return m


def plant_regional(name: str, c: SimpleNamespace, g: np.random.Generator, side: int) -> np.ndarray:
    """A finding that follows a lung's outline, a lobe, both hila, the diaphragm, or the patient's build."""
    u, v = c.u, c.v
    lx, s, _, lung = c.lungs[side]
    if name == "Effusion":  # fills the costophrenic angle; the meniscus climbs the lateral wall
        top = c.ly + g.uniform(0.25, 0.5) * c.lb - g.uniform(0.06, 0.11) * np.clip(s * (u - lx) / c.la, 0, 1) ** 2
        m = lung * (1 - c.heart) * np.clip((v - top) * c.size / 2 + 0.5, 0, 1)
        c.img += (c.dark + 10) * m
    elif name == "Pneumothorax":  # the lung edge falls away: dark, no markings, a thin pleural line
        m, line = band(c, side, g.uniform(0.25, 0.4), g.uniform(-1.6, -0.3), g.uniform(0.9, 1.4))
        c.img += 50 * line - m * (c.tex + g.uniform(30, 40))
    elif name == "Pleural_Thickening":  # a bright strip along the lateral wall, or an apical cap
        centre = -math.pi / 2 if g.random() < 0.3 else g.uniform(-0.6, 0.6)
        wavy = g.uniform(0.25, 0.35) * (1 + 0.3 * np.cos(2 * math.pi * (u + v) / 0.06 + g.uniform(0, 6)))
        m = band(c, side, wavy, centre, g.uniform(0.9, 1.4))[0]
        c.img += g.uniform(80, 95) * m
    elif name == "Consolidation":  # a whole lobe, bounded by a straight fissure
        upper, slope = g.random() < 0.6, g.uniform(-0.3, 0.5)
        fissure = c.ly + (g.uniform(-0.3, 0.0) if upper else g.uniform(0.2, 0.4)) * c.lb + slope * s * (u - lx)
        m = lung * (1 - c.heart) * np.clip((fissure - v if upper else v - fissure) * c.size / 2 + 0.5, 0, 1)
        c.img += (c.dark + g.uniform(15, 25)) * m
    elif name == "Edema":  # bat-wing haze around both hila
        sx, sy = g.uniform(0.06, 0.08), g.uniform(0.1, 0.13)
        m = np.maximum.reduce([np.exp(-(((u - hx + hs * 0.5 * c.la) / sx) ** 2 + ((v - c.ly - 0.02) / sy) ** 2) / 2) * h
                               for hx, hs, _, h in c.lungs])
        c.img += g.uniform(45, 55) * m
    elif name == "Fibrosis":  # reticular net in the lower periphery
        p, a = g.uniform(0.045, 0.055), g.uniform(0, math.pi)
        net = np.maximum(np.cos(2 * math.pi / p * (u * math.cos(a) + v * math.sin(a))),
                         np.cos(2 * math.pi / p * (v * math.cos(a) - u * math.sin(a))))
        lower = np.clip((v - c.ly) * c.size / 4 + 0.5, 0, 1)
        m = (1 - c.heart) * np.maximum.reduce([h * lower * np.clip((d - 0.5) / 0.1 + 0.5, 0, 1)
                               for _, _, d, h in (c.lungs if g.random() < 0.6 else [c.lungs[side]])])
        c.img += g.uniform(45, 55) * m * (0.25 + 0.75 * np.clip(net * 3 - 2, 0, 1))
    elif name == "Hernia":  # a rounded retrocardiac opacity holding a gas bubble with an air-fluid level
        r = g.uniform(0.045, 0.065)
        x, y = c.cx + g.uniform(0.0, 0.05), c.base - 0.02 - 0.9 * r
        m = soft(dist(u - x, v - y) / r, 0.2)
        c.img += 40 * m - 95 * soft(dist(u - x, v - y + 0.1 * r) / (0.62 * r), 0.3) * (v < y + 0.1 * r)
    elif name == "Cardiomegaly":
        m = c.heart  # drawn wide by anatomy()
    else:  # Emphysema: dark, tall lungs with flat domes, drawn by anatomy()
        m = c.lung
    return m


def anatomy(size: int, seed: int, pid: int, followup: int, labels: np.ndarray) -> SimpleNamespace:
    """The patient's build, stable over follow-ups and jittered a little per film; Emphysema and
    Cardiomegaly change the build, so they are applied here."""
    p, j = np.random.default_rng([seed, 1, pid]), np.random.default_rng([seed, 2, pid, followup])
    emph, cardio = bool(labels[CLASSES.index("Emphysema")]), bool(labels[CLASSES.index("Cardiomegaly")])
    c = SimpleNamespace(size=size, emph=emph, cx=0.5 + p.normal(0, 0.012) + j.normal(0, 0.004),
                        ly=0.44 + p.normal(0, 0.012) + j.normal(0, 0.004) + 0.02 * emph, dx=p.uniform(0.165, 0.185),
                        la=p.uniform(0.13, 0.15), lb=p.uniform(0.27, 0.31) * (1.1 if emph else 1),
                        dark=p.uniform(75, 95) + 25 * emph, dome=p.uniform(0.045, 0.065) * (0.25 if emph else 1),
                        rib=p.uniform(0.065, 0.08), gain=p.uniform(0.85, 1.1) * j.uniform(0.97, 1.03))
    c.u, c.v = grid(size)
    c.base = c.ly + 0.8 * c.lb  # level of the costophrenic angles
    c.ctr = np.random.default_rng([seed, 3, pid, 1]).uniform(0.6, 0.7) if cardio else p.uniform(0.38, 0.46)
    return c


def bbox(hit: np.ndarray) -> tuple[float, float, float, float]:
    rows, cols = np.flatnonzero(hit.any(axis=1)), np.flatnonzero(hit.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)


def plant_boxed(k: int, c: SimpleNamespace, g: np.random.Generator) -> tuple[int, float, float, float, float]:
    """Plant finding k; its box encloses the pixels it changed by more than 6 grey levels (or, for a change of
    build, its footprint): tight, like a reader's box around what is visible."""
    before = c.img.copy()
    footprint = plant(k, c, g)
    changed = np.abs(c.img - before) > 6
    return (int(k), *bbox(changed if changed.any() else footprint > 0.3))


def render(size: int, seed: int, pid: int, followup: int, labels: np.ndarray) -> tuple[np.ndarray, list[tuple]]:
    """One film as uint8 pixels plus (class index, x, y, w, h) per planted finding. The RNGs are keyed by
    (seed, patient, follow-up), so a film does not depend on worker count or order."""
    c, rng = anatomy(size, seed, pid, followup, labels), np.random.default_rng([seed, 4, pid, followup])
    u, v, half = c.u, c.v, c.dx + c.la
    img = 14 + 125 * soft(dist((u - c.cx) / (half + 0.07), (v - 0.62) / 0.62), 0.08)  # torso
    img = img + 20 * soft(np.abs(u - c.cx) / 0.045, 0.8)  # spine and mediastinum
    c.lungs = []
    for s in (-1, 1):  # image left is the patient's right
        lx = c.cx + s * c.dx
        e = dist((u - lx) / c.la, (v - c.ly) / c.lb)
        dome = c.base + 0.015 * (s > 0) - c.dome * (1 - np.minimum(((u - lx + s * 0.3 * c.la) / c.la) ** 2, 1))
        c.lungs.append((lx, s, e, soft(e, 0.05) * np.clip((dome - v) * size / 2 + 0.5, 0, 1)))
    c.lung = np.maximum(c.lungs[0][3], c.lungs[1][3])
    hw = c.ctr * half
    hh = 0.5 * hw + 0.05
    c.heart = soft(dist((u - c.cx - 0.03) / hw, (v - c.base + 0.04 + 0.55 * hh) / hh), 0.06)
    c.heart *= np.clip((c.base - 0.01 - v) * size / 3 + 0.5, 0, 1)
    aerated = c.lung * (1 - c.heart)
    hila = sum(  # vessels fan out from the hila
        np.exp(-(((u - x + s * 0.5 * c.la) / 0.07) ** 2 + ((v - c.ly) / 0.1 - 0.3) ** 2))
        for x, s, *_ in c.lungs)
    c.tex = aerated * (5 * smooth_noise(rng, size, 24) + 18 * hila) * (0.35 if c.emph else 1)  # lung markings
    ribs = np.clip(np.cos(2 * math.pi / c.rib * (v + 1.6 * (u - c.cx) ** 2)) * 2.5 - 1.5, 0, 1)
    c.img = img + 8 * c.heart - c.dark * aerated + c.tex + 12 * ribs * c.lung
    boxes = [plant_boxed(k, c, np.random.default_rng([seed, 3, pid, k])) for k in np.flatnonzero(labels)]
    img = (c.img + 5 * smooth_noise(rng, size, 5) + 7 * rng.random((size, size), dtype=np.float32)) * c.gain
    return np.clip(img, 0, 255).astype(np.uint8), boxes
