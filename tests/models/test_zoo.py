"""``create_model`` / ``list_models`` and the shared head API (``forward_features``, ``forward_head``,
``reset_classifier``), checked for EVERY ``conf/model/*.yaml``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from pcbench.models import build_model, create_model, list_models
from pcbench.models.zoo import model_config
from tests.models._helpers import ragged_objects

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
NAMES = sorted(p.stem for p in CONF.glob("*.yaml"))
# Configs of a few million parameters build and run in seconds; the others (8-46M parameters) are the slow tier.
SMALL = ("pct_", "pointnet2_", "ptv1_cls")
PER_CONFIG = [n if n.startswith(SMALL) else pytest.param(n, marks=pytest.mark.slow) for n in NAMES]


def _task_of(name: str) -> str:
    return yaml.safe_load((CONF / f"{name}.yaml").read_text())["task"]


@pytest.fixture(scope="module")
def batch():
    return ragged_objects([64, 40, 48])


def test_list_models_is_every_config_and_filters_by_pattern_and_task() -> None:
    assert list_models() == NAMES and len(NAMES) >= 17
    assert list_models("pointnet2_*") == [n for n in NAMES if n.startswith("pointnet2_")]
    assert list_models("nothing*") == []
    for task in ("cls", "seg"):
        assert list_models(task=task) == [n for n in NAMES if _task_of(n) == task]
    assert list_models("p[ct]*", task="cls") == ["pct_cls", "ptv1_cls", "ptv2_cls", "ptv3_cls"]
    with pytest.raises(ValueError, match=r"task='det'"):
        list_models(task="det")


@pytest.mark.parametrize("name", PER_CONFIG)
def test_create_model_is_build_model_and_the_head_api_is_uniform(name: str, batch) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels=3, num_classes=5)
    torch.manual_seed(0)
    ref = build_model(model_config(name), in_channels=3, num_classes=5)
    assert type(model) is type(ref)
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)

    model.eval()
    rows = batch.offset.numel() if _task_of(name) == "cls" else batch.coord.shape[0]
    torch.manual_seed(1)  # PTv3 shuffles its curve order in evaluation too
    logits = model(batch)
    torch.manual_seed(1)
    split = model.forward_head(model.forward_features(batch))
    assert logits.shape == (rows, 5)
    torch.testing.assert_close(split, logits, atol=1e-5, rtol=1e-5)

    backbone = {k: v.clone() for k, v in model.state_dict().items()}
    old_last = [m for m in model.head.modules() if isinstance(m, nn.Linear)][-1]
    model.reset_classifier(7)
    new_last = [m for m in model.head.modules() if isinstance(m, nn.Linear)][-1]
    assert new_last is not old_last and new_last.out_features == 7 and new_last.in_features == old_last.in_features
    changed = {k for k, v in model.state_dict().items() if k not in backbone or v.shape != backbone[k].shape}
    assert changed and all(k.endswith(("weight", "bias")) for k in changed)  # only the last linear layer
    assert len(changed) == len(list(new_last.parameters()))
    torch.manual_seed(1)
    assert model(batch).shape == (rows, 7)
    with pytest.raises(ValueError, match="at least one class"):
        model.reset_classifier(0)


def test_overrides_are_dotted_config_keys_and_unknown_ones_are_named() -> None:
    model = create_model("pointnet2_ssg_cls", 3, 4, head_hidden=[64], **{"widths": [[[16, 32]], [[32, 64]]]})
    assert [m.out_features for m in model.head.modules() if isinstance(m, nn.Linear)] == [64, 4]
    assert model.levels[0].branches[0].linears[-1].out_features == 32
    model = create_model("ptv1_cls", 3, 4, neighbors=[4, 5, 6, 7, 8])
    ks = {m.k for m in model.modules() if hasattr(m, "k") and isinstance(m.k, int)}
    assert ks == {4, 5, 6, 7, 8}
    with pytest.raises(ValueError, match=r"no option 'neighbours'.*'neighbors'"):
        create_model("ptv1_cls", 3, 4, neighbours=16)
    with pytest.raises(ValueError, match="task is not a model option"):
        create_model("ptv1_cls", 3, 4, task="seg")
    with pytest.raises(ValueError, match=r"no model config 'ptv3_sge'.*did you mean \['ptv3_seg'"):
        create_model("ptv3_sge", 3, 4)


def test_weights_round_trip_and_a_new_label_set_gets_a_fresh_classifier(tmp_path: Path, batch) -> None:
    torch.manual_seed(0)
    src = create_model("pointnet2_ssg_cls", 3, 5, **{"ball_query_order": "distance"}).eval()
    path = tmp_path / "w.pt"
    torch.save({"format": 1, "model": src.state_dict(), "model_config": "pointnet2_ssg_cls", "in_channels": 3,
                "num_classes": 5}, path)
    torch.manual_seed(123)  # a different init, so equal outputs prove the weights were loaded
    same = create_model("pointnet2_ssg_cls", 3, 5, weights=path, ball_query_order="distance").eval()
    torch.testing.assert_close(same(batch), src(batch), rtol=0, atol=0)

    other = create_model("pointnet2_ssg_cls", 3, 11, weights=path, ball_query_order="distance").eval()
    assert other(batch).shape == (3, 11)
    torch.testing.assert_close(other.forward_features(batch), src.forward_features(batch), rtol=0, atol=0)

    with pytest.raises(ValueError, match="are for model 'pointnet2_ssg_cls', not 'pointnet2_msg_cls'"):
        create_model("pointnet2_msg_cls", 3, 5, weights=path)
    with pytest.raises(ValueError, match="expect in_channels=3, got 6"):
        create_model("pointnet2_ssg_cls", 6, 5, weights=path)
    with pytest.raises(ValueError, match=r"does not fit PointNet2Cls: .*shape mismatches"):
        create_model("pointnet2_ssg_cls", 3, 5, weights=path, head_hidden=[128, 64])
    with pytest.raises(ValueError, match="neither a file nor a published checkpoint name"):
        create_model("pointnet2_ssg_cls", 3, 5, weights=tmp_path / "absent.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be loaded with weights_only=True"):
        create_model("pointnet2_ssg_cls", 3, 5, weights=bad)
