"""The HRNet-like pose estimator: configs, keypoint maths, flips, person centres, losses, ONNX export."""

from __future__ import annotations

import json
import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from models.ctrgcn import count_parameters
from models.pose import (
    EXPORT_OUTPUTS,
    IMAGE_MEAN,
    IMAGE_STD,
    ROOT_JOINT,
    DetectOutputs,
    PoseConfig,
    PoseEstimator,
    PoseGraph,
    PoseOutputs,
    box_masks,
    centre_targets,
    decode_people,
    detect_loss,
    flip_boxes,
    flip_coords,
    flip_heatmaps,
    flip_images,
    flip_joints3d,
    flip_location_maps,
    flip_outputs,
    focal_loss,
    gaussian_heatmaps,
    gaussian_radius,
    heatmap_to_input,
    input_to_heatmap,
    keypoint_outputs,
    normalise_images,
    pose_config_for,
    pose_loss,
    pose_targets,
    read_location_maps,
    soft_argmax,
)
from models.skeleton import FLIP_INDEX, JOINT_NAMES, NUM_JOINTS
from stages.export import graph_report

SMALL_PARAMETERS = 1_313_257  # 345,824 of them the person detector's own backbone
FULL_PARAMETERS = 29_048_457  # 345,824 of them the person detector's own backbone


@pytest.fixture
def one_thread():
    """Small graphs on a shared 2-core machine run several times faster on one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights and BN statistics of a realistic scale (the HRNet init makes every output ~0), so that
    comparisons see non-trivial heatmaps, coordinates and boxes. Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(1.0 / fan_in))
                if m.bias is not None:
                    m.bias.uniform_(-0.1, 0.1, generator=g)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.0, generator=g)
                m.bias.uniform_(-0.1, 0.1, generator=g)
                m.running_mean.uniform_(-0.1, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model.eval()


def random_coords(n: int, low: float, high: float, seed: int = 0) -> torch.Tensor:
    """``(n, 25, 2)`` sub-pixel coordinates uniform in ``[low, high)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, NUM_JOINTS, 2, generator=g, dtype=torch.float64).float() * (high - low) + low


# ---- configs and shapes -------------------------------------------------------------------------


def test_small_config_shapes_and_size(one_thread):
    cfg = pose_config_for("small")
    model = PoseEstimator(cfg).eval()
    assert count_parameters(model) == SMALL_PARAMETERS
    assert cfg.input_size == (128, 128) and cfg.input_multiple == 32
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 128))
        det = model.detect(torch.randn(2, 3, 192, 320))
    assert isinstance(out, PoseOutputs) and isinstance(det, DetectOutputs)
    assert out.heatmaps.shape == (1, 25, 32, 32) and out.location_maps.shape == (1, 75, 32, 32)
    assert out.coords2d.shape == (1, 25, 2) and out.joints3d.shape == (1, 25, 3)
    assert out.confidence.shape == (1, 25)
    assert torch.all(out.joints3d[:, ROOT_JOINT] == 0)
    assert torch.all((out.coords2d >= -0.5) & (out.coords2d <= 127.5))
    assert det.centre.shape == det.centre_logits.shape == (2, 1, 24, 40)
    assert det.size.shape == det.offset.shape == (2, 2, 24, 40)
    # CenterNet's prior: every cell starts at probability ~0.1
    assert torch.allclose(det.centre, torch.full_like(det.centre, 0.1), atol=0.01)


def test_full_config_is_near_hrnet_w32(one_thread):
    cfg = pose_config_for("full")
    model = PoseEstimator(cfg).eval()
    assert count_parameters(model) == FULL_PARAMETERS  # HRNet-W32 (pose): 28.5 M, + heads and detector
    assert cfg.widths == (32, 64, 128, 256) and cfg.input_multiple == 32
    with torch.no_grad():
        out = model(torch.randn(1, 3, 256, 256))
        det = model.detect(torch.randn(1, 3, 128, 160))
    assert out.heatmaps.shape == (1, 25, 64, 64) and out.joints3d.shape == (1, 25, 3)
    assert det.centre.shape == (1, 1, 16, 20) and det.size.shape == (1, 2, 16, 20)


def test_config_round_trips_and_rejects_bad_values():
    for size in ("full", "small"):
        cfg = pose_config_for(size, beta=12.0)
        assert PoseConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="valid: full, small"):
        pose_config_for("medium")
    with pytest.raises(ValueError, match="at least 2 branches"):
        PoseConfig(widths=(32,), stage_modules=(), stage_blocks=())
    with pytest.raises(ValueError, match="one entry per added branch"):
        PoseConfig(stage_modules=(1, 4))
    with pytest.raises(ValueError, match="multiples of 32"):
        PoseConfig(input_size=(256, 200))
    with pytest.raises(ValueError, match="'separate' or 'shared'"):
        PoseConfig(detector="both")
    # a config saved before the detector had its own backbone loads as the shared one it was
    old = {
        k: v for k, v in pose_config_for("small").to_dict().items() if k not in ("detector", "detect_widths")
    }
    assert PoseConfig.from_dict(old).detector == "shared"


@pytest.mark.parametrize("detector", ["separate", "shared"])
def test_detector_backbone_is_separate_or_shared(one_thread, detector):
    """The person loss reaches the keypoint backbone only when the heads share it."""
    torch.manual_seed(0)
    model = PoseEstimator(pose_config_for("small", input_size=(64, 64), detector=detector))
    det = model.detect(torch.randn(1, 3, 64, 96))
    assert det.centre.shape == (1, 1, 8, 12)
    det.centre_logits.sum().backward()
    keypoint_grads = [p.grad for p in model.backbone.parameters()]
    if detector == "separate":
        assert all(g is None for g in keypoint_grads)
        assert all(p.grad is not None for p in model.detect_backbone.stem.parameters())
    else:
        assert model.detect_backbone is None
        assert any(g is not None and g.abs().sum() > 0 for g in keypoint_grads)


def test_images_of_the_wrong_shape_are_rejected():
    model = PoseEstimator(pose_config_for("small"))
    with pytest.raises(ValueError, match=r"multiples of 32; got \(1, 3, 112, 128\)"):
        model(torch.zeros(1, 3, 112, 128))
    with pytest.raises(ValueError, match="multiples of 32"):
        model.detect(torch.zeros(1, 3, 192, 304))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.zeros(3, 128, 128))


class OpRecorder(TorchFunctionMode):
    """Names of the torch functions called and the largest rank of any tensor they returned."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()
        self.max_rank = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, tuple | list) else (out,)
        self.names.add(getattr(func, "__name__", str(func)))
        self.max_rank = max([self.max_rank] + [t.dim() for t in outs if isinstance(t, torch.Tensor)])
        return out


def test_no_einsum_and_nothing_above_rank_4():
    model = PoseEstimator(pose_config_for("small", other_person=True)).eval()
    boxes = torch.tensor([[[60.0, 50.0, 40.0, 90.0], [200.0, 90.0, 30.0, 60.0]]])
    other = torch.tensor([[70.0, 10.0, 120.0, 120.0], [float("nan")] * 4])
    with torch.no_grad(), OpRecorder() as rec:
        out = model(torch.randn(2, 3, 128, 128), other)
        det = model.detect(torch.randn(1, 3, 192, 320))
        decode_people(det.centre, det.size, det.offset)
        targets = centre_targets(boxes, (24, 40))
        detect_loss(det, targets)
        pose_loss(out, pose_targets(out.coords2d, torch.ones(2, 25), model.cfg, out.joints3d))
        flip_outputs(out)
    assert rec.names and not [n for n in rec.names if "einsum" in n]
    assert rec.max_rank == 4


# ---- soft-argmax, heatmaps and the pixel convention -----------------------------------------------


def test_soft_argmax_recovers_sub_pixel_centres():
    coords = random_coords(3, 8.0, 24.0)  # 4 sigma from the borders: no truncation
    xs = torch.arange(32.0)
    sigma = 2.0
    logits = -((xs - coords[..., 0:1]) ** 2).unsqueeze(-2) - ((xs - coords[..., 1:2]) ** 2).unsqueeze(-1)
    found, weights = soft_argmax(logits / (2 * sigma**2), beta=1.0)  # log-gaussian: exact centroid
    assert (found - coords).abs().max() < 1e-3
    assert torch.allclose(weights.sum((2, 3)), torch.ones(3, 25))

    cfg = PoseConfig()
    for size in (32, 64):
        coords = random_coords(4, 4.0, size - 4.0, seed=size)
        heat = gaussian_heatmaps(coords, (size, size), cfg.sigma)  # peaks ~1, background 0
        found, _ = soft_argmax(heat, cfg.beta)
        assert (found - coords).abs().max() < 0.05
        blurred, _ = soft_argmax(heat, 1.0)  # the background outweighs the peak: pulled to the middle
        assert (blurred - coords).abs().max() > 1.0


def test_gaussian_heatmaps_values():
    coords = torch.tensor([[[5.0, 7.0], [2.5, 3.0]]])
    heat = gaussian_heatmaps(coords, (12, 10), sigma=2.0)
    assert heat.shape == (1, 2, 12, 10)
    assert heat[0, 0, 7, 5] == 1.0 and heat[0, 0].argmax() == 7 * 10 + 5
    assert torch.isclose(heat[0, 0, 7, 6], torch.tensor(math.exp(-1 / 8)))
    assert torch.isclose(heat[0, 1, 3, 2], heat[0, 1, 3, 3])  # half-way between two pixels


def test_input_and_heatmap_pixels():
    # heatmap pixel 0 covers input pixels 0..3, whose centre is 1.5; the mirror maps x to W - 1 - x
    assert heatmap_to_input(torch.tensor([0.0, 31.0])).tolist() == [1.5, 125.5]
    coords = random_coords(2, 0.0, 127.0)
    assert torch.allclose(heatmap_to_input(input_to_heatmap(coords)), coords, atol=1e-5)
    cfg = pose_config_for("small")
    coords = random_coords(2, 12.0, 116.0)
    targets = pose_targets(coords, torch.ones(2, 25), cfg)
    decoded = keypoint_outputs(targets.heatmaps, torch.zeros(2, 75, 32, 32), cfg.beta).coords2d
    assert (decoded - coords).abs().max() < 0.2  # 0.05 heatmap pixels


def test_location_maps_are_read_with_the_soft_argmax_weights():
    g = torch.Generator().manual_seed(1)
    joints = torch.randn(2, 25, 3, generator=g)
    maps = joints.transpose(1, 2).reshape(2, 75, 1, 1).expand(2, 75, 8, 8)  # constant per joint/axis
    weights = torch.softmax(torch.randn(2, 25, 64, generator=g), -1).reshape(2, 25, 8, 8)
    read = read_location_maps(maps, weights)
    assert torch.allclose(read, joints - joints[:, ROOT_JOINT : ROOT_JOINT + 1], atol=1e-6)
    # a map varying over pixels: the read-out is the weighted mean over pixels
    maps = torch.zeros(1, 75, 8, 8)
    maps[0, 2 * 25 + 3, 2, 5] = 4.0  # Z of the head, one pixel
    weights = torch.full((1, 25, 8, 8), 1 / 64)
    assert torch.isclose(read_location_maps(maps, weights)[0, 3, 2], torch.tensor(4.0 / 64))


# ---- horizontal flips ---------------------------------------------------------------------------


def test_flip_helpers_swap_sides_and_are_involutions():
    assert JOINT_NAMES[FLIP_INDEX[JOINT_NAMES.index("left_wrist")]] == "right_wrist"
    g = torch.Generator().manual_seed(2)
    heat, maps = torch.rand(2, 25, 32, 24, generator=g), torch.randn(2, 75, 32, 24, generator=g)
    coords, joints = random_coords(2, 0, 95), torch.randn(2, 25, 3, generator=g)
    assert torch.equal(flip_heatmaps(flip_heatmaps(heat)), heat)
    assert torch.equal(flip_location_maps(flip_location_maps(maps)), maps)
    assert torch.allclose(flip_coords(flip_coords(coords, 96), 96), coords)
    assert torch.equal(flip_joints3d(flip_joints3d(joints)), joints)
    lw, rw = JOINT_NAMES.index("left_wrist"), JOINT_NAMES.index("right_wrist")
    assert torch.equal(flip_heatmaps(heat)[:, rw], heat[:, lw].flip(-1))
    assert torch.equal(flip_location_maps(maps)[:, rw], -maps[:, lw].flip(-1))  # X negated
    assert torch.equal(flip_location_maps(maps)[:, 50 + rw], maps[:, 50 + lw].flip(-1))  # Z kept
    assert torch.equal(flip_joints3d(joints)[:, rw], joints[:, lw] * torch.tensor([-1.0, 1, 1]))
    mirrored = torch.stack((95 - coords[:, lw, 0], coords[:, lw, 1]), -1)
    assert torch.allclose(flip_coords(coords, 96)[:, rw], mirrored)


def test_flipped_targets_are_the_targets_of_the_flipped_joints():
    cfg = pose_config_for("small")
    coords = random_coords(3, 4.0, 124.0, seed=3)
    visible = torch.ones(3, 25)
    mirrored = pose_targets(flip_coords(coords, 128), visible, cfg).heatmaps
    assert torch.allclose(flip_heatmaps(pose_targets(coords, visible, cfg).heatmaps), mirrored, atol=1e-6)


def test_flip_outputs_matches_decoding_the_flipped_maps():
    """Flip-test averaging is consistent: decoding mirrored, swapped maps gives the mirrored outputs."""
    cfg = pose_config_for("small")
    g = torch.Generator().manual_seed(4)
    heat = gaussian_heatmaps(input_to_heatmap(random_coords(2, 8, 120, seed=5)), (32, 32), cfg.sigma)
    heat = heat + 0.05 * torch.rand(heat.shape, generator=g)
    maps = torch.randn(2, 75, 32, 32, generator=g)
    out = keypoint_outputs(heat, maps, cfg.beta)
    expected = keypoint_outputs(flip_heatmaps(heat), flip_location_maps(maps), cfg.beta)
    for got, want in zip(flip_outputs(out), expected, strict=True):
        assert torch.allclose(got, want, atol=1e-4)
    model = PoseEstimator(cfg).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        out, back = model(x), flip_outputs(model(flip_images(x)))
        heat, maps = (out.heatmaps + back.heatmaps) / 2, (out.location_maps + back.location_maps) / 2
        averaged = keypoint_outputs(heat, maps, cfg.beta)
    assert averaged.coords2d.shape == (1, 25, 2) and torch.all(averaged.joints3d[:, ROOT_JOINT] == 0)


# ---- people -------------------------------------------------------------------------------------


def test_centre_targets_and_decoding_round_trip():
    boxes = torch.tensor(
        [
            [[100.3, 80.7, 60.0, 150.0], [230.0, 101.2, 50.0, 120.0]],
            [[40.0, 60.0, 30.0, 70.0], [0.0, 0.0, 0.0, 0.0]],  # one person; the second slot is empty
        ]
    )
    targets = centre_targets(boxes, (24, 40))
    assert targets.centre.shape == targets.mask.shape == (2, 1, 24, 40)
    assert targets.mask.sum((1, 2, 3)).tolist() == [2.0, 1.0]
    assert torch.equal(targets.centre == 1, targets.mask.bool())
    assert targets.mask[0, 0, 10, 12] == 1  # (100.3 + 0.5) / 8 = 12.6, (80.7 + 0.5) / 8 = 10.15
    assert torch.allclose(targets.offset[0, :, 10, 12], torch.tensor([0.6, 0.15]), atol=1e-5)
    assert torch.allclose(targets.size[0, :, 10, 12], torch.tensor([7.5, 18.75]))
    people = decode_people(targets.centre, targets.size, targets.offset, max_people=3, threshold=0.5)
    assert people.boxes.shape == (2, 3, 4) and people.scores.shape == (2, 3)
    assert people.valid.tolist() == [[True, True, False], [True, False, False]]
    found = people.boxes[0, :2][people.boxes[0, :2, 0].argsort()]
    assert (found - boxes[0]).abs().max() < 1e-3
    assert (people.boxes[1, 0] - boxes[1, 0]).abs().max() < 1e-3


def test_centre_gaussians_follow_centernet():
    def published_radius(height, width, min_overlap=0.7):  # CenterNet's gaussian_radius
        b1, c1 = height + width, width * height * (1 - min_overlap) / (1 + min_overlap)
        r1 = (b1 + math.sqrt(b1**2 - 4 * c1)) / 2
        b2, c2 = 2 * (height + width), (1 - min_overlap) * width * height
        r2 = (b2 + math.sqrt(b2**2 - 16 * c2)) / 2
        a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (height + width), (min_overlap - 1) * width * height
        r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
        return min(r1, r2, r3)

    for h, w in [(18.75, 7.5), (4.0, 3.0), (30.0, 30.0)]:
        got = gaussian_radius(torch.tensor(h), torch.tensor(w)).item()
        assert math.isclose(got, published_radius(h, w), rel_tol=1e-5)
    targets = centre_targets(torch.tensor([[[100.3, 80.7, 60.0, 150.0]]]), (24, 40))
    r = int(published_radius(18.75, 7.5))
    sigma = (2 * r + 1) / 6
    row = targets.centre[0, 0, 10]
    assert torch.isclose(row[12 + 1], torch.tensor(math.exp(-1 / (2 * sigma**2))))
    assert row[12 + r] > 0 and row[12 + r + 1] == 0  # truncated outside the radius


def test_focal_loss_rewards_centres_and_reduces_the_penalty_near_them():
    targets = centre_targets(torch.tensor([[[100.0, 80.0, 60.0, 150.0]]]), (24, 40))
    perfect = torch.where(targets.centre == 1, 12.0, -12.0)
    assert focal_loss(perfect, targets.centre) < 1e-3
    assert focal_loss(torch.zeros(1, 1, 24, 40), targets.centre) > 1.0
    near, far = perfect.clone(), perfect.clone()
    near[0, 0, 10, 13] = 2.0  # a false positive next to the centre
    far[0, 0, 2, 30] = 2.0  # the same far from it
    losses = [focal_loss(logits, targets.centre) for logits in (perfect, near, far)]
    assert losses[0] < losses[1] < losses[2]
    outputs = DetectOutputs(torch.sigmoid(perfect), targets.size, targets.offset, perfect)
    losses = detect_loss(outputs, targets)
    assert losses["size"] == 0 and losses["offset"] == 0 and losses["total"] < 1e-3


# ---- losses and a tiny overfit ---------------------------------------------------------------------


def test_pose_loss_terms():
    cfg = pose_config_for("small")
    g = torch.Generator().manual_seed(6)
    coords, joints = random_coords(2, 16, 112, seed=6), torch.randn(2, 25, 3, generator=g)
    visible = torch.ones(2, 25)
    visible[1, 7] = 0
    targets = pose_targets(coords, visible, cfg, joints)
    assert torch.all(targets.joints3d[:, ROOT_JOINT] == 0) and targets.has3d.tolist() == [1.0, 1.0]
    maps = torch.zeros(2, 75, 32, 32)
    perfect = PoseOutputs(targets.heatmaps, targets.coords2d, targets.joints3d, torch.ones(2, 25), maps)
    losses = pose_loss(perfect, targets)
    assert all(losses[k] == 0 for k in ("heatmap", "coords", "joints3d", "total"))
    # an invisible joint costs nothing, wherever it is predicted
    moved = perfect._replace(coords2d=perfect.coords2d.clone(), heatmaps=perfect.heatmaps.clone())
    moved.coords2d[1, 7] += 30.0
    moved.heatmaps[1, 7] = 0.0
    assert pose_loss(moved, targets)["total"] == 0
    # a missed peak costs pi * sigma^2; a 2-pixel error costs 2 in `coords`
    empty = perfect._replace(heatmaps=torch.zeros_like(perfect.heatmaps), coords2d=perfect.coords2d + 2.0)
    losses = pose_loss(empty, targets)
    assert math.isclose(losses["heatmap"].item(), math.pi * cfg.sigma**2, rel_tol=1e-3)
    assert math.isclose(losses["coords"].item(), 2.0, rel_tol=1e-5)
    no3d = pose_targets(coords, visible, cfg)
    assert no3d.has3d.sum() == 0 and pose_loss(perfect._replace(joints3d=joints), no3d)["joints3d"] == 0


def blob_images(coords: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Images ``(N, 3, size, size)``: a blob of a joint-specific colour at each joint, on noise."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(NUM_JOINTS, 3, generator=g) * 2 - 1  # 25, 3
    blobs = gaussian_heatmaps(coords, (size, size), sigma=1.5)  # N, 25, S, S
    n = coords.shape[0]
    images = torch.matmul(colours.T, blobs.reshape(n, NUM_JOINTS, size * size))  # N, 3, S*S
    return images.reshape(n, 3, size, size) + 0.1 * torch.randn(n, 3, size, size, generator=g)


def test_tiny_model_overfits_four_crops(one_thread):
    torch.manual_seed(0)
    cfg = PoseConfig(
        stem_width=16,
        stem_blocks=1,
        widths=(16, 32),
        stage_modules=(1,),
        stage_blocks=(1,),
        detect_width=8,
        detect_widths=(8, 16),
        input_size=(64, 64),
    )
    coords = random_coords(4, 6.0, 58.0, seed=7)
    images = blob_images(coords, 64)
    joints = torch.randn(4, 25, 3, generator=torch.Generator().manual_seed(8)) * 0.3
    targets = pose_targets(coords, torch.ones(4, 25), cfg, joints)
    model = PoseEstimator(cfg)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = None
    for _ in range(150):
        losses = pose_loss(model(images), targets)
        optimiser.zero_grad()
        losses["total"].backward()
        optimiser.step()
        first = first or {k: v.item() for k, v in losses.items()}
    with torch.no_grad():
        out = model.eval()(images)
    last = pose_loss(out, targets)
    assert first["heatmap"] + first["coords"] > 5 * (last["heatmap"] + last["coords"]).item()
    assert first["joints3d"] > 5 * last["joints3d"].item()
    assert (out.coords2d - coords).norm(dim=-1).mean() < 3.0  # pixels, from ~20 at the start


def test_other_person_boxes_become_a_mask_channel(one_thread):
    boxes = torch.tensor([[1.0, 0.0, 2.5, 1.0], [float("nan")] * 4, [3.0, 0.0, 1.0, 2.0], [-9, -9, 99, 99]])
    masks = box_masks(boxes, 3, 5)
    assert masks.shape == (4, 1, 3, 5)
    assert masks[0, 0].tolist() == [[0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]]  # pixel centres inside
    assert not masks[1:3].any() and masks[3].all()  # NaN or x1 < x0: nobody; larger than the crop: all
    boxes = torch.tensor([[0.5, 1.0, 2.0, 3.0], [10.0, 0.0, 13.2, 7.0]])
    assert torch.equal(box_masks(flip_boxes(boxes, 16), 8, 16), box_masks(boxes, 8, 16).flip(-1))
    assert torch.equal(flip_boxes(flip_boxes(boxes, 16), 16), boxes)

    cfg = pose_config_for("small", other_person=True)
    model = randomise(PoseEstimator(cfg)).eval()
    assert count_parameters(model) == SMALL_PARAMETERS + 32 * 9  # one more input channel in the stem
    assert model.backbone.stem[0][0].in_channels == 4 and model.detect_backbone.stem[0][0].in_channels == 3
    x = torch.randn(2, 3, 128, 128)
    beside = torch.tensor([[70.0, 10.0, 120.0, 120.0], [float("nan")] * 4])
    with torch.no_grad():
        alone, nan, told = model(x), model(x, torch.full((2, 4), float("nan"))), model(x, beside)
    assert torch.equal(alone.heatmaps, nan.heatmaps)  # no boxes given: nobody else in any crop
    assert (told.heatmaps[0] - alone.heatmaps[0]).abs().max() > 1e-3  # the box reaches the network
    assert torch.equal(told.heatmaps[1], alone.heatmaps[1])
    with pytest.raises(ValueError, match=re.escape("other boxes must be (N, 4) for 2 crops; got (1, 4)")):
        model(x, beside[:1])
    plain = PoseEstimator(pose_config_for("small")).eval()
    with torch.no_grad():  # a model without the channel ignores the boxes
        assert torch.equal(plain(x, beside).heatmaps, plain(x).heatmaps)


def test_the_other_persons_box_tells_the_network_which_of_two_bodies_is_its_target(one_thread):
    """Two identical bodies in each crop; the target is the one outside the other-person box. Only a
    network that reads the box can fit both labellings of the same image."""
    first = random_coords(4, 6.0, 24.0, seed=11)
    first[..., 1] = first[..., 1] * 2  # y in 12-48
    second = first + torch.tensor([30.0, 8.0])
    images = blob_images(first, 64) + blob_images(second, 64, seed=0)
    images, coords = images.repeat(2, 1, 1, 1), torch.cat([first, second])
    box_of = lambda c: torch.cat([c.amin(1) - 2, c.amax(1) + 2], dim=1)  # noqa: E731
    other = torch.cat([box_of(second), box_of(first)])  # each target's other body is boxed

    def fit(other_person: bool) -> float:
        torch.manual_seed(0)
        cfg = PoseConfig(stem_width=16, stem_blocks=1, widths=(16, 32), stage_modules=(1,),
                         stage_blocks=(1,), detect_width=8, detect_widths=(8, 16), input_size=(64, 64),
                         other_person=other_person)  # fmt: skip
        model = PoseEstimator(cfg)
        targets = pose_targets(coords, torch.ones(8, 25), cfg)
        optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(150):
            loss = pose_loss(model(images, other), targets)["total"]
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            return float((model.eval()(images, other).coords2d - coords).norm(dim=-1).mean())

    told, blind = fit(True), fit(False)
    assert told < 4.0 and blind > 8.0, (told, blind)  # the bodies are 31 px apart: guessing costs ~15


# ---- images and export ------------------------------------------------------------------------------


def test_normalise_images_converts_bgr_uint8():
    bgr = np.zeros((2, 4, 6, 3), dtype=np.uint8)
    bgr[..., 0] = 255  # pure blue in OpenCV's channel order
    x = normalise_images(bgr)
    assert x.shape == (2, 3, 4, 6) and x.dtype == torch.float32
    expected = (torch.tensor([0.0, 0.0, 1.0]) - torch.tensor(IMAGE_MEAN)) / torch.tensor(IMAGE_STD)  # RGB
    assert torch.allclose(x[0, :, 0, 0], expected) and torch.allclose(x[1, :, 3, 5], expected)
    assert torch.equal(normalise_images(torch.from_numpy(bgr[0])), x[:1])  # (H, W, 3) tensors too
    with pytest.raises(ValueError, match="uint8 BGR"):
        normalise_images(bgr.astype(np.float32))
    with pytest.raises(ValueError, match=r"got torch.uint8 \(4, 6\)"):
        normalise_images(bgr[0, ..., 0])


def _export_and_compare(tmp_path, task: str, shape: tuple[int, ...], dynamo: bool) -> None:
    import onnxruntime as ort

    model = randomise(PoseEstimator(pose_config_for("small")))
    graph = PoseGraph(model.train(), task)  # the wrapper puts the model in eval mode
    path = tmp_path / f"{task}.onnx"
    names = list(EXPORT_OUTPUTS[task])
    example = torch.randn(1, *shape[1:])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(
                graph,
                (example,),
                input_names=["images"],
                output_names=names,
                opset_version=18,
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
            )
            program.save(str(path))
        else:
            torch.onnx.export(
                graph,
                (example,),
                str(path),
                input_names=["images"],
                output_names=names,
                opset_version=18,
                dynamo=False,
                dynamic_axes={name: {0: "batch"} for name in ["images", *names]},
            )
    assert not model.training  # still in eval mode once the exporter restored the wrapper's mode
    report = graph_report(path)  # raises on Einsum or a tensor above rank 4
    assert report["opset"] == 18 and report["max_intermediate_rank"] <= 4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(9))  # another batch size
    with torch.no_grad():
        expected = graph(x)
    got = session.run(names, {"images": x.numpy()})
    assert len(got) == len(expected)
    for name, want, have in zip(names, expected, got, strict=True):
        assert have.shape == tuple(want.shape), name
        assert np.abs(have - want.numpy()).max() < 1e-3, name
    assert expected[0].abs().max() > 0.1  # the comparison is not between near-zero tensors


@pytest.mark.parametrize(("task", "shape"), [("keypoints", (3, 3, 128, 128)), ("detect", (2, 3, 192, 320))])
def test_onnx_export_matches_pytorch(tmp_path, task, shape, one_thread):
    # the TorchScript exporter (dynamo=False, deprecated but present in torch 2.11-2.13) takes ~1 s;
    # the dynamo exporter works too (the slow test below) but takes 20-40 s on this machine
    _export_and_compare(tmp_path, task, shape, dynamo=False)


@pytest.mark.slow
@pytest.mark.parametrize(("task", "shape"), [("keypoints", (3, 3, 128, 128)), ("detect", (2, 3, 192, 320))])
def test_dynamo_onnx_export_matches_pytorch(tmp_path, task, shape):
    _export_and_compare(tmp_path, task, shape, dynamo=True)


def test_export_wrapper_rejects_unknown_tasks():
    with pytest.raises(ValueError, match="valid: keypoints, detect"):
        PoseGraph(PoseEstimator(pose_config_for("small")), "segment")
