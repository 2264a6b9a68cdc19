"""Phantom rendering: soft-edged solids painted into T1 / T2 / STIR on the acquisition grid, then
acquisition effects (coil shading, blur, noise)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from pipeline.phantom.anatomy import _Anatomy, _Body, _Disc
from pipeline.phantom.scenarios import _INFECTED_DISC, _SEQ_INDEX, FINDING_FACTORS, TISSUES


class _Canvas:
    """Three images (T1, T2, STIR) on a grid given by 1-D model coordinates per axis, plus labels."""

    def __init__(self, s: np.ndarray, a: np.ndarray, x: np.ndarray):
        self.s, self.a, self.x = (np.asarray(c, dtype=np.float32) for c in (s, a, x))
        shape = (len(s), len(a), len(x))
        self.img = np.zeros((3,) + shape, dtype=np.float32)
        self.labels = np.zeros(shape, dtype=np.int16)
        self.step = float(min(abs(s[1] - s[0]) if len(s) > 1 else 1, abs(a[1] - a[0]) if len(a) > 1 else 1))

    def block(self, s_rng: tuple[float, float], a_rng: tuple[float, float], x_rng: tuple[float, float]):
        """Index slices of the sub-grid inside the given model-mm ranges (None when empty) + broadcast coords."""
        out = []
        for coords, (lo, hi) in zip((self.s, self.a, self.x), (s_rng, a_rng, x_rng), strict=True):
            idx = np.nonzero((coords >= lo) & (coords <= hi))[0]
            if idx.size == 0:
                return None
            out.append(slice(int(idx[0]), int(idx[-1]) + 1))
        sl = tuple(out)
        S = self.s[sl[0]][:, None, None]
        A = self.a[sl[1]][None, :, None]
        X = self.x[sl[2]][None, None, :]
        return sl, S, A, X

    def full(self):
        return self.block((-1e9, 1e9), (-1e9, 1e9), (-1e9, 1e9))

    def paint(self, sl, occ: np.ndarray, values, texture: np.ndarray | None = None) -> None:
        """Blend tissue ``values`` (3 numbers, or 3 arrays) into the block with occupancy ``occ``."""
        occ = np.asarray(occ, dtype=np.float32)
        for q in range(3):
            v = values[q]
            if texture is not None:
                v = v * texture
            region = self.img[q][sl]
            region += occ * (np.float32(v) - region) if np.isscalar(v) else occ * (v - region)


def _occ(sd: np.ndarray, soft: float = 1.0) -> np.ndarray:
    """Signed distance (mm, + inside) -> partial-volume occupancy 0..1 over ~``soft`` mm."""
    return np.clip(0.5 + sd / soft, 0.0, 1.0).astype(np.float32)


def _rounded_box_sd(d1: np.ndarray, d2: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (+ inside) of a box given the distances to its two pairs of sides, corners rounded by r."""
    e1 = r - d1
    e2 = r - d2
    outside = np.sqrt(np.maximum(e1, 0) ** 2 + np.maximum(e2, 0) ** 2)
    inside = np.minimum(np.maximum(e1, e2), 0)
    return r - outside - inside


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], corr_vox: float) -> np.ndarray:
    """Smooth random field, zero mean / unit std, correlation length ~corr_vox voxels (cheap: coarse grid + zoom)."""
    factor = max(1, int(corr_vox // 2))
    coarse = tuple(max(2, int(math.ceil(n / factor)) + 2) for n in shape)
    f = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), sigma=max(corr_vox / factor / 2, 0.7))
    zoom = [(n + 2 * factor) / c for n, c in zip(shape, coarse, strict=True)]
    big = ndimage.zoom(f, zoom, order=1)[tuple(slice(factor, factor + n) for n in shape)]
    big = big[tuple(slice(0, n) for n in shape)]
    if big.shape != shape:  # guard against rounding in zoom
        big = np.pad(big, [(0, n - m) for n, m in zip(shape, big.shape, strict=True)], mode="edge")
    big -= big.mean()
    return (big / (big.std() + 1e-6)).astype(np.float32)


def _body_local(b: _Body, S, A):
    ct, st = math.cos(b.theta), math.sin(b.theta)
    dS = S - b.cs
    dA = A - b.ca
    return dS * ct + dA * st, -dS * st + dA * ct


def _body_surfaces(b: _Body, u, v, X):
    """Endplate positions u_top(v), u_bot(v) and AP limits v_ant, v_post for a body in its local frame."""
    half_d = b.depth / 2
    cup = b.concavity * np.clip(1 - (v / half_d) ** 2, 0, 1)
    u_top = -b.height / 2 + cup
    if b.wedge > 0:  # anterior collapse of the superior endplate, linear to zero at the posterior wall
        u_top = u_top + b.wedge * b.height * np.clip((half_d - v) / b.depth, 0, 1)
    u_bot = b.height / 2 - cup
    # kidney-shaped axial section: the anterior wall recedes laterally
    lat = np.clip(1 - np.abs(X / (b.width / 2)) ** 2.2, 0, 1) ** 0.5
    v_post = half_d - 1.5 * (X / (b.width / 2)) ** 2
    v_ant = v_post - b.depth * lat + b.waist * np.clip(1 - (2 * u / b.height) ** 2, 0, 1)
    return u_top, u_bot, v_ant, v_post


def _paint_body(cv: _Canvas, b: _Body, marrow_tex: np.ndarray, band_noise: np.ndarray) -> None:
    r = math.hypot(b.height, b.depth) / 2 + 4
    blk = cv.block((b.cs - r, b.cs + r), (b.ca - r, b.ca + r), (-b.width / 2 - 2, b.width / 2 + 2))
    if blk is None:
        return
    sl, S, A, X = blk
    u, v = _body_local(b, S, A)
    u_top, u_bot, v_ant, v_post = _body_surfaces(b, u, v, X)
    d_vert = np.minimum(u - u_top, u_bot - u)
    d_ap = np.minimum(v - v_ant, v_post - v)
    sd = _rounded_box_sd(d_vert, d_ap, 3.0)
    sd = np.minimum(sd, (b.width / 2 - np.abs(X)) * 2.0)
    occ = _occ(sd, cv.step)
    cv.paint(sl, occ, TISSUES["cortex"])
    marrow_occ = _occ(sd - b.rim, cv.step)
    tex = marrow_tex[sl]
    base = np.array(TISSUES["marrow"], dtype=np.float32)
    cv.paint(sl, marrow_occ, base, texture=tex)
    if b.label:
        region = cv.labels[sl]
        region[occ >= 0.5] = b.label
    for band in b.bands:
        # distance into the marrow from the endplate, following the endplate's concave shape
        from_plate = (u - u_top) if band["endplate"] == "superior" else (u_bot - u)
        depth = band["depth"] * (1.0 + 0.12 * band_noise[sl])
        # cover most of the endplate: taper over the outer 15 % of the AP depth and lateral width
        v_mid = 0.5 * (v_ant + v_post)
        half_ap = 0.5 * (v_post - v_ant)
        cover = np.minimum(0.85 * half_ap - np.abs(v - v_mid), (0.8 * b.width / 2 - np.abs(X)))
        band_occ = _occ(depth - from_plate, 1.5) * _occ(cover, 2.0) * marrow_occ
        for mtype, weight in _band_types(band["type"], band_noise[sl]):
            cv.paint(sl, band_occ * weight, base * np.array(FINDING_FACTORS[mtype], dtype=np.float32), texture=tex)
    if b.whole_edema:
        cv.paint(sl, marrow_occ, base * np.array(FINDING_FACTORS["edema"], dtype=np.float32), texture=tex)


def _band_types(mtype: str, noise: np.ndarray):
    """Split a mixed band (``I/II``) into two patchy halves using the smooth noise field."""
    if "/" not in mtype:
        return [(mtype, 1.0)]
    a, b = mtype.split("/")
    w = np.clip(0.5 + noise, 0, 1).astype(np.float32)
    return [(a, w), (b, 1.0 - w)]


def _paint_disc(cv: _Canvas, d: _Disc) -> None:
    up, lo = d.upper, d.lower
    c = 0.5 * (up.point(up.height / 2, 0) + lo.point(-lo.height / 2, 0))
    depth = 0.5 * (up.depth + lo.depth)
    width = 0.5 * (up.width + lo.width)
    r = depth / 2 + 14
    blk = cv.block((c[0] - r, c[0] + r), (c[1] - r, c[1] + r), (-width / 2 - 2, width / 2 + 2))
    if blk is None:
        return
    sl, S, A, X = blk
    u1, v1 = _body_local(up, S, A)
    u2, v2 = _body_local(lo, S, A)
    _, u_bot, _, _ = _body_surfaces(up, u1, v1, X)
    u_top, _, _, _ = _body_surfaces(lo, u2, v2, X)
    a1 = u1 - u_bot  # below the upper body's inferior endplate
    a2 = u_top - u2  # above the lower body's superior endplate
    tm = 0.5 * (up.theta + lo.theta)
    vm = -(S - c[0]) * math.sin(tm) + (A - c[1]) * math.cos(tm)
    lat = np.clip(1 - np.abs(X / (width / 2)) ** 2.2, 0, 1) ** 0.5
    bulge = 1.2 if d.degenerated else 0.6  # degenerated discs bulge a little more posteriorly
    v_post = depth / 2 + bulge - 1.5 * (X / (width / 2)) ** 2
    v_ant = v_post - (depth + 1.2) * lat
    overlap = 2.5  # run under the bodies; they are painted on top and their edges blend into the disc
    sd = np.minimum(np.minimum(a1 + overlap, a2 + overlap), np.minimum(vm - v_ant, v_post - vm))
    sd = np.minimum(sd, (width / 2 - np.abs(X)) * 2.0)
    occ = _occ(sd, cv.step)
    if d.remnant:
        cv.paint(sl, occ, TISSUES["annulus"] if d.upper.name != "S1" else TISSUES["nucleus_degenerated"])
        return
    cv.paint(sl, occ, _INFECTED_DISC if d.infected else TISSUES["annulus"])
    # nucleus: ellipsoid in (fraction across the disc height, AP, lateral), slightly posterior
    tau = np.clip(a1, 0, None) / np.maximum(np.clip(a1, 0, None) + np.clip(a2, 0, None), 1e-3)
    q = ((tau - 0.5) / 0.36) ** 2 + ((vm - 0.06 * depth) / (0.33 * depth)) ** 2 + (X / (0.33 * width)) ** 2
    inside = (a1 > 0) & (a2 > 0)
    n_occ = np.where(inside, np.clip((1 - np.sqrt(q)) * 4.0, 0, 1), 0).astype(np.float32) * occ
    if d.infected:
        nucleus = _INFECTED_DISC
    elif d.degenerated:
        nucleus = TISSUES["nucleus_degenerated"]
    else:
        nucleus = TISSUES["nucleus"]
    cv.paint(sl, n_occ, nucleus)
    if not (d.infected or d.degenerated):
        # intranuclear cleft: the thin dark horizontal band of adult discs on T2
        cleft = n_occ * _occ(0.6 - np.abs(tau - 0.5) * (a1 + a2), 0.8) * 0.6
        cv.paint(sl, cleft, TISSUES["annulus"])


def _spine_curves(anat: _Anatomy):
    """Posterior-wall line of the column and its tilt as functions of s (model mm), for the canal etc."""
    pts = []
    for b in anat.bodies:
        for uu in np.linspace(-b.height / 2, b.height / 2, 5):
            p = b.point(float(uu), b.depth / 2)
            pts.append((p[0], p[1], b.theta))
    pts.sort()
    ps = np.array([p[0] for p in pts])
    pa = np.array([p[1] for p in pts])
    pt = np.array([p[2] for p in pts])
    return ps, pa, pt


def _interp(s: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """np.interp with linear extrapolation beyond the ends (the column continues above T11)."""
    out = np.interp(s, xp, fp)
    lo_slope = (fp[1] - fp[0]) / max(xp[1] - xp[0], 1e-6)
    hi_slope = (fp[-1] - fp[-2]) / max(xp[-1] - xp[-2], 1e-6)
    out = np.where(s < xp[0], fp[0] + (s - xp[0]) * lo_slope, out)
    return np.where(s > xp[-1], fp[-1] + (s - xp[-1]) * hi_slope, out)


def _render(anat: _Anatomy, cv: _Canvas, rng: np.random.Generator) -> None:
    sl, S, A, X = cv.full()
    shape = cv.labels.shape
    px = cv.step
    corr = max(2.0, 6.0 / px)
    tex_abd = _smooth_field(rng, shape, max(2.0, 9.0 / px))
    tex_gas = _smooth_field(rng, shape, max(2.0, 5.0 / px))
    # marrow: gentle large-scale variation plus fine trabecular / fatty-focus grain (CV ~8 %, as on the real T1
    # scans); the fine grain averages out over a zone, so zone medians of normal marrow stay within a few %
    tex_marrow = 1.0 + 0.03 * _smooth_field(rng, shape, corr) + 0.07 * _smooth_field(rng, shape, max(1.0, 1.5 / px))
    band_noise = _smooth_field(rng, shape, max(2.0, 4.0 / px))

    ps, pa, pt = _spine_curves(anat)
    s1 = cv.s
    wall = _interp(s1, ps, pa)  # posterior wall of the column (a, mm) per row
    theta = np.interp(s1, ps, pt)
    sec = 1.0 / np.cos(np.clip(theta, -1.3, 1.3))  # horizontal widths of tilted tubes grow by 1/cos
    canal_c = wall + (1.0 + anat.canal_ap / 2) * sec
    canal_half = anat.canal_ap / 2 * sec
    post_skin = _smooth1d(canal_c + anat.post_depth, 25.0 / px)
    by_name = {b.name: b for b in anat.bodies}
    # the lumbar back is lordotic but the skin is smoother; the abdomen wall sags a little
    ant_skin = anat.a_ant_skin + 8.0 * np.sin(np.clip((s1 - by_name["L1"].cs) / 200.0, -1, 1) * math.pi)
    ant_skin = np.broadcast_to(ant_skin.astype(np.float32), s1.shape)

    def col(arr):  # per-row function -> broadcastable array
        return np.asarray(arr, dtype=np.float32)[:, None, None]

    # torso (abdomen texture), then subcutaneous fat, then muscle compartment behind the column
    # torso: AP between the skins, laterally an ellipse ~300 mm wide (only axial views reach its sides)
    torso_half_w = 150.0 * np.sqrt(np.clip(1 - ((A - col(0.5 * (ant_skin + post_skin))) / col(0.62 * (post_skin - ant_skin))) ** 2, 0, 1))
    torso = _occ(np.minimum(np.minimum(A - col(ant_skin), col(post_skin) - A), torso_half_w - np.abs(X)), px)
    abd = np.array(TISSUES["abdomen"], dtype=np.float32)
    gas = _occ((tex_gas - 2.3) * 3.0, 1.0)  # scattered bowel gas: no signal
    cv.paint(sl, torso, abd, texture=np.clip(1.0 + 0.25 * tex_abd, 0.3, None) * (1.0 - gas))
    fat_occ = torso * np.maximum(_occ(col(ant_skin) + anat.fat_ant - A, 2.0), _occ(A - (col(post_skin) - anat.fat_post), 2.0))
    cv.paint(sl, fat_occ, TISSUES["fat"], texture=1.0 + 0.04 * tex_abd)
    # paraspinal muscles from the column back to the posterior fat; midline gets interspinous tissue
    back = _occ(A - (col(wall) - 2.0), px) * _occ(col(post_skin) - anat.fat_post - A, 2.0)
    cv.paint(sl, back, TISSUES["muscle"], texture=1.0 + 0.05 * tex_abd)
    mid = back * _occ(5.0 - np.abs(X), px) * _occ(A - col(canal_c + canal_half), px)
    cv.paint(sl, mid * 0.8, TISSUES["interspinous"], texture=1.0 + 0.2 * tex_abd)
    # psoas: grows from L1 down to L5, lateral to the bodies
    l1, l5 = by_name["L1"], by_name["L5"]
    grow = np.clip((s1 - l1.cs) / max(l5.cs - l1.cs, 1.0), 0, 1.2)
    psoas_r = col(6.0 + 16.0 * grow)
    psoas_a = col(wall - 28.0 * sec)
    psoas_x = col(26.0 + 10.0 * grow)
    psoas_sd = psoas_r - np.sqrt((A - psoas_a) ** 2 + (np.abs(X) - psoas_x) ** 2)
    psoas_sd = np.where(((s1 > l1.cs - 20) & (s1 < by_name["S1"].cs))[:, None, None], psoas_sd, -10)
    cv.paint(sl, _occ(psoas_sd, px), TISSUES["muscle"])
    # aorta (left of midline, down to L4 where it divides) and IVC (right), anterior to the column
    ant_wall = _interp(s1, *_anterior_wall(anat))
    for xc, rad, end in ((anat.aorta_x, 10.0, by_name["L4"].cs), (18.0, 8.0, by_name["L5"].cs)):
        sd_v = rad - np.sqrt((A - col(ant_wall - rad - 2.0)) ** 2 + (X - xc) ** 2)
        sd_v = np.minimum(sd_v, col(end - s1))
        cv.paint(sl, _occ(sd_v, px), TISSUES["vessel"])
    # spinal canal: epidural fat, dural sac (CSF) ending at S2, conus above L1/L2
    in_canal = _occ(col(canal_half) - np.abs(A - col(canal_c)), px) * _occ(11.0 - np.abs(X), px)
    cv.paint(sl, in_canal, TISSUES["epidural_fat"])
    sac_end = by_name["S2"].cs
    sac_half = np.where(s1 < sac_end, anat.sac_ap / 2, 0.0) * np.clip((sac_end - s1) / 15.0, 0, 1) * sec
    sac = _occ(col(sac_half) - np.abs(A - col(canal_c - 1.0 * sec)), px) * _occ(8.0 - np.abs(X), px) * in_canal
    cv.paint(sl, sac, TISSUES["csf"])
    conus_half = np.clip((by_name["L1"].cs + 10 - s1) / 25.0, 0, 1) * 4.0 * sec
    cord = _occ(col(conus_half) - np.abs(A - col(canal_c - 1.0 * sec)), px) * _occ(4.5 - np.abs(X), px) * sac
    cv.paint(sl, cord, TISSUES["cord"])
    # cauda equina: a few roots layered in the dependent (posterior) sac below the conus, dark on T2
    below_conus = col(np.clip((s1 - by_name["L1"].cs - 5.0) / 20.0, 0, 1) * (s1 < sac_end - 10))
    for xr, ar in ((-3.0, 0.25), (2.5, 0.35), (-0.5, 0.55), (4.0, 0.6)):
        root_sd = 0.8 - np.sqrt((A - col(canal_c - 1.0 * sec + ar * sac_half)) ** 2 + (X - xr) ** 2)
        cv.paint(sl, _occ(root_sd, px) * below_conus * sac, TISSUES["cord"])
    # urinary bladder in the pelvis, anterior to the lower sacrum (fluid: dark T1, bright T2 / STIR)
    s2 = by_name["S2"]
    bl_c = (s2.cs + 35.0, s2.ca - 85.0)
    bl = 1.0 - np.sqrt(((S - bl_c[0]) / 35.0) ** 2 + ((A - bl_c[1]) / 40.0) ** 2 + (X / 55.0) ** 2)
    cv.paint(sl, _occ(bl * 35.0, px) * torso, TISSUES["csf"])
    # posterior elements (laminae + spinous processes) of T11..L5
    for b in anat.bodies:
        if b.name in ("T11", "T12", "L1", "L2", "L3", "L4", "L5"):
            _paint_pedicles(cv, b, anat.canal_ap, tex_marrow)
            _paint_arch(cv, b, canal_c, canal_half, tex_marrow)
    for d in anat.discs:
        _paint_disc(cv, d)
    for b in anat.bodies:
        _paint_body(cv, b, tex_marrow, band_noise)


def _anterior_wall(anat: _Anatomy):
    pts = []
    for b in anat.bodies:
        for uu in np.linspace(-b.height / 2, b.height / 2, 5):
            p = b.point(float(uu), -b.depth / 2)
            pts.append((p[0], p[1]))
    pts.sort()
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def _smooth1d(y: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter1d(np.asarray(y, dtype=np.float32), sigma=max(sigma, 0.5), mode="nearest")


def _paint_pedicles(cv: _Canvas, b: _Body, canal_ap: float, tex) -> None:
    """Parasagittal posterior column: foraminal fat with the exiting root, pedicle, articular pillar + facet joint."""
    r = b.depth / 2 + canal_ap + 24
    blk = cv.block((b.cs - r, b.cs + r), (b.ca - r, b.ca + r), (-28, 28))
    if blk is None:
        return
    sl, S, A, X = blk
    u, v = _body_local(b, S, A)
    ax = np.abs(X)
    h2, d2 = b.height / 2, b.depth / 2
    lateral = np.minimum(ax - 9.0, 22.0 - ax)
    # neural foramen: fat between the pedicles, behind the body and disc
    foramen = np.minimum(_rounded_box_sd(np.minimum(u + h2 + 5, h2 + 5 - u), np.minimum(v - d2 + 1, d2 + canal_ap + 2 - v), 2.0),
                         lateral)
    cv.paint(sl, _occ(foramen, cv.step), TISSUES["epidural_fat"])
    root = 2.5 - np.sqrt((u - 0.25 * h2) ** 2 + (v - d2 - 5.0) ** 2)
    cv.paint(sl, _occ(np.minimum(root, np.minimum(ax - 12.0, 21.0 - ax)), cv.step), TISSUES["cord"])
    # pedicle from the upper half of the body's posterior wall, then the articular pillar spanning the disc
    pedicle = _rounded_box_sd(np.minimum(u + h2 - 1.0, 0.0 - u), np.minimum(v - d2 + 3, d2 + canal_ap + 4 - v), 2.5)
    pillar = _rounded_box_sd(np.minimum(u + h2 + 2.0, h2 + 6.0 - u),
                             np.minimum(v - d2 - canal_ap + 1, d2 + canal_ap + 17 - v), 3.0)
    bone = np.maximum(np.minimum(pedicle, lateral), np.minimum(pillar, np.minimum(ax - 10.0, 26.0 - ax)))
    cv.paint(sl, _occ(bone, cv.step), TISSUES["cortex"])
    cv.paint(sl, _occ(bone - 1.2, cv.step), TISSUES["element_marrow"], texture=tex[sl])
    # facet joint line between this pillar and the next one down
    facet = np.minimum(np.minimum(1.0 - np.abs(u - h2 - 3.0), np.minimum(v - d2 - canal_ap, d2 + canal_ap + 16 - v)),
                       np.minimum(ax - 11.0, 25.0 - ax))
    cv.paint(sl, _occ(facet, cv.step) * 0.9, TISSUES["annulus"])


def _paint_arch(cv: _Canvas, b: _Body, canal_c, canal_half, tex) -> None:
    """Lamina + spinous process as a rounded slab pointing posteriorly and a little caudally."""
    i_row = int(np.argmin(np.abs(cv.s - (b.cs + 0.1 * b.height))))
    root_a = float(canal_c[i_row] + canal_half[i_row])
    root = np.array([b.cs + 0.1 * b.height, root_a])
    phi = b.theta * 0.5 + math.radians(14.0)  # caudal slant of the spinous process
    direction = np.array([math.sin(phi), math.cos(phi)])  # (s, a)
    length = 33.0 if b.name != "L5" else 26.0
    blk = cv.block((root[0] - 25, root[0] + 40), (root[1] - 12, root[1] + length + 8), (-20, 20))
    if blk is None:
        return
    sl, S, A, X = blk
    p = (S - root[0]) * direction[0] + (A - root[1]) * direction[1]  # along the process
    q = (S - root[0]) * direction[1] - (A - root[1]) * direction[0]  # across it (+ = cranial)
    half_h = 6.0 + 4.0 * np.clip(p / length, 0, 1)  # hatchet-shaped: taller at the tip
    sd2 = _rounded_box_sd(np.minimum(p + 3.0, length - p), half_h - np.abs(q + 1.0), 3.0)
    # lamina wide near the canal, spinous process thin further back
    half_w = 4.5 + 9.0 * np.clip((9.0 - p) / 5.0, 0, 1)
    sd = np.minimum(sd2, half_w - np.abs(X))
    occ = _occ(sd, cv.step)
    cv.paint(sl, occ, TISSUES["cortex"])
    cv.paint(sl, _occ(sd - 1.2, cv.step), TISSUES["element_marrow"], texture=tex[sl])
    # ligamentum flavum: dark band along the canal's back wall just below the lamina
    lf = _occ(2.0 - np.abs(p + 1.0), cv.step) * _occ(b.height * 0.45 - np.abs(q + 14.0), cv.step) * _occ(11 - np.abs(X), 1)
    cv.paint(sl, lf * 0.8, TISSUES["ligament"])


def _acquire(cv: _Canvas, anat: _Anatomy, rng: np.random.Generator, series: tuple[str, ...],
             in_plane_axes: tuple[int, int], noise_frac: float) -> dict[str, np.ndarray]:
    """Blur, coil shading, Rician noise and scaling -> float32 magnitude images (stored units) per series."""
    ps, pa, _ = _spine_curves(anat)
    canal = _interp(cv.s, ps, pa) + 10.0
    post_skin = _smooth1d(canal + anat.post_depth, 20.0)
    # posterior surface coil: sensitivity falls with depth from the back; mild S-I ripple of the elements
    depth = np.clip(post_skin[:, None, None] - cv.a[None, :, None], 0, None)
    shade = 0.55 + 0.75 * np.exp(-depth / 150.0)
    shade = shade * (1.0 + 0.03 * np.cos(2 * np.pi * cv.s[:, None, None] / 180.0 + rng.uniform(0, 6.28)))
    shade = shade * (1.0 - 0.08 * (cv.x[None, None, :] / 60.0) ** 2)
    out = {}
    for name in series:
        q = _SEQ_INDEX[name]
        img = ndimage.gaussian_filter(cv.img[q], sigma=[0.6 if ax in in_plane_axes else 0.0 for ax in range(3)])
        img = img * shade.astype(np.float32)
        scale = float(rng.uniform(1200.0, 1900.0))
        sigma = noise_frac * (0.7 if name == "STIR" else 1.0)
        n1 = rng.standard_normal(img.shape, dtype=np.float32)
        n2 = rng.standard_normal(img.shape, dtype=np.float32)
        mag = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2) * np.float32(scale)
        out[name] = mag.astype(np.float32)
    return out


def _full_volume_ml(b: _Body) -> float:
    """Volume of a body on an unlimited 0.5 mm grid (for the in-FOV fraction in the truth)."""
    r = math.hypot(b.height, b.depth) / 2 + 3
    step = 0.5
    s = np.arange(b.cs - r, b.cs + r, step)
    a = np.arange(b.ca - r, b.ca + r, step)
    x = np.arange(-b.width / 2 - 1, b.width / 2 + 1, 2 * step)
    S, A, X = s[:, None, None], a[None, :, None], x[None, None, :]
    u, v = _body_local(b, S, A)
    u_top, u_bot, v_ant, v_post = _body_surfaces(b, u, v, X)
    sd = _rounded_box_sd(np.minimum(u - u_top, u_bot - u), np.minimum(v - v_ant, v_post - v), 3.0)
    sd = np.minimum(sd, (b.width / 2 - np.abs(X)) * 2.0)
    return float((sd >= 0).sum()) * step * step * 2 * step / 1000.0
