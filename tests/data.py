"""Inputs shared by the engine tests (the metrics are in devkit/metrics.py)."""
import torch


def clustered(B, H, N, D, seed, Hkv=None, seg=96, n_clusters=6, amp=2.0, noise=0.5, dtype=torch.float32, Nk=None):
    """Tokens in runs of `seg` share one of a few cluster centres (shared by q and k of a head):
    blocks are fairly self-similar and queries prefer keys of their own cluster, so the
    predictor finds real sparsity. Runs do not align with the blocks."""
    g = torch.Generator().manual_seed(seed)
    Hkv = Hkv or H
    Nk = Nk or N
    centres = torch.randn(B, H, n_clusters, D, generator=g)

    def make(h, n):
        runs = -(-n // seg)
        lab = torch.randint(0, n_clusters, (B, h, runs), generator=g).repeat_interleave(seg, -1)[..., :n]
        cent = torch.gather(centres[:, :h], 2, lab[..., None].expand(B, h, n, D))
        return amp * cent + noise * torch.randn(B, h, n, D, generator=g)

    return make(H, N).to(dtype), make(Hkv, Nk).to(dtype), torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
