"""Training of the disc CNN (``pipeline/disc_cnn.py``): a small convolutional net on T1 / T2 disc patches that
gives P(Modic change) per disc. Driven by ``python -m pipeline.training.train_modic --cnn`` (this module has the
net, the augmentation, the grouped out-of-fold training and the ONNX export; needs torch, the ``train`` extra).

Recipe (set a priori and checked once by nested CV over patients; 2026-12-07): four stages of two 3x3 conv +
batch norm + ReLU and a 2x2 max-pool (16, 24, 32, 48 channels), global mean pooling, dropout 0.3, one logit;
~62 k parameters. AdamW (lr 3e-3, weight decay 1e-2), one-cycle schedule, 40 epochs of batches of 32, positive
class weighted by the class ratio. Every batch is augmented on the fly: a random rotation (+-10 deg), scale
(+-10 %), shift (+-3 mm) and AP flip of the crop inside the larger patch, and per channel a random gain (+-15 %),
gamma (x/ 1.25) and noise (0.03): the 8-bit, per-slice-scaled SPIDER slices vary that much between scanners.
The shipped net is the four nets of a 4-fold split grouped by patient (each trained on three quarters of the
patients); their out-of-fold probabilities choose the decision threshold, and the exported graph averages the
four nets over the patch and its AP mirror image. ~35 s of one CPU core per net on ~420 discs.

Auxiliary gradings (multi-task, 2026-12-07): SPIDER's readers graded more than Modic per disc: the Pfirrmann grade,
endplate changes above and below, disc narrowing and bulging. Each is strongly tied to Modic changes (Pfirrmann 5:
97 % of discs have one, Pfirrmann 1-2: 12 %) and is one more expert label on the same patch, so during training a
second linear head on the same pooled features predicts them (``AUX_GRADINGS``; binary cross-entropy, Pfirrmann as
(grade - 1) / 4, a missing grade masked) and their loss, weighted ``AUX_WEIGHT``, is added to the Modic loss. The
head is dropped after training: the exported graph, its input and its output are unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.disc_cnn import CROP_MM, MAX_RATIO

EPOCHS, BATCH, LR, WEIGHT_DECAY = 40, 32, 3e-3, 1e-2
WIDTHS = (16, 24, 32, 48)
INNER_FOLDS = 4
# Columns of the gradings CSV learnt beside Modic, each as (column, lowest grade, highest grade): scaled to 0-1.
AUX_GRADINGS = (("pfirrmann", 1, 5), ("up_endplate", 0, 1), ("low_endplate", 0, 1), ("disc_narrowing", 0, 1),
                ("disc_bulging", 0, 1))
AUX_WEIGHT = 0.5


def aux_targets(rows: list[dict]) -> np.ndarray:
    """(n, len(AUX_GRADINGS)) training targets in 0-1 from gradings rows (dicts of column -> text); a missing,
    empty or out-of-range grade is NaN (masked out of the loss)."""
    out = np.full((len(rows), len(AUX_GRADINGS)), np.nan, np.float32)
    for i, row in enumerate(rows):
        for j, (col, lo, hi) in enumerate(AUX_GRADINGS):
            try:
                v = float(row.get(col, ""))
            except (TypeError, ValueError):
                continue
            if lo <= v <= hi:
                out[i, j] = (v - lo) / (hi - lo)
    return out


def _torch():
    import torch

    torch.set_num_threads(1)  # a small net: one thread per process, parallel over processes if at all
    return torch


def make_net(torch, cin: int = 2, widths=WIDTHS, p_drop: float = 0.3, n_aux: int = 0):
    """The disc net; ``forward`` gives the Modic logit, ``forward_all`` also the ``n_aux`` auxiliary logits."""
    nn = torch.nn

    class DiscNet(nn.Module):
        def __init__(self):
            super().__init__()
            layers, c = [], cin
            for w in widths:
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                           nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                           nn.MaxPool2d(2)]
                c = w
            self.features = nn.Sequential(*layers)
            self.drop = nn.Dropout(p_drop)
            self.head = nn.Linear(c, 1)
            self.aux_head = nn.Linear(c, n_aux) if n_aux else None

        def forward_all(self, x):
            pooled = self.drop(self.features(x).mean(dim=(2, 3)))
            return self.head(pooled)[:, 0], (self.aux_head(pooled) if self.aux_head is not None else None)

        def forward(self, x):
            return self.forward_all(x)[0]

    return DiscNet()


def augment(torch, x, gen, train: bool):
    """(B, 2, *PATCH_MM) patches -> (B, 2, *CROP_MM) crops; with ``train`` a random affine of the crop inside the
    patch and a random per-channel intensity change; without it exactly the central crop (``disc_cnn.centre_crop``)."""
    functional = torch.nn.functional
    b, c, hu, hv = x.shape
    if train:
        def uniform(scale):
            return (torch.rand(b, generator=gen) * 2 - 1) * scale

        ang, sc = uniform(math.radians(10)), 1 + uniform(0.1)
        tu, tv = uniform(3.0), uniform(3.0)
        flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    else:
        ang, sc, tu, tv, flip = torch.zeros(b), torch.ones(b), torch.zeros(b), torch.zeros(b), torch.ones(b)
    cos, sin = torch.cos(ang) * sc, torch.sin(ang) * sc
    ru, rv = CROP_MM[0] / hu, CROP_MM[1] / hv
    theta = torch.zeros(b, 2, 3)  # affine_grid's normalised coordinates: x = v (AP, width), y = u (height)
    theta[:, 0, 0] = cos * rv * flip
    theta[:, 0, 1] = -sin * ru * hu / hv
    theta[:, 1, 0] = sin * rv * hv / hu * flip
    theta[:, 1, 1] = cos * ru
    theta[:, 0, 2] = tv * 2 / hv
    theta[:, 1, 2] = tu * 2 / hu
    grid = functional.affine_grid(theta, (b, c, *CROP_MM), align_corners=False)
    out = functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if train:
        gain = 1 + (torch.rand(b, c, 1, 1, generator=gen) * 2 - 1) * 0.15
        gamma = torch.exp((torch.rand(b, c, 1, 1, generator=gen) * 2 - 1) * math.log(1.25))
        out = (out.clamp(min=0) / 2).pow(gamma) * 2 * gain + torch.randn(out.shape, generator=gen) * 0.03
    return out


def as_tensor(torch, patches: np.ndarray):
    """(n, 2, *PATCH_MM) float patches, ratios clipped as at inference (``disc_cnn.centre_crop``)."""
    return torch.from_numpy(np.clip(patches, 0.0, MAX_RATIO).astype(np.float32))


def train_net(patches: np.ndarray, y: np.ndarray, seed: int, epochs: int = EPOCHS, aux: np.ndarray | None = None):
    """One net trained on all of (patches, y); returned in eval mode. ``aux``: (n, k) auxiliary targets in 0-1
    (:func:`aux_targets`, NaN = unknown) learnt beside Modic with weight ``AUX_WEIGHT``; None: Modic alone."""
    torch = _torch()
    functional = torch.nn.functional
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = as_tensor(torch, patches)
    if aux is not None and len(aux) != len(y):
        raise ValueError(f"aux has {len(aux)} rows for {len(y)} discs: subset it as the patches")
    use_aux = aux is not None and np.isfinite(aux).any()  # no known grading (or no column): Modic alone
    net = make_net(torch, n_aux=aux.shape[1] if use_aux else 0)
    if use_aux:
        aux_known = torch.from_numpy(np.isfinite(aux))
        aux_target = torch.from_numpy(np.nan_to_num(aux, nan=0.0).astype(np.float32))
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    n = len(y)
    steps = math.ceil(n / BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=epochs * steps, pct_start=0.2)
    pos_weight = torch.tensor([(n - y.sum()) / max(y.sum(), 1)], dtype=torch.float32)
    target = torch.from_numpy(y.astype(np.float32))
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(steps):
            idx = perm[i * BATCH:(i + 1) * BATCH]
            if len(idx) < 2:  # batch norm needs two
                continue
            logit, aux_logit = net.forward_all(augment(torch, x[idx], gen, True))
            loss = functional.binary_cross_entropy_with_logits(logit, target[idx], pos_weight=pos_weight)
            if use_aux:
                known = aux_known[idx]
                if known.any():
                    each = functional.binary_cross_entropy_with_logits(aux_logit, aux_target[idx], reduction="none")
                    loss = loss + AUX_WEIGHT * each[known].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def predict(nets, patches: np.ndarray) -> np.ndarray:
    """Mean P(change) of ``nets`` over the central crop and its AP mirror image (what the exported graph does)."""
    torch = _torch()
    with torch.no_grad():
        x = augment(torch, as_tensor(torch, patches), None, False)
        p = [torch.sigmoid(net(v)) for net in nets for v in (x, x.flip(3))]
        return torch.stack(p).mean(dim=0).numpy().astype(float)


def fold_ids(groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Patients shuffled by ``seed`` and dealt round-robin into ``folds`` (the split train_modic uses)."""
    cases = np.unique(groups)
    np.random.RandomState(seed).shuffle(cases)
    fold = {c: i % folds for i, c in enumerate(cases)}
    return np.array([fold[c] for c in groups])


def grouped_nets(patches: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0, epochs: int = EPOCHS,
                 aux: np.ndarray | None = None):
    """The ``INNER_FOLDS`` nets of a split grouped by patient and their out-of-fold probabilities (every disc
    scored by the net that did not see its patient). ``aux``: auxiliary targets per disc (:func:`train_net`)."""
    fid = fold_ids(groups, INNER_FOLDS, seed)
    oof = np.zeros(len(y))
    nets = []
    for k in range(INNER_FOLDS):
        net = train_net(patches[fid != k], y[fid != k], seed=1000 * seed + k, epochs=epochs,
                        aux=None if aux is None else aux[fid != k])
        oof[fid == k] = predict([net], patches[fid == k])
        nets.append(net)
    return nets, oof


def export_onnx(nets, path: Path) -> None:
    """One ONNX graph: input ``patch`` (n, 2, *CROP_MM), output ``prob`` (n,) = the mean over ``nets`` of the
    sigmoid on the crop and on its AP mirror image."""
    torch = _torch()

    class Ensemble(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.members = torch.nn.ModuleList(nets)

        def forward(self, x):
            p = [torch.sigmoid(m(v)) for m in self.members for v in (x, torch.flip(x, dims=[3]))]
            return torch.stack(p).mean(dim=0)

    path.parent.mkdir(parents=True, exist_ok=True)
    model = Ensemble().eval()
    torch.onnx.export(model, (torch.zeros(2, 2, *CROP_MM),), str(path), input_names=["patch"],
                      output_names=["prob"], dynamic_axes={"patch": {0: "n"}, "prob": {0: "n"}}, dynamo=False)

