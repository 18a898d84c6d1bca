import io

import pytest
import torch
from torch.nn import functional as F

from valleys.data.loader import Augment, BatchStream, eval_batches

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def toy(n=50, shape=(1, 6, 6), device="cpu"):
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
    return x.to(device), torch.arange(n, device=device)


def test_shuffle_visits_every_sample_once_per_epoch():
    x, y = toy(50)
    s = BatchStream(x, y, 8, seed=1, drop_last=False)
    assert s.batches_per_epoch == 7
    seen = torch.cat([s.next()[1] for _ in range(7)])
    assert sorted(seen.tolist()) == list(range(50)) and s.epochs == 1.0
    second = torch.cat([s.next()[1] for _ in range(7)])
    assert sorted(second.tolist()) == list(range(50)) and not torch.equal(seen, second)
    assert s.epoch == 2 and s.samples_drawn == 100


def test_drop_last_and_batches_match_indices():
    x, y = toy(50)
    s = BatchStream(x, y, 8, seed=1)
    assert s.batches_per_epoch == 6
    first = [s.next() for _ in range(6)]
    for xb, yb in first:
        assert xb.shape == (8, 1, 6, 6) and torch.equal(xb, x[yb])
    assert len(set(torch.cat([b[1] for b in first]).tolist())) == 48
    s.next()  # the 2 left over are dropped: a new permutation starts
    assert s.epoch == 2 and s.samples_drawn == 56 and s.epochs == 56 / 50


def test_same_seed_same_batches_other_seed_other_batches():
    x, y = toy()
    a, b, c = (BatchStream(x, y, 5, seed=s) for s in (3, 3, 4))
    ya = [a.next()[1] for _ in range(12)]
    assert all(torch.equal(p, b.next()[1]) for p in ya)
    assert not all(torch.equal(p, c.next()[1]) for p in ya)


def test_replacement_sampling():
    x, y = toy(10)
    s = BatchStream(x, y, 64, sampling="replacement", seed=0)
    xb, yb = s.next()
    assert yb.shape == (64,) and torch.equal(xb, x[yb])
    assert len(set(yb.tolist())) < 64  # with replacement: repeats
    assert s.epochs == 6.4


def roundtrip(state):
    """Through torch.save/torch.load(weights_only=True), as a checkpoint would."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampling", ["shuffle", "replacement"])
@pytest.mark.parametrize("augment", [False, True])
def test_resume_is_bit_identical(sampling, augment, device):
    x, y = toy(50, (3, 8, 8), device)

    def make(seed):
        aug = Augment(pad=2, flip=True, seed=seed) if augment else None
        return BatchStream(x, y, 8, seed=seed, sampling=sampling, augment=aug)

    s = make(7)
    for _ in range(9):  # past an epoch boundary
        s.next()
    state = roundtrip(s.state_dict())
    expected = [s.next() for _ in range(10)]
    resumed = make(12345)  # other seeds: everything must come from the state
    resumed.load_state_dict(state)
    for xb, yb in expected:
        xr, yr = resumed.next()
        assert torch.equal(xb, xr) and torch.equal(yb, yr)
    assert resumed.samples_drawn == s.samples_drawn and resumed.epoch == s.epoch


def test_state_from_a_different_stream_is_refused():
    x, y = toy(50)
    state = BatchStream(x, y, 8).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(x, y, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="sampling"):
        BatchStream(x, y, 8, sampling="replacement").load_state_dict(state)
    with pytest.raises(ValueError, match="augment"):
        BatchStream(x, y, 8, augment=Augment()).load_state_dict(state)


def reference_augment(x, pad, flip, seed, fill=0.0):
    """Per-sample loop with F.pad and slicing, drawing the same random numbers."""
    dev = x.device
    g = torch.Generator(device=dev).manual_seed(seed)
    b, _, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=g, device=dev) if pad else None
    bits = (
        torch.randint(0, 2, (b, 1, 1, 1), generator=g, device=dev, dtype=torch.bool)
        if flip
        else None
    )
    out = []
    for i in range(b):
        img = x[i]
        if pad:
            img = F.pad(img, (pad, pad, pad, pad), value=fill)
            r, s = int(offsets[0, i]), int(offsets[1, i])
            img = img[:, r : r + h, s : s + w]
        if flip and bool(bits[i]):
            img = img.flip(2)
        out.append(img)
    return torch.stack(out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("pad", "flip"), [(4, True), (3, False), (0, True), (0, False)])
def test_augment_matches_a_per_sample_reference(pad, flip, device):
    x = torch.randn(32, 3, 10, 12, device=device)
    got = Augment(pad=pad, flip=flip, seed=5)(x)
    assert got.shape == x.shape
    assert torch.equal(got, reference_augment(x, pad, flip, seed=5))


def test_augment_fill_per_channel_and_statistics():
    x = torch.ones(400, 2, 5, 5)
    a = Augment(pad=2, flip=False, fill=(-1.0, -2.0))
    out = a(x)
    vals0, vals1 = set(out[:, 0].unique().tolist()), set(out[:, 1].unique().tolist())
    assert vals0 == {1.0, -1.0} and vals1 == {1.0, -2.0}
    # the offsets cover 0..2·pad: some crops are exactly the original
    untouched = (out == 1).flatten(1).all(1).float().mean()
    assert 0.0 < float(untouched) < 0.2  # 1/25 expected
    ramp = torch.arange(5.0).expand(1000, 1, 5, 5)
    flipped = (Augment(pad=0, flip=True)(ramp)[:, 0, 0, 0] == 4).float().mean()
    assert 0.4 < float(flipped) < 0.6


def test_augment_state_roundtrip_and_errors():
    x = torch.randn(16, 1, 6, 6)
    a = Augment(pad=1, seed=2)
    a(x)
    state = roundtrip(a.state_dict())
    expected = a(x)
    b = Augment(pad=1, seed=9)
    b.load_state_dict(state)
    assert torch.equal(b(x), expected)
    with pytest.raises(ValueError, match="pad"):
        Augment(pad=2).load_state_dict(state)
    with pytest.raises(ValueError, match="Invalid batch"):
        a(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="Invalid fill"):
        Augment(pad=1, fill=(0.0, 1.0))(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="Invalid pad"):
        Augment(pad=-1)


def test_eval_batches_in_order_without_drop():
    x, y = toy(10)
    batches = list(eval_batches(x, y, 4))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    with pytest.raises(ValueError, match="Invalid batch_size"):
        eval_batches(x, y, 0)


def test_stream_argument_checks():
    x, y = toy(10)
    with pytest.raises(ValueError, match="Invalid sampling"):
        BatchStream(x, y, 2, sampling="sequential")
    with pytest.raises(ValueError, match="Invalid batch_size"):
        BatchStream(x, y, 11)
    with pytest.raises(ValueError, match="same number of rows"):
        BatchStream(x, y[:9], 2)
    s = BatchStream(x, y, 11, drop_last=False)
    assert len(s.next()[1]) == 10
    assert iter(s) is s and len(next(s)[1]) == 10
