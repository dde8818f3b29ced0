"""Metrics against numbers worked out by hand: CLIP score, the Fréchet distance, LPIPS-AlexNet."""

import math
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from sdd.clip import tiny_clip
from sdd.errors import UserError
from sdd.eval.lpips import LpipsAlex, load_lpips_alex, normalize_channels
from sdd.eval.metrics import ClipFid, ClipScore, Lpips, clip_score, frechet_distance, gaussian_stats
from sdd.images import resize_center_crop

ASTRONAUT = pathlib.Path(__file__).parent / "data" / "astronaut_256.png"

# ----------------------------------------------------------------------------------------------- CLIP score


def test_clip_score_by_hand():
    img = torch.tensor([[3.0, 4.0], [1.0, 0.0], [30.0, 40.0]], dtype=torch.float64)
    txt = torch.tensor([[4.0, 3.0], [-1.0, 1.0], [0.4, 0.3]], dtype=torch.float64)
    # cos = 24/25 = 0.96; cos = -1/sqrt(2); the third pair is the first, rescaled
    sdd = clip_score(img, txt)  # w = 1, no clipping: SDD's numbers
    assert sdd.tolist() == pytest.approx([0.96, -1 / math.sqrt(2), 0.96], abs=1e-12)
    hessel = clip_score(img, txt, w=2.5, clamp_at_zero=True)
    assert hessel.tolist() == pytest.approx([2.4, 0.0, 2.4], abs=1e-12)
    assert clip_score(img, txt, w=2.5).tolist()[1] == pytest.approx(-2.5 / math.sqrt(2))


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPTokenizer

    from sdd.prompts import ASSETS

    tokenizer = CLIPTokenizer.from_pretrained(str(pathlib.Path(ASSETS).parent / "clip-tokenizer"))
    return tiny_clip(image_size=32, projection_dim=16, seed=0, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(6)]


def test_clip_score_prefixes_the_prompt_and_pairs_images_with_prompts(clip, images):
    metric = ClipScore(clip)
    got = metric(images[:2], ["a cat", "a dog"])
    e_img = clip.image_embeds(images[:2])
    e_txt = clip.text_embeds(["A photo depicts a cat", "A photo depicts a dog"])
    assert torch.allclose(got, F.cosine_similarity(e_img, e_txt).double(), atol=1e-6)
    unprefixed = F.cosine_similarity(e_img, clip.text_embeds(["a cat", "a dog"])).double()
    assert not torch.allclose(got, unprefixed, atol=1e-4)
    assert metric.criterion().startswith("CLIP score = 1 x cos (no clipping) between projected image and text")
    assert "text = 'A photo depicts ' + prompt" in metric.criterion()
    assert ClipScore(clip, w=2.5, clamp_at_zero=True).criterion().startswith("CLIP score = 2.5 x max(cos, 0)")


# ------------------------------------------------------------------------------------------------------ FID


def test_frechet_distance_of_1d_and_diagonal_gaussians_by_hand():
    # 1-D: (0 - 2)^2 + 1 + 4 - 2 * 1 * 2 = 5
    one_d = frechet_distance(np.array([0.0]), np.array([[1.0]]), np.array([2.0]), np.array([[4.0]]))
    assert one_d == pytest.approx(5.0)
    # diagonal: ||mu1 - mu2||^2 + sum(s1^2 + s2^2 - 2 s1 s2) = (9 + 16) + (1 + 4 - 4) + (4 + 9 - 12) = 27
    d = frechet_distance(np.array([0.0, 1.0]), np.diag([1.0, 4.0]), np.array([3.0, -3.0]), np.diag([4.0, 9.0]))
    assert d == pytest.approx(27.0, abs=1e-9)


def test_frechet_distance_with_rotated_covariances():
    # the same rotation for both: the trace term only sees the eigenvalues, (1, 4) and (9, 1)
    c, s = math.cos(0.3), math.sin(0.3)
    rot = np.array([[c, -s], [s, c]])
    s1, s2 = rot @ np.diag([1.0, 4.0]) @ rot.T, rot @ np.diag([9.0, 1.0]) @ rot.T
    expected = (1 + 9 - 2 * 3) + (4 + 1 - 2 * 2)
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(expected, abs=1e-9)


def test_fid_from_features_and_the_few_samples_case():
    a = np.array([[0.0], [2.0], [4.0]])  # mean 2, unbiased variance 4
    b = np.array([[10.0], [11.0], [12.0]])  # mean 11, variance 1
    mu, sigma = gaussian_stats(a)
    assert mu.tolist() == [2.0] and sigma.tolist() == 4.0  # np.cov of one column is a 0-d array
    assert frechet_distance(*gaussian_stats(a), *gaussian_stats(b)) == pytest.approx(81 + 4 + 1 - 2 * 2)
    few = np.random.default_rng(0).normal(size=(5, 20))  # fewer samples than dimensions: singular covariances
    d = frechet_distance(*gaussian_stats(few), *gaussian_stats(few + 1.0))
    assert math.isfinite(d) and d == pytest.approx(20.0, abs=1e-3)  # a pure shift of 1 in 20 dimensions
    with pytest.raises(UserError, match="at least 2 feature vectors"):
        gaussian_stats(np.zeros((1, 4)))


def test_clip_fid_is_zero_on_the_same_images_and_names_its_features(clip, images):
    fid = ClipFid(clip)
    same = fid(images[:3], images[:3])
    assert abs(same) < 1e-6
    assert fid(images[:3], images[3:]) > 1e-3
    text = fid.criterion()
    assert "Frechet distance" in text and "tiny random CLIP (seed 0)" in text and "32 px" in text
    assert "not Inception FID" in text


# ---------------------------------------------------------------------------------------------------- LPIPS


def random_lpips_weights(path, seed=0, drop=None, classifier=False):
    torch.manual_seed(seed)
    net = LpipsAlex()
    tensors = {}
    for k, v in net.state_dict().items():
        w = torch.randn_like(v) * 0.1
        tensors[k] = w.abs() if k.startswith("lin") else w  # learned heads are non-negative
    if drop:
        tensors.pop(drop)
    if classifier:
        tensors["classifier.1.weight"] = torch.zeros(4, 9216)
    save_file(tensors, str(path))
    return tensors


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lpips") / "lpips_alex.safetensors"
    random_lpips_weights(path)
    return path


def test_lpips_zero_for_identical_symmetric_and_positive(lpips_file, images):
    metric = Lpips.from_file(lpips_file, size=64)
    a, b = images[:3], images[3:]
    assert metric(a, a).abs().max().item() < 1e-7
    ab, ba = metric(a, b), metric(b, a)
    assert torch.allclose(ab, ba, rtol=1e-5) and (ab > 0).all()
    photo = Image.open(ASTRONAUT)
    assert metric([str(ASTRONAUT)], [photo]).item() < 1e-7  # a path and the same image in memory


def test_lpips_matches_the_formula_worked_out_for_one_layer(tmp_path):
    # only lin0 non-zero: d = mean_hw sum_c w_c (n0 - n1)^2, n = relu1 / ||relu1||_c
    tensors = random_lpips_weights(tmp_path / "w.safetensors")
    for i in range(1, 5):
        tensors[f"lin{i}.model.1.weight"].zero_()
    save_file(tensors, str(tmp_path / "w.safetensors"))
    net = load_lpips_alex(tmp_path / "w.safetensors")
    x0, x1 = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def relu1(x):
        w, b = tensors["features.0.weight"], tensors["features.0.bias"]
        return F.relu(F.conv2d((x - shift) / scale, w, b, stride=4, padding=2))

    f0, f1 = relu1(x0), relu1(x1)
    n0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    n1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    w = tensors["lin0.model.1.weight"].view(1, 64, 1, 1)
    expected = ((n0 - n1) ** 2 * w).sum(1).mean(dim=(1, 2))
    assert torch.allclose(net(x0, x1), expected, rtol=1e-5, atol=1e-7)
    f = torch.randn(1, 8, 3, 3)
    assert torch.allclose(normalize_channels(f).pow(2).sum(1), torch.ones(1, 3, 3), atol=1e-6)


def test_lpips_weights_errors_name_the_file_and_key(tmp_path):
    random_lpips_weights(tmp_path / "missing.safetensors", drop="lin3.model.1.weight")
    missing = "missing.safetensors: LPIPS-AlexNet weights missing 1 key\\(s\\): lin3.model.1.weight"
    with pytest.raises(UserError, match=missing):
        load_lpips_alex(tmp_path / "missing.safetensors")
    tensors = random_lpips_weights(tmp_path / "shape.safetensors")
    tensors["features.3.weight"] = torch.zeros(192, 64, 3, 3)
    save_file(tensors, str(tmp_path / "shape.safetensors"))
    wrong = "key 'features.3.weight' has shape \\(192, 64, 3, 3\\), expected \\(192, 64, 5, 5\\)"
    with pytest.raises(UserError, match=wrong):
        load_lpips_alex(tmp_path / "shape.safetensors")
    with pytest.raises(UserError, match="alex.pth: LPIPS weights must be a .safetensors file"):
        (tmp_path / "alex.pth").write_bytes(b"x")
        load_lpips_alex(tmp_path / "alex.pth")
    with pytest.raises(UserError, match="nowhere.safetensors: no such LPIPS weights file"):
        load_lpips_alex(tmp_path / "nowhere.safetensors")
    random_lpips_weights(tmp_path / "full_alexnet.safetensors", classifier=True)  # AlexNet's classifier is ignored
    assert isinstance(load_lpips_alex(tmp_path / "full_alexnet.safetensors"), LpipsAlex)


def test_lpips_resizes_shorter_side_then_centre_crops(lpips_file):
    wide = Image.new("RGB", (100, 80))
    wide.paste((255, 255, 255), (0, 0, 5, 80))  # left edge: 100x80 -> 80x64, x 0..4, outside the crop x 8..72
    crop = resize_center_crop(wide, 64, "bicubic")
    assert crop.size == (64, 64) and np.asarray(crop).max() == 0
    wide.paste((255, 255, 255), (45, 0, 55, 80))  # the centre strip stays
    assert np.asarray(resize_center_crop(wide, 64, "bicubic")).max() == 255
    metric = Lpips.protocol(lpips_file, "esd")
    assert (metric.size, metric.resample) == (64, "bilinear")
    x = metric.prepare([Image.new("RGB", (300, 200), (255, 0, 0))])
    assert x.shape == (1, 3, 64, 64) and x[0, 0].min() == 1.0 and x[0, 1].max() == -1.0
    text = Lpips.protocol(lpips_file, "sdd").criterion()
    assert "resized (bicubic, shorter side) and centre-cropped to 256 px, scaled to [-1, 1]" in text
    assert "LPIPS v0.1, AlexNet backbone" in text and str(lpips_file) in text


def test_models_load_from_a_folder_and_a_bad_path_is_one_line(tmp_path, clip, images):
    from sdd.clip import ClipEncoder
    from sdd.detectors import Q16

    folder = tmp_path / "clip"
    clip.model.save_pretrained(folder)
    clip.image_processor.save_pretrained(folder)
    clip.tokenizer.save_pretrained(folder)
    loaded = ClipEncoder.from_pretrained(str(folder))
    assert torch.allclose(loaded.image_embeds(images[:2]), clip.image_embeds(images[:2]), atol=1e-6)
    assert ClipScore.from_pretrained(str(folder))(images[:1], ["a cat"]).shape == (1,)
    np.save(tmp_path / "q16.npy", np.zeros((2, 16), np.float32) + np.eye(2, 16, dtype=np.float32))
    q16 = Q16.from_pretrained(str(tmp_path / "q16.npy"), str(folder))
    assert "from " + str(tmp_path / "q16.npy") in q16.criterion()
    with pytest.raises(UserError) as err:
        ClipEncoder.from_pretrained(str(tmp_path / "no-such-model"))
    assert str(err.value) == f"CLIP model '{tmp_path / 'no-such-model'}': no such model folder"
    with pytest.raises(UserError) as err:
        ClipEncoder.from_pretrained(str(tmp_path))  # a folder without a model
    assert str(err.value).startswith(f"CLIP model '{tmp_path}': cannot load it (") and "\n" not in str(err.value)
