"""BatchedPredictor (service/predictor.py): one forward pass per list of work items. No Ray, no HTTP.

Runs against `tiny_bundle` / `tiny_bundle_tta` from conftest.py: a small untrained ConvServeNet saved
and reloaded as a real bundle, so these tests do not wait for the shipped model to be trained.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from model.layers import capture
from service.decode import decode_image_bytes
from service.predictor import BatchedPredictor, ItemError, ItemResult, WorkItem, default_warmup_sizes

N_IMAGES = 8
SCORE_TOL = 1e-4


def _fixture_jpegs(sample_dir: Path, n: int) -> list[bytes]:
    """n fixture JPEGs, one class after the other (the first file of each class, then the second, ...)."""
    classes = sorted(p for p in sample_dir.iterdir() if p.is_dir())
    files = [sorted(c.glob("*.jpg")) for c in classes]
    return [files[i % len(classes)][i // len(classes)].read_bytes() for i in range(n)]


@pytest.fixture(scope="module")
def images(sample_dir: Path, tiny_bundle) -> list[torch.Tensor]:
    """N real CIFAR-10 JPEGs, decoded and preprocessed exactly as the service does it."""
    if not sample_dir.is_dir():
        pytest.skip(f"{sample_dir} missing (see tests/fixtures/README.md)")
    jpegs = _fixture_jpegs(sample_dir, N_IMAGES)
    out = [tiny_bundle.preprocess(decode_image_bytes(data, 10**6)) for data in jpegs]
    assert all(x.dtype == torch.float32 and tuple(x.shape) == (3, 32, 32) for x in out)
    return out


@pytest.fixture(scope="module")
def predictor(tiny_bundle) -> BatchedPredictor:
    return BatchedPredictor(tiny_bundle, device="cpu")


@pytest.fixture(scope="module")
def predictor_tta(tiny_bundle_tta) -> BatchedPredictor:
    return BatchedPredictor(tiny_bundle_tta, device="cpu")


def _single(predictor: BatchedPredictor, item: WorkItem) -> ItemResult:
    (result,) = predictor.predict([item])
    assert isinstance(result, ItemResult), result
    return result


def _assert_same_predictions(got: ItemResult, want: ItemResult) -> None:
    assert [p.label for p in got.predictions] == [p.label for p in want.predictions]
    assert [p.index for p in got.predictions] == [p.index for p in want.predictions]
    for a, b in zip(got.predictions, want.predictions, strict=True):
        assert a.score == pytest.approx(b.score, abs=SCORE_TOL)


def _assert_same_maps(got: ItemResult, want: ItemResult) -> None:
    assert set(got.feature_maps) == set(want.feature_maps)
    for name, fmap in got.feature_maps.items():
        torch.testing.assert_close(fmap, want.feature_maps[name], atol=1e-4, rtol=1e-4)


#############################################
#        Batches equal single calls         #
#############################################


def test_batch_equals_single_calls(predictor, images):
    batch = predictor.predict([WorkItem(x, top_k=5) for x in images])
    assert len(batch) == len(images)
    for x, got in zip(images, batch, strict=True):
        assert isinstance(got, ItemResult)
        assert got.batch_size == len(images)
        assert got.feature_maps == {}
        want = _single(predictor, WorkItem(x, top_k=5))
        assert want.batch_size == 1
        _assert_same_predictions(got, want)


def test_scores_equal_an_independent_forward_pass(predictor, tiny_bundle, images):
    """The predictor's top-k is softmax(model(x)).topk: the right image, the right row, the right labels."""
    with torch.inference_mode():
        probs = torch.softmax(tiny_bundle.model(torch.stack(images)).float(), dim=1)
    scores, indices = probs.topk(10, dim=1)
    results = predictor.predict([WorkItem(x, top_k=10) for x in images])
    for row, result in enumerate(results):
        assert [p.index for p in result.predictions] == indices[row].tolist()
        assert [p.label for p in result.predictions] == [tiny_bundle.labels[j] for j in indices[row].tolist()]
        for p, s in zip(result.predictions, scores[row].tolist(), strict=True):
            assert p.score == pytest.approx(s, abs=1e-5)


def test_results_come_back_in_order(predictor, images):
    """Reversing the batch reverses the results: nothing is matched up by position by accident."""
    forward = predictor.predict([WorkItem(x, top_k=10) for x in images])
    backward = predictor.predict([WorkItem(x, top_k=10) for x in reversed(images)])
    for a, b in zip(forward, reversed(backward), strict=True):
        _assert_same_predictions(a, b)
    # The images differ, so their score vectors do too (otherwise the test above proves nothing).
    assert len({tuple(round(p.score, 4) for p in r.predictions) for r in forward}) == len(images)


#############################################
#               top_k per item              #
#############################################


def test_top_k_per_item_in_a_mixed_batch(predictor, images):
    ks = [1, 3, 10, 1, 3, 10, 5, 2]
    results = predictor.predict([WorkItem(x, top_k=k) for x, k in zip(images, ks, strict=True)])
    full = predictor.predict([WorkItem(x, top_k=10) for x in images])
    for k, result, everything in zip(ks, results, full, strict=True):
        assert isinstance(result, ItemResult)
        assert len(result.predictions) == k
        scores = [p.score for p in result.predictions]
        assert scores == sorted(scores, reverse=True)
        assert all(0.0 <= s <= 1.0 for s in scores)
        assert sum(scores) <= 1.0 + 1e-6
        # An item's top-k is the first k of its full ranking, whatever the other items asked for.
        assert [p.index for p in result.predictions] == [p.index for p in everything.predictions[:k]]
    for everything in full:
        assert len({p.index for p in everything.predictions}) == 10
        assert math.fsum(p.score for p in everything.predictions) == pytest.approx(1.0, abs=1e-5)


def test_top_k_larger_than_num_classes_is_capped(predictor, images):
    (result,) = predictor.predict([WorkItem(images[0], top_k=50)])
    assert len(result.predictions) == 10


#############################################
#               Feature maps                #
#############################################


def test_feature_maps_only_for_items_that_asked(predictor, tiny_bundle, images):
    asked = [("stage1", "stage3"), (), ("stage3",), (), ("stage1",), ("stage3", "stage1"), (), ("stage1", "stage3")]
    results = predictor.predict([WorkItem(x, top_k=3, layers=layers) for x, layers in zip(images, asked, strict=True)])
    for x, layers, result in zip(images, asked, results, strict=True):
        assert isinstance(result, ItemResult)
        assert set(result.feature_maps) == set(layers)
        for name, fmap in result.feature_maps.items():
            assert tuple(fmap.shape) == tuple(tiny_bundle.layer(name).shape)
            assert fmap.dtype == torch.float32 and fmap.device.type == "cpu"
        # The maps belong to this item's image: they equal what a single call returns for it.
        want = _single(predictor, WorkItem(x, top_k=3, layers=layers))
        _assert_same_maps(result, want)
        _assert_same_predictions(result, want)


def test_every_layer_has_the_shape_the_bundle_describes(predictor, tiny_bundle, images):
    names = tuple(info.name for info in tiny_bundle.layers)
    assert names == ("stem", "stage1", "stage2", "stage3", "pool", "head")
    results = predictor.predict([WorkItem(x, layers=names) for x in images[:2]])
    for result in results:
        assert {n: tuple(m.shape) for n, m in result.feature_maps.items()} == {
            info.name: tuple(info.shape) for info in tiny_bundle.layers
        }
        # The "head" map is the logits: its softmax gives the item's scores.
        probs = torch.softmax(result.feature_maps["head"], dim=0)
        assert result.predictions[0].score == pytest.approx(probs.max().item(), abs=1e-5)


def test_uint8_items_are_normalised_by_the_predictor_alone_or_mixed_with_float_items(
    predictor, sample_dir, tiny_bundle
):
    """What the ingress hands over is uint8 at model size (a quarter of float32's bytes); the
    predictor normalises it, a batch at a time: same answers as the float32 item, and a batch
    that mixes both (a V2 FP32 input next to decoded images) too."""
    jpegs = _fixture_jpegs(sample_dir, 4)
    raw = [tiny_bundle.preprocess.to_model_size(decode_image_bytes(data, 10**6)) for data in jpegs]
    assert all(x.dtype == torch.uint8 for x in raw)
    floats = [tiny_bundle.preprocess.normalize(x) for x in raw]
    want = [_single(predictor, WorkItem(x, top_k=3, layers=("stage1",))) for x in floats]
    all_uint8 = predictor.predict([WorkItem(x, top_k=3, layers=("stage1",)) for x in raw])
    mixed = predictor.predict(
        [
            WorkItem(x if i % 2 else f, top_k=3, layers=("stage1",))
            for i, (x, f) in enumerate(zip(raw, floats, strict=True))
        ]
    )
    for got in (all_uint8, mixed):
        for result, expected in zip(got, want, strict=True):
            assert isinstance(result, ItemResult) and result.batch_size == 4
            _assert_same_predictions(result, expected)
            _assert_same_maps(result, expected)


#############################################
#                 Bad items                 #
#############################################


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(torch.zeros(3, 31, 31), id="wrong-size"),
        pytest.param(torch.zeros(3, 32, 32, dtype=torch.float64), id="float64"),
        pytest.param(torch.zeros(32, 32, 3), id="channels-last-layout"),
        pytest.param(torch.zeros(1, 3, 32, 32), id="batched"),
        pytest.param(torch.zeros(3, 32, 32, dtype=torch.int16), id="int16"),
        pytest.param(torch.zeros(3, 31, 31, dtype=torch.uint8), id="uint8-wrong-size"),
    ],
)
def test_a_bad_item_fails_alone(predictor, images, bad):
    good = images[:3]
    items = [WorkItem(good[0], top_k=3, layers=("stage1",)), WorkItem(bad, layers=("stage3",))]
    items += [WorkItem(x, top_k=3) for x in good[1:]]
    results = predictor.predict(items)
    assert len(results) == len(items)
    error = results[1]
    assert isinstance(error, ItemError)
    assert (error.status, error.code) == (400, "invalid_input")
    assert str(tuple(bad.shape)) in error.message
    for item, result in zip([items[0], *items[2:]], [results[0], *results[2:]], strict=True):
        assert isinstance(result, ItemResult)
        want = _single(predictor, item)
        _assert_same_predictions(result, want)
        _assert_same_maps(result, want)
        assert result.batch_size == len(good)  # the bad item did not take a place in the forward pass
    assert set(results[0].feature_maps) == {"stage1"}  # only the bad item asked for stage3


def test_all_bad_items_and_empty_batches(predictor):
    assert predictor.predict([]) == []
    results = predictor.predict([WorkItem(torch.zeros(3, 16, 16)), WorkItem(torch.zeros(3, 32, 32).double())])
    assert all(isinstance(r, ItemError) and r.status == 400 for r in results)


#############################################
#        A model with test-time flips       #
#############################################


def test_tta_model_matches_single_calls_and_keeps_map_shapes(predictor_tta, tiny_bundle_tta, images):
    assert tiny_bundle_tta.model.tta_flip
    asked = [("stage1", "stage3"), (), ("stem", "head")] * 3
    items = [WorkItem(x, top_k=4, layers=layers) for x, layers in zip(images, asked, strict=False)]
    results = predictor_tta.predict(items)
    assert len(results) == len(items)
    for item, result in zip(items, results, strict=True):
        assert isinstance(result, ItemResult)
        assert set(result.feature_maps) == set(item.layers)
        for name, fmap in result.feature_maps.items():
            assert tuple(fmap.shape) == tuple(tiny_bundle_tta.layer(name).shape)  # N of the 2N, per item
        want = _single(predictor_tta, item)
        _assert_same_predictions(result, want)
        _assert_same_maps(result, want)


def test_tta_scores_average_both_views_and_maps_are_the_originals(predictor_tta, tiny_bundle, images):
    """Same weights as tiny_bundle (same seed), flip on: logits are the mean over x and flip(x);
    the feature maps are those of the unflipped image."""
    plain = copy.deepcopy(tiny_bundle.model).float().eval()
    tta_state = predictor_tta.model.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, tta_state[key]), key  # both fixtures built the same network
    batch = torch.stack(images)
    with torch.inference_mode():
        logits_x, maps = capture(plain, ["stage1", "stage3"], batch)
        logits_flip = plain(batch.flip(-1))
    probs = torch.softmax(0.5 * (logits_x + logits_flip), dim=1)
    results = predictor_tta.predict([WorkItem(x, top_k=10, layers=("stage1", "stage3")) for x in images])
    for row, result in enumerate(results):
        for p in result.predictions:
            assert p.score == pytest.approx(probs[row, p.index].item(), abs=1e-5)
        torch.testing.assert_close(result.feature_maps["stage1"], maps["stage1"][row], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(result.feature_maps["stage3"], maps["stage3"][row], atol=1e-4, rtol=1e-4)


#############################################
#           Warm-up and health              #
#############################################


def test_warmup_times_each_requested_size(predictor):
    timings = predictor.warmup([1, 2, 4])
    assert list(timings) == [1, 2, 4]
    assert all(isinstance(t, float) and t > 0 for t in timings.values())


def test_check_health_passes_for_a_sound_model(predictor):
    predictor.check_health()


def test_check_health_fails_for_a_model_producing_nan(tiny_bundle):
    broken_model = copy.deepcopy(tiny_bundle.model)
    with torch.no_grad():
        broken_model.head.linear.weight.fill_(float("nan"))
    broken = BatchedPredictor(dataclasses.replace(tiny_bundle, model=broken_model), device="cpu")
    with pytest.raises(RuntimeError, match="health check"):
        broken.check_health()


@pytest.mark.parametrize(
    ("max_batch_size", "sizes"),
    [(32, [1, 2, 4, 8, 16, 32]), (24, [1, 2, 4, 8, 16, 24]), (1, [1]), (2, [1, 2]), (3, [1, 2, 3])],
)
def test_default_warmup_sizes(max_batch_size, sizes):
    assert default_warmup_sizes(max_batch_size) == sizes


def test_every_batch_size_is_warmed_where_kernels_are_chosen_per_shape():
    assert default_warmup_sizes(5, every_size=True) == [1, 2, 3, 4, 5]


def test_passes_side_by_side_keep_their_own_feature_maps(predictor, tiny_bundle, images):
    """Two lanes run the same model at once (service/lanes.py): each pass gets the maps of its own
    images and layers, never the other thread's."""
    from concurrent.futures import ThreadPoolExecutor

    names = [info.name for info in tiny_bundle.layers if len(info.shape) == 3]
    jobs = [(images[i % len(images)], (names[i % len(names)],)) for i in range(24)]
    want = [_single(predictor, WorkItem(img, top_k=3, layers=layers)) for img, layers in jobs]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda job: _single(predictor, WorkItem(job[0], top_k=3, layers=job[1])), jobs))
    for g, w, (_, layers) in zip(got, want, jobs, strict=True):
        assert set(g.feature_maps) == set(layers)
        _assert_same_predictions(g, w)
        _assert_same_maps(g, w)


def test_the_deployment_health_check_fails_once_the_model_gives_no_valid_scores(tmp_path):
    """ConvServe.check_health, the hook Serve calls every health_check_period_s: it passes on a
    sound model and raises once the weights hold NaN, after which Serve marks the replica
    unhealthy and replaces it (Serve's contract; a killed replica being replaced is tested in
    tests/test_reliability.py). The deployment class itself, without Ray."""
    import asyncio

    from service.app import ConvServe
    from tests.conftest import _make_tiny_bundle

    _make_tiny_bundle(tmp_path / "bundle", tta_flip=False)
    config = {"bundle_path": str(tmp_path / "bundle"), "device": "cpu", "admission_batches": 0}
    # serve.ingress wraps our class in one with an async constructor; ours is among its bases
    ours = next(cls for cls in ConvServe.func_or_class.__mro__ if "check_health" in vars(cls))
    replica = ours({**config, "warmup_batch_sizes": [1]})
    asyncio.run(replica.check_health())
    with torch.no_grad():
        next(replica.predictor.model.parameters()).fill_(float("nan"))
    with pytest.raises(RuntimeError, match="no valid scores"):
        asyncio.run(replica.check_health())


#############################################
#     Encoded JPEGs: decoded with the batch #
#############################################

PAYLOADS = Path(__file__).resolve().parent.parent / "loadtests" / "payloads"


def test_encoded_jpegs_are_decoded_with_their_batch_and_a_bad_one_fails_alone(predictor, tiny_bundle, sample_dir):
    """Items that arrive encoded (the model-side decode, service/gpu_decode.py; here on the CPU
    device) get the answers of the same images decoded by the ingress; a corrupt JPEG among them
    gets the CPU path's 400 and takes no place in the batch; a CMYK-free PNG sent as encoded
    goes through the CPU decoder alone."""
    photos = [(PAYLOADS / name).read_bytes() for name in ("photo-ship-640x480.jpg", "photo-horse-1280x960.jpg")]
    jpegs = photos + _fixture_jpegs(sample_dir, 2)
    png = (PAYLOADS / "photo-cat-224x224.png").read_bytes()
    preset = tiny_bundle.preprocess
    want = [_single(predictor, WorkItem(preset.to_model_size(decode_image_bytes(d, 10**8)), top_k=3)) for d in jpegs]
    want_png = _single(predictor, WorkItem(preset.to_model_size(decode_image_bytes(png, 10**8)), top_k=3))
    corrupt = photos[0][: len(photos[0]) // 2]
    items = [WorkItem(None, top_k=3, encoded=d) for d in jpegs]
    items.insert(1, WorkItem(None, top_k=3, encoded=corrupt))
    items.append(WorkItem(None, top_k=3, encoded=png))
    results = predictor.predict(items)
    assert isinstance(results[1], ItemError) and (results[1].status, results[1].code) == (400, "invalid_image")
    good = [r for i, r in enumerate(results) if i != 1]
    for got, expected in zip(good, [*want, want_png], strict=True):
        assert isinstance(got, ItemResult) and got.batch_size == len(jpegs) + 1
        _assert_same_predictions(got, expected)


def test_the_model_side_decode_warm_up_decodes_its_jpeg_on_the_batch_path(predictor):
    """The CUDA replica warms nvjpeg up with one JPEG at start (ModelBatcher); here on the CPU
    device the same call must take the batch path, not fall back to the per-image CPU decoder."""
    from service import gpu_decode

    before = gpu_decode.FALLBACKS.copy()
    predictor.warmup_decode()
    assert gpu_decode.FALLBACKS == before


# --- CPU precision (cpu_amp_dtype) ------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_and_fixtures(sample_dir: Path) -> tuple:
    """The shipped bundle and the 200 fixture images, normalised by its preset."""
    import model
    from model.bundle import load_bundle
    from model.data import load_image_folder

    bundle = load_bundle(model.DEFAULT_BUNDLE)
    data = load_image_folder(sample_dir, bundle.preprocess, classes=bundle.labels)
    return bundle, list(bundle.preprocess.normalize(data.images))


def _class_scores(predictor: BatchedPredictor, images: list[torch.Tensor], batch: int = 50) -> torch.Tensor:
    """[N, classes] probabilities in class order, with the stem's feature maps checked on the way."""
    rows = []
    for i in range(0, len(images), batch):
        for r in predictor.predict([WorkItem(x, top_k=10, layers=["stem"]) for x in images[i : i + batch]]):
            assert isinstance(r, ItemResult) and r.feature_maps["stem"].dtype == torch.float32
            row = torch.zeros(len(r.predictions))
            for p in r.predictions:
                row[p.index] = p.score
            rows.append(row)
    return torch.stack(rows)


def test_a_cpu_predictor_runs_float32_unless_the_settings_ask_for_bf16(shipped_and_fixtures):
    from service.batcher import make_predictor
    from service.config import ServeConfig

    bundle, _ = shipped_and_fixtures
    assert BatchedPredictor(bundle, device="cpu").amp_dtype is None
    assert make_predictor(ServeConfig(device="cpu"), bundle).amp_dtype is None
    bf16 = ServeConfig.from_env({"device": "cpu"}, environ={"CONVSERVE_CPU_AMP_DTYPE": "bf16"})
    assert make_predictor(bf16, bundle).amp_dtype is torch.bfloat16
    with pytest.raises(ValueError):
        ServeConfig(cpu_amp_dtype="fp16")  # no fp16 autocast on a CPU


def test_bf16_on_a_cpu_moves_scores_a_little_and_keeps_the_answers(shipped_and_fixtures):
    """The shipped model on the 200 fixtures: bf16 autocast against the float32 reference. On the
    1,000 validation images (README, "CPU precision"): top-1 agreement 0.998, largest score
    difference 0.07."""
    bundle, images = shipped_and_fixtures
    reference = _class_scores(BatchedPredictor(bundle, device="cpu"), images)
    bf16 = _class_scores(BatchedPredictor(bundle, device="cpu", cpu_amp_dtype="bf16"), images)
    diff = (bf16 - reference).abs().max().item()
    agree = (bf16.argmax(1) == reference.argmax(1)).float().mean().item()
    assert 0 < diff < 0.1, diff  # computed in bf16 (not identical), close to float32
    assert agree >= 0.97, agree
