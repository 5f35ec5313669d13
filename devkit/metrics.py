"""Error metrics of an attention output against its reference."""
import torch


def rel_l1(out, ref, dims=None):
    """sum|out - ref| / sum|ref| as a float; with `dims`, a tensor of that ratio per slice
    (the sums taken over `dims`). An all-zero reference gives a large finite number, not nan."""
    num = (out.float() - ref.float()).abs()
    den = ref.float().abs()
    if dims is None:
        return (num.sum() / den.sum().clamp_min(1e-12)).item()
    return num.sum(dims) / den.sum(dims).clamp_min(1e-12)


def rel_l2(out, ref) -> float:
    """||out - ref|| / ||ref|| (Frobenius norms)."""
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def cosine(a, b) -> float:
    """Cosine similarity of the two tensors taken as flat vectors."""
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()
