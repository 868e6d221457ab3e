"""Train a plain PyTorch model from a tigbev teacher cache, without tigbev's training loop.

    python docs/examples/train_from_cache.py CACHE_URL [--steps 50] [--lr 3e-3]

What comes from tigbev: the cache reader (``tigbev.data.teacher_cache``: numpy arrays, no torch) and TiG-BEV's
inner-feature loss as a standalone module (``tigbev.models.losses.InnerFeatureDistillation``). Everything else is
yours. The "student" here is a stand-in for your camera network: a small conv net that turns a raster of the
sample's box centres into a BEV feature map on the teacher's grid. Replace ``box_raster`` and ``BevNet`` by your
images and your model; the keypoints and the teacher's features at them stay as they are.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tigbev.data.teacher_cache import open_cache
from tigbev.models.losses import InnerFeatureDistillation


def box_raster(boxes: np.ndarray, grid) -> np.ndarray:
    """(1, H, W) float32: 1 at the cell of each box centre (the stand-in input)."""
    h, w = grid.shape_hw
    out = np.zeros((1, h, w), np.float32)
    ix = np.floor((boxes[:, 0] - grid.x_min_m) / grid.cell_m).astype(int)
    iy = np.floor((boxes[:, 1] - grid.y_min_m) / grid.cell_m).astype(int)
    keep = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    out[0, iy[keep], ix[keep]] = 1.0
    return out


class CacheDataset(Dataset):
    def __init__(self, url: str):
        self.cache = open_cache(url)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        s = self.cache[i]
        return {"input": box_raster(s.boxes, self.cache.grid), "keypoints": s.keypoints_xy,
                "teacher": s.keypoint_features, "valid": s.keypoint_valid}


def collate(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack the inputs; pad the boxes of every sample to the batch's largest count (mask False on padding)."""
    m = max(len(x["keypoints"]) for x in items)
    k, c = items[0]["teacher"].shape[1:]
    out = {"input": torch.from_numpy(np.stack([x["input"] for x in items])),
           "keypoints": torch.zeros(len(items), m, k, 2), "teacher": torch.zeros(len(items), m, k, c),
           "valid": torch.zeros(len(items), m, k, dtype=torch.bool), "boxes": torch.zeros(len(items), m,
                                                                                          dtype=torch.bool)}
    for i, x in enumerate(items):
        n = len(x["keypoints"])
        out["keypoints"][i, :n] = torch.from_numpy(x["keypoints"])
        out["teacher"][i, :n] = torch.from_numpy(x["teacher"])
        out["valid"][i, :n] = torch.from_numpy(x["valid"])
        out["boxes"][i, :n] = True
    return out


class BevNet(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(64, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--channels", type=int, default=64, help="channels of your model's BEV map")
    args = ap.parse_args()
    torch.manual_seed(0)
    data = CacheDataset(args.cache)
    grid = data.cache.grid
    model = BevNet(args.channels)
    # The student map lies on the teacher's grid here; give your own grid if it differs (keypoints are metric).
    tig = InnerFeatureDistillation(args.channels, data.cache.channels, student_grid=grid)
    opt = torch.optim.AdamW([*model.parameters(), *tig.parameters()], lr=args.lr)
    loader = DataLoader(data, batch_size=2, shuffle=True, collate_fn=collate)
    step = 0
    while step < args.steps:
        for batch in loader:
            losses = tig(model(batch["input"]), batch["keypoints"], batch["boxes"],
                         teacher_keypoint_feats=batch["teacher"], teacher_keypoint_valid=batch["valid"])
            loss = losses["inter_keypoint"] + losses["inter_channel"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            print(f"step {step} loss {loss.item():.5f} inter_keypoint {losses['inter_keypoint'].item():.5f} "
                  f"inter_channel {losses['inter_channel'].item():.5f}", flush=True)
            step += 1
            if step == args.steps:
                break


if __name__ == "__main__":
    main()
