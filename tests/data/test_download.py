"""``bigmodel data get``: the whole path (torchvision's downloader and md5 checks, conversion to
npz, atomic write, sha256) against a loopback HTTP server serving small files in torchvision's raw
layout; a corrupt download refused, a missing server told in one line, nothing half-written."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import pickle
import re
import socket
import struct
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from torchvision import datasets as tvd

from bigmodel import cli
from bigmodel.data import download
from bigmodel.data.npz import npz
from bigmodel.registry import DATASETS

MNIST_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """``(base URL, served folder, request paths)`` of an HTTP server on 127.0.0.1."""
    served = tmp_path / "served"
    served.mkdir()
    requests: list[str] = []
    handler = type("Handler", (_Quiet,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served, requests
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def folders(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """Empty ``$BIGMODEL_DATA`` and ``$BIGMODEL_SHARED_DATA`` (neither created)."""
    data, shared = tmp_path / "data", tmp_path / "shared"
    monkeypatch.setenv("BIGMODEL_DATA", str(data))
    monkeypatch.setenv("BIGMODEL_SHARED_DATA", str(shared))
    return data, shared


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _idx(array: np.ndarray) -> bytes:
    """An idx file: magic (0, 0, 0x08 = uint8, ndim), big-endian dims, the bytes."""
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _serve_mnist(served: Path, monkeypatch, mirrors: list[str], wrong_md5: str | None = None) -> dict[str, np.ndarray]:
    """MNIST's four ``.gz`` idx files in ``served``; torchvision's MNIST points at ``mirrors`` with
    the files' md5s (``wrong_md5``: that file's md5 is not the served one)."""
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
              "y_train": np.array([5, 0, 4, 1, 9, 2], np.uint8),
              "x_test": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), "y_test": np.array([7, 2, 1, 0], np.uint8)}
    for name, key in zip(MNIST_FILES, ["x_train", "y_train", "x_test", "y_test"], strict=True):
        (served / name).write_bytes(gzip.compress(_idx(arrays[key]), mtime=0))
    resources = [(n, "0" * 32 if n == wrong_md5 else _md5(served / n)) for n in MNIST_FILES]
    monkeypatch.setattr(tvd.MNIST, "mirrors", mirrors)
    monkeypatch.setattr(tvd.MNIST, "resources", resources)
    return arrays


def _get(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    status = cli.main(["data", "get", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def _error_line(err: str) -> str:
    """The one error line (torchvision's progress bars, also on stderr, end in carriage returns)."""
    lines = [ln for ln in err.splitlines() if ln.strip() and "it/s]" not in ln and "B/s]" not in ln]
    assert len(lines) == 1, err
    return lines[0]


def test_mnist_from_the_server_equals_what_was_served(server, folders, monkeypatch, capsys):
    """The first mirror is down: torchvision's next mirror serves it. The npz holds exactly the
    served arrays; the printed sha256 and size are the written file's; a recipe path
    ``$BIGMODEL_DATA/mnist.npz`` and the ``mnist`` dataset (default root) read them; a second get
    does nothing and fetches nothing."""
    base, served, requests = server
    data, _ = folders
    arrays = _serve_mnist(served, monkeypatch, [f"http://127.0.0.1:{_closed_port()}/", f"{base}/"])
    status, out, _ = _get(["mnist"], capsys)
    assert status == 0
    file = data / "mnist.npz"
    with np.load(file, allow_pickle=False) as z:
        assert sorted(z.files) == ["classes", "x_test", "x_train", "y_test", "y_train"]
        for key, value in arrays.items():
            assert z[key].dtype == (np.uint8 if key.startswith("x") else np.int64)
            np.testing.assert_array_equal(z[key], value)
        assert z["classes"].tolist() == [str(i) for i in range(10)]
    blob = file.read_bytes()
    assert out.splitlines()[-1] == f"wrote {file}  {len(blob):,} bytes  sha256 {hashlib.sha256(blob).hexdigest()}"
    assert sorted(p.name for p in data.iterdir()) == ["mnist.npz", "raw"]  # no temporary file left
    assert set(requests) == {f"/{n}" for n in MNIST_FILES}  # torchvision asks twice: redirects, then the file

    ds = npz("$BIGMODEL_DATA/mnist.npz", split="test")
    assert ds.images[:, 0].numpy().tolist() == arrays["x_test"].tolist() and ds.labels().tolist() == [7, 2, 1, 0]
    raw = DATASETS.build("mnist", split="train")  # default root $BIGMODEL_DATA/raw: the same raw files
    assert raw.images[:, 0].numpy().tolist() == arrays["x_train"].tolist()

    mtime, n = file.stat().st_mtime_ns, len(requests)
    status, out, _ = _get(["mnist"], capsys)
    assert status == 0 and out == f"mnist.npz is already in {data}; nothing to do (delete it to get it again)\n"
    assert file.stat().st_mtime_ns == mtime and len(requests) == n


def _cifar_tarball(served: Path, monkeypatch) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """CIFAR-10's python tarball (5 training batches of 2 images, a test batch of 3, batches.meta),
    with torchvision's CIFAR10 pointed at it and its md5s set to the fake files'."""
    rng = np.random.default_rng(1)
    names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    members, batches = {}, {}
    for b, n in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 3)]:
        batches[b] = (rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist())
        members[b] = pickle.dumps({"data": batches[b][0], "labels": batches[b][1]})
    members["batches.meta"] = pickle.dumps({"label_names": names})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    (served / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    md5 = {k: hashlib.md5(v).hexdigest() for k, v in members.items()}
    monkeypatch.setattr(tvd.CIFAR10, "url", "PLACEHOLDER")  # set by the test with the server's address
    monkeypatch.setattr(tvd.CIFAR10, "tgz_md5", _md5(served / "cifar-10-python.tar.gz"))
    monkeypatch.setattr(tvd.CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(tvd.CIFAR10, "meta",
                        {"filename": "batches.meta", "key": "label_names", "md5": md5["batches.meta"]})

    def images(keys: list[str]) -> np.ndarray:
        return np.concatenate([batches[k][0] for k in keys]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)

    train = [f"data_batch_{i}" for i in range(1, 6)]
    return (images(train), np.array(sum((batches[k][1] for k in train), [])),
            images(["test_batch"]), np.array(batches["test_batch"][1]), names)


def test_cifar10_tarball_into_a_root_folder(server, folders, tmp_path, monkeypatch, capsys):
    """``--root DIR``: the tarball is fetched and extracted under DIR/raw, the npz holds the served
    images channels last (as the shared cifar10.npz) and the output says how recipes find it."""
    base, served, _ = server
    x_train, y_train, x_test, y_test, names = _cifar_tarball(served, monkeypatch)
    monkeypatch.setattr(tvd.CIFAR10, "url", f"{base}/cifar-10-python.tar.gz")
    root = tmp_path / "elsewhere"
    status, out, _ = _get(["cifar10", "--root", str(root)], capsys)
    assert status == 0
    with np.load(root / "cifar10.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["x_train"], x_train)
        np.testing.assert_array_equal(z["x_test"], x_test)
        assert z["y_train"].tolist() == y_train.tolist() and z["y_test"].tolist() == y_test.tolist()
        assert z["x_train"].shape == (10, 32, 32, 3) and z["classes"].tolist() == names
    blob = (root / "cifar10.npz").read_bytes()
    assert out.splitlines()[-2:] == [
        f"wrote {root / 'cifar10.npz'}  {len(blob):,} bytes  sha256 {hashlib.sha256(blob).hexdigest()}",
        f"recipes read $BIGMODEL_DATA/cifar10.npz: set BIGMODEL_DATA={root} to use this copy"]
    assert (root / "raw" / "cifar-10-batches-py" / "test_batch").is_file()
    assert not folders[0].exists()  # $BIGMODEL_DATA untouched


def test_a_corrupt_download_is_refused_and_removed(server, folders, monkeypatch, capsys):
    """The third file's md5 is not torchvision's: one line, exit 2; the two files fetched whole
    before it stay (they passed their checks), nothing of the third, no npz."""
    base, served, _ = server
    data, _ = folders
    _serve_mnist(served, monkeypatch, [f"{base}/"], wrong_md5=MNIST_FILES[2])
    status, _, err = _get(["mnist"], capsys)
    assert status == 2
    folder = data / "raw" / "MNIST" / "raw"
    assert _error_line(err) == (
        f"data error: data get mnist: {base}/{MNIST_FILES[2]} was fetched but is not the file torchvision expects "
        f"(md5 should be {'0' * 32}); refused and removed. Retry, or download {MNIST_FILES[2]} from "
        f"{base}/{MNIST_FILES[2]} on a machine with a network, put it in {folder}/ and rerun: bigmodel data get mnist")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [MNIST_FILES[0], MNIST_FILES[0][:-3], MNIST_FILES[1], MNIST_FILES[1][:-3]])
    assert sorted(p.name for p in data.iterdir()) == ["raw"]


def test_no_server_one_line_then_placed_by_hand(server, folders, monkeypatch, capsys):
    """Nothing listening: one line naming the URL, the file and the folder, exit 2, no folder
    created. Doing what it says (the files put there by hand) then works without a network."""
    _, served, requests = server
    data, _ = folders
    dead = f"http://127.0.0.1:{_closed_port()}/"
    arrays = _serve_mnist(served, monkeypatch, [dead])
    status, _, err = _get(["mnist"], capsys)
    assert status == 2
    folder = data / "raw" / "MNIST" / "raw"
    name = MNIST_FILES[0]
    assert _error_line(err) == (
        f"data error: data get mnist: could not fetch {dead}{name}: [Errno 111] Connection refused. Without a network, "
        f"download {name} from {dead}{name} on a machine with a network, put it in {folder}/ "
        f"and rerun: bigmodel data get mnist")
    assert not data.exists()

    folder.mkdir(parents=True)
    for n in MNIST_FILES:
        (folder / n).write_bytes((served / n).read_bytes())
    status, _, _ = _get(["mnist"], capsys)
    assert status == 0 and not requests
    with np.load(data / "mnist.npz") as z:
        np.testing.assert_array_equal(z["x_train"], arrays["x_train"])


def test_unknown_name_is_one_line(folders, capsys):
    status, _, err = _get(["imagenet"], capsys)
    assert status == 2 and err == ("data error: data get 'imagenet': no such data set; choose one of "
                                   "mnist, fashion_mnist, cifar10, cifar100, svhn, stl10\n")


def test_every_name_has_torchvision_sources():
    """Each name's files are torchvision's own: URLs, names and md5s as its dataset classes hold them."""
    assert list(download.SOURCES) == ["mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "stl10"]
    res = {name: s.resources() for name, s in download.SOURCES.items()}
    assert [(r.urls, r.filename, r.md5) for r in res["mnist"]] == [
        (tuple(m + n for m in tvd.MNIST.mirrors), n, md5) for n, md5 in tvd.MNIST.resources]
    assert {r.folder for r in res["fashion_mnist"]} == {"FashionMNIST/raw"}
    assert [(r.urls[0], r.md5) for r in res["cifar100"]] == [(tvd.CIFAR100.url, tvd.CIFAR100.tgz_md5)]
    assert [(r.urls[0], r.filename, r.md5, r.extract) for r in res["svhn"]] == [
        (*tvd.SVHN.split_list[s], False) for s in ("train", "test")]
    assert [(r.urls[0], r.md5) for r in res["stl10"]] == [(tvd.STL10.url, tvd.STL10.tgz_md5)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", r.md5) for rs in res.values() for r in rs)
