"""The Lovasz-softmax loss against a brute-force Lovasz extension of the Jaccard loss (Berman et al., CVPR 2018,
eq. 8-9), and without any host read (it runs every training step of the PTv3 recipes)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pcbench.train import losses
from pcbench.train.losses import lovasz_softmax

SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "unique", "_unique",
            "_unique2", "unique_consecutive", "unique_dim", "masked_scatter", "index_put_"}


def lovasz_reference(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Definition, O(N^2) per class: sum_i e_(i) (D(M_i) - D(M_{i-1})), D(M) = |M| / |Y_c u M|, M_i the i largest
    errors; the mean over the classes present in the valid targets."""
    keep = [i for i, t in enumerate(target.tolist()) if t != ignore_index]
    probas = logits.softmax(-1)[keep]
    labels = target[keep].tolist()
    terms = []
    for c in sorted(set(labels)):
        fg_set = {i for i, t in enumerate(labels) if t == c}
        errors = torch.stack([(float(i in fg_set) - probas[i, c]).abs() for i in range(len(labels))])
        order = sorted(range(len(labels)), key=lambda i: -float(errors[i].detach()))

        def jaccard_loss(m: list[int], fg: set[int] = fg_set) -> float:
            return len(m) / len(fg | set(m)) if m else 0.0

        terms.append(sum(errors[order[k]] * (jaccard_loss(order[:k + 1]) - jaccard_loss(order[:k]))
                         for k in range(len(order))))
    return torch.stack(terms).mean() if terms else logits.sum() * 0.0


class SyncCount(TorchDispatchMode):
    """Counts aten ops that read a device value back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func.overloadpacket.__name__ in SYNC_OPS:
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("num_classes, n, seed", [(5, 40, 0), (3, 25, 1), (40, 60, 2)])
def test_lovasz_matches_the_brute_force_extension_and_its_gradient(num_classes: int, n: int, seed: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # 40 classes with a chunk of 16: classes split across chunks, most of them absent from the target
    monkeypatch.setattr(losses, "_CLASS_CHUNK", 16)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, num_classes, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, min(num_classes, 6), (n,), generator=g)
    target[torch.randperm(n, generator=g)[: n // 5]] = -1
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    got = lovasz_softmax(a, target, ignore_index=-1)
    want = lovasz_reference(b, target, ignore_index=-1)
    assert got.item() == pytest.approx(want.item(), abs=1e-6)  # lovasz_softmax computes in float32
    got.backward()
    want.backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4)


def test_lovasz_of_one_hot_predictions_is_one_minus_the_mean_iou_of_present_classes() -> None:
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 3, 3])
    target = torch.tensor([0, 1, 1, 1, 2, 2, -1, 0, 0, 2])  # class 3 is predicted but absent: not averaged
    logits = torch.nn.functional.one_hot(pred, 5).double() * 60.0
    iou = []
    for c in (0, 1, 2):
        valid = target != -1
        inter = ((pred == c) & (target == c) & valid).sum().item()
        union = (((pred == c) | (target == c)) & valid).sum().item()
        iou.append(inter / union)
    assert lovasz_softmax(logits, target).item() == pytest.approx(1 - sum(iou) / 3, abs=1e-6)


def test_lovasz_ties_ignored_points_and_an_empty_batch() -> None:
    logits = torch.zeros(8, 4, requires_grad=True)  # every error ties
    target = torch.tensor([0, 0, 1, -1, -1, 2, 2, 2])
    ref = lovasz_reference(logits.double(), target, -1)
    assert lovasz_softmax(logits, target).item() == pytest.approx(ref.item(), abs=1e-6)
    empty = lovasz_softmax(logits, torch.full((8,), -1))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_lovasz_reads_nothing_back_from_the_device() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(500, 20, generator=g, requires_grad=True)
    target = torch.randint(-1, 20, (500,), generator=g)
    with SyncCount() as count:
        lovasz_softmax(logits, target).backward()
    assert count.names == []
