"""KnockoffGAN: training lowers the swap discriminator's advantage, checkpoints resume exactly,
and bad checkpoints fail with a clear error."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from scop_ext.data import digits
from scop_ext.knockoffs import ExternalKnockoffs, GaussianKnockoffs, KnockoffGAN
from scop_ext.knockoffs.exchangeability import power
from scop_ext.knockoffs.quality import sample_batched
from scop_ext.knockoffs.swap import swap_advantage
from scop_ext.knockoffs.gan_trainer import CHECKPOINT_KIND
from tests.knockoffs.test_knockoffs import MAX_MEAN_CORR


def tiny_gan(**kwargs) -> KnockoffGAN:
    config = {"width": 16, "batch_size": 64, "seed": 0, "checkpoint_every": 40}
    return KnockoffGAN(**{**config, **kwargs})


@pytest.fixture(scope="module")
def loader():
    return DataLoader(digits("train"), batch_size=256)  # no shuffling: resuming needs the same order


class Interrupt(Exception):
    pass


def stop_at(iteration: int):
    def callback(done, losses):
        assert set(losses) == {"d", "swap", "decor", "moments"}
        if done == iteration:
            raise Interrupt

    return callback


def swap_test_failures(x: torch.Tensor, xk: torch.Tensor, start: dict) -> list[str]:
    """The checks a trained GAN must pass: a fresh discriminator's advantage under half its
    advantage on the untrained G, and power (mean correlation under MAX_MEAN_CORR)."""
    end = swap_advantage(x, xk, block=2, steps=300, width=16, seed=0)
    assert end["advantage"] > -5 * end["stderr"]  # a discriminator cannot do worse than chance
    failures = [] if end["advantage"] < start["advantage"] / 2 else ["swap advantage"]
    return failures + ([] if power(x, xk) < MAX_MEAN_CORR else ["power"])


def test_training_lowers_swap_advantage(one_thread, loader):
    """Advantage = held-out accuracy - 1/2 of a *fresh* swap discriminator (300 Adam steps on
    half of the 1,347 digits, scored on the unrevealed blocks of the other half under 8 swap
    patterns: ~43k scored blocks, binomial standard error ~0.002). A fresh one, not the GAN's own,
    so that the number measures the knockoffs, not how far the co-trained D has fallen behind.
    A generator that copies x would lower it to 0 too: power is checked beside it, and a copy
    fails there."""
    x = digits("train").tensors[0]
    gan = tiny_gan(iterations=300)
    gan._build(tuple(x.shape[1:]))
    start = swap_advantage(x, sample_batched(gan, x, seed=0), block=2, steps=300, width=16, seed=0)
    assert start["advantage"] > 0.3  # an untrained G is easy to tell apart
    gan.fit(loader, progress=False)
    assert swap_test_failures(x, sample_batched(gan, x, seed=0), start) == []
    copy = ExternalKnockoffs(lambda t: t.clone())
    assert swap_test_failures(x, sample_batched(copy, x, seed=0), start) == ["power"]


def test_resume_is_identical(one_thread, loader, tmp_path):
    path = tmp_path / "gan.ckpt"
    interrupted = tiny_gan(iterations=120)
    with pytest.raises(Interrupt):
        interrupted.fit(loader, checkpoint=path, progress=False, callback=stop_at(100))
    assert torch.load(path, weights_only=True)["payload"]["iteration"] == 80  # the last multiple of 40

    resumed = tiny_gan(iterations=120).fit(loader, checkpoint=path, resume=True, progress=False)
    straight = tiny_gan(iterations=120).fit(loader, progress=False)
    for (name, a), (_, b) in zip(resumed.state_dict().items(), straight.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(resumed.G.out[-1].weight, interrupted.G.out[-1].weight)
    assert torch.load(path, weights_only=True)["payload"]["iteration"] == 120
    assert [f for f in os.listdir(tmp_path) if f != "gan.ckpt"] == []  # no temporary files left

    x = digits("test").tensors[0][:16]
    rng = torch.Generator().manual_seed(0)
    assert torch.equal(resumed.sample(x, rng.manual_seed(0)), straight.sample(x, rng.manual_seed(0)))

    # resuming a finished run trains no further and keeps the weights
    again = tiny_gan(iterations=120).fit(loader, checkpoint=path, resume=True, progress=False)
    assert torch.equal(again.G.out[-1].weight, straight.G.out[-1].weight)


def test_resume_with_a_seeded_shuffling_loader(one_thread, tmp_path):
    """A loader that shuffles from a seeded generator gives the same order each time it is
    built, so a resumed run still equals a straight one."""

    def shuffled():
        return DataLoader(digits("train"), batch_size=256, shuffle=True, generator=torch.Generator().manual_seed(0))

    path = tmp_path / "gan.ckpt"
    with pytest.raises(Interrupt):
        tiny_gan(iterations=30, checkpoint_every=10).fit(shuffled(), checkpoint=path, progress=False, callback=stop_at(25))
    resumed = tiny_gan(iterations=30, checkpoint_every=10).fit(shuffled(), checkpoint=path, resume=True, progress=False)
    straight = tiny_gan(iterations=30, checkpoint_every=10).fit(shuffled(), progress=False)
    for (name, a), (_, b) in zip(resumed.state_dict().items(), straight.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


class CountingLoader:
    """Yields ``batches`` batches of random 8 x 8 images and counts how many it was asked for."""

    def __init__(self, batches: int):
        self.batches, self.served = batches, 0

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(self.batches):
            self.served += 1
            yield torch.rand(4, 1, 8, 8, generator=g)


def test_training_streams_the_loader(one_thread):
    """fit reads only the loader batches its iterations need, not the data set into memory
    (ImageNet at 64 x 64 would be ~63 GB), and cycles over a loader shorter than the run."""
    big = CountingLoader(100_000)
    tiny_gan(iterations=3, batch_size=8).fit(big, progress=False)
    assert big.served == 6  # 3 training batches of 8 from loader batches of 4
    short = CountingLoader(3)
    tiny_gan(iterations=5, batch_size=8).fit(short, progress=False)
    assert short.served == 10  # 40 images from passes of 12: three passes and a batch of the fourth
    with pytest.raises(ValueError, match="at least 2 images a pass, got 0"):
        tiny_gan(iterations=5, batch_size=8, shape=(1, 8, 8)).fit(CountingLoader(0), progress=False)


@pytest.fixture(scope="module")
def checkpoint(one_thread, loader, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "gan.ckpt"
    tiny_gan(iterations=40).fit(loader, checkpoint=path, progress=False)
    return path


def test_truncated_checkpoint(loader, checkpoint, tmp_path):
    bad = tmp_path / "truncated.ckpt"
    blob = checkpoint.read_bytes()
    bad.write_bytes(blob[: len(blob) // 3])
    with pytest.raises(ValueError, match=r"truncated\.ckpt: truncated or corrupt"):
        tiny_gan(iterations=80).fit(loader, checkpoint=bad, resume=True, progress=False)


def test_wrong_kind_checkpoint(loader, tmp_path):
    generator_file = tmp_path / "gaussian.pt"
    GaussianKnockoffs().fit(loader).save(generator_file)
    with pytest.raises(ValueError, match=f"holds a 'knockoff-generator' checkpoint, expected '{CHECKPOINT_KIND}'"):
        tiny_gan(iterations=80).fit(loader, checkpoint=generator_file, resume=True, progress=False)


def test_wrong_version_checkpoint(loader, checkpoint, tmp_path):
    obj = torch.load(checkpoint, weights_only=True)
    obj["version"] = 2
    torch.save(obj, tmp_path / "v2.ckpt")
    with pytest.raises(ValueError, match="v2.ckpt: written in checkpoint format version 2; this scop reads version 1"):
        tiny_gan(iterations=80).fit(loader, checkpoint=tmp_path / "v2.ckpt", resume=True, progress=False)


def test_mismatched_checkpoint(loader, checkpoint, tmp_path):
    with pytest.raises(ValueError, match="another config.*width: checkpoint 16 vs 32"):
        tiny_gan(iterations=80, width=32).fit(loader, checkpoint=checkpoint, resume=True, progress=False)

    other = DataLoader(digits("train", seed=1), batch_size=256)
    with pytest.raises(ValueError, match="other data or another order"):
        tiny_gan(iterations=80).fit(other, checkpoint=checkpoint, resume=True, progress=False)

    obj = torch.load(checkpoint, weights_only=True)
    payload = obj["payload"]
    payload["model"] = {k: v[..., :1] if v.dim() else v for k, v in payload["model"].items()}
    torch.save(obj, tmp_path / "shapes.ckpt")
    with pytest.raises(ValueError, match="state does not fit"):
        tiny_gan(iterations=80).fit(loader, checkpoint=tmp_path / "shapes.ckpt", resume=True, progress=False)


def test_large_images_use_resnet_and_upsample(one_thread):
    images = torch.rand(6, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    gan = KnockoffGAN(working_size=64, width=8, iterations=2, batch_size=4)
    gan.fit(DataLoader(TensorDataset(images), batch_size=3), progress=False)
    assert gan.settings.arch == "resnet" and gan.work_hw == (64, 64) and gan.settings.block == 4
    assert gan.swap_grid((3, 96, 96)) == (16, 16)  # 4-pixel blocks at 64 x 64: 6-pixel blocks at 96 x 96
    xk = gan.sample(images[:2].double(), generator=torch.Generator().manual_seed(0))
    assert xk.shape == (2, 3, 96, 96) and xk.dtype == torch.float64


def test_non_square_images_that_the_working_size_does_not_divide(one_thread):
    """224 x 160 scaled to a 64 longer edge is 64 x 45.7: worked at 64 x 44, the nearest whole
    number of the default 4-pixel blocks (plain rounding, 46, is not one)."""
    images = torch.rand(4, 3, 224, 160, generator=torch.Generator().manual_seed(0))
    gan = KnockoffGAN(width=4, iterations=2, batch_size=2).fit(DataLoader(TensorDataset(images), batch_size=2), progress=False)
    assert gan.work_hw == (64, 44) and gan.settings.block == 4 and gan.swap_grid((3, 224, 160)) == (16, 11)
    assert gan.sample(images[:2], generator=torch.Generator().manual_seed(0)).shape == (2, 3, 224, 160)


def test_seed_defaults_scale_with_image_size():
    small = KnockoffGAN(shape=(1, 8, 8)).settings
    assert (small.iterations, small.batch_size) == (1500, 128)
    cifar = KnockoffGAN(shape=(3, 32, 32), width=8).settings
    assert (cifar.iterations, cifar.batch_size, cifar.arch, cifar.lr) == (20000, 128, "conv", 1e-3)
    imagenet = KnockoffGAN(shape=(3, 224, 224), width=8)
    assert imagenet.work_hw == (64, 64)
    assert (imagenet.settings.iterations, imagenet.settings.batch_size, imagenet.settings.arch) == (30000, 512, "resnet")
    with pytest.raises(ValueError, match="iterations must be a positive int"):
        KnockoffGAN(iterations=0)
    with pytest.raises(ValueError, match="image inputs"):
        KnockoffGAN(shape=(64,))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block": 0}, "block must be a positive int or None, got 0"),  # used to become the default
        ({"width": 0}, "width must be a positive int or None, got 0"),  # likewise
        ({"working_size": 0}, "working_size must be a positive int or None, got 0"),
        ({"noise_channels": 0}, "noise_channels must be a positive int, got 0"),
        ({"checkpoint_every": 2.5}, "checkpoint_every must be a positive int, got 2.5"),
        ({"betas": (0.5, 1.0)}, r"betas must be two numbers in \[0, 1\)"),
        ({"moment_weight": -1.0}, "moment_weight must be >= 0"),
    ],
)
def test_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KnockoffGAN(**kwargs)


def test_swap_advantage_arguments_are_checked():
    x = torch.rand(8, 1, 8, 8)
    for kwargs, message in (({"steps": 0}, "steps must be a positive int"), ({"repeats": 0}, "repeats must be a positive int"),
                            ({"hint_rate": 1.0}, r"hint_rate must be in \[0, 1\)")):
        with pytest.raises(ValueError, match=message):
            swap_advantage(x, x, block=2, **kwargs)
