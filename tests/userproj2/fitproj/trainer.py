"""The training loop: AdamW, one-cycle LR, gradient accumulation, bf16 autocast, optional torch.compile."""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .model import TabularNet


class Trainer:
    def __init__(self, cfg, n_in, n_out, device="cpu", out_dir="runs/latest"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.out_dir = Path(out_dir)
        mcfg, ocfg, tcfg = cfg["model"], cfg["optim"], cfg["train"]
        self.net = TabularNet(n_in, n_out, mcfg["hidden"], mcfg["depth"], mcfg.get("dropout", 0.0)).to(self.device)
        self.model = self.net
        backend = cfg.get("compile")
        if backend and hasattr(torch, "compile"):
            self.model = torch.compile(self.net, backend=backend)
        self.epochs = tcfg["epochs"]
        self.accum_steps = max(1, int(tcfg.get("accum_steps", 1)))
        self.grad_clip = tcfg.get("grad_clip")
        self.amp = cfg.get("precision", "fp32") == "bf16"
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=ocfg["lr"],
                                           weight_decay=ocfg.get("weight_decay", 0.0),
                                           betas=tuple(ocfg.get("betas", (0.9, 0.999))))
        self.scheduler = None  # built in fit(), once the number of steps is known

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _make_scheduler(self, batches_per_epoch):
        steps = self.epochs * math.ceil(batches_per_epoch / self.accum_steps)
        kind = self.cfg["optim"].get("schedule", "onecycle")
        if kind == "onecycle":
            return torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=self.cfg["optim"]["lr"], total_steps=steps,
                                                       pct_start=0.3)
        if kind == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=steps)
        raise ValueError(f"unknown schedule {kind!r}")

    def _step(self):
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_epoch(self, loader):
        self.model.train()
        total, pending = 0.0, 0
        for i, (xb, yb) in enumerate(loader):
            xb, yb = xb.to(self.device), yb.to(self.device)
            with self._autocast():
                pred = self.model(xb)
            loss = F.mse_loss(pred.float(), yb)
            (loss / self.accum_steps).backward()
            total += loss.item()
            pending += 1
            if pending == self.accum_steps:
                self._step()
                pending = 0
        if pending:  # leftover micro-batches at the end of the epoch
            self._step()
        return total / max(1, len(loader))

    @torch.no_grad()
    def predict(self, loader):
        self.model.eval()
        ys, ps = [], []
        for xb, yb in loader:
            with self._autocast():
                pred = self.model(xb.to(self.device))
            ps.append(pred.float().cpu())
            ys.append(yb)
        return torch.cat(ys).numpy(), torch.cat(ps).numpy()

    def evaluate(self, loader):
        y, p = self.predict(loader)
        err = p.astype(np.float64) - y.astype(np.float64)
        return {"mse": float(np.mean(err ** 2)), "mae": float(np.mean(np.abs(err)))}

    def save_checkpoint(self, path, epoch, val_mse):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": epoch,
                    "model": getattr(self.model, "_orig_mod", self.model).state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "val_mse": val_mse}, path)

    def load_checkpoint(self, path):
        ckpt = torch.load(path, map_location=self.device, weights_only=True)
        self.net.load_state_dict(ckpt["model"])
        return ckpt

    def fit(self, train_loader, val_loader, log=print):
        self.scheduler = self._make_scheduler(len(train_loader))
        best = {"val_mse": math.inf, "epoch": -1}
        ckpt_path = self.out_dir / "checkpoints" / "best.ckpt"
        for epoch in range(1, self.epochs + 1):
            train_mse = self.train_epoch(train_loader)
            val = self.evaluate(val_loader)
            log(f"epoch {epoch:3d}/{self.epochs}  train_mse {train_mse:.5f}  val_mse {val['mse']:.5f}  "
                f"val_mae {val['mae']:.5f}  lr {self.scheduler.get_last_lr()[0]:.2e}")
            if val["mse"] < best["val_mse"]:
                best = {"val_mse": val["mse"], "val_mae": val["mae"], "epoch": epoch}
                self.save_checkpoint(ckpt_path, epoch, val["mse"])
        self.load_checkpoint(ckpt_path)
        return best
