"""shards: every sample exactly once per epoch across 2 workers × 2 simulated ranks, again across a
kill and resume; the ranks together read the batches of one process (so a run resumes on another
process count); each stream reads its own shards; `bigmodel data shard` round-trips a dataset."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch
from rich.console import Console

from bigmodel import cli
from bigmodel.commands.pretrain import pretrain
from bigmodel.data import shard_check
from bigmodel.data import shards as shards_mod
from bigmodel.data.base import TensorImages, materialize
from bigmodel.data.digits import digits
from bigmodel.data.loader import batches, rank_rows
from bigmodel.data.shards import Shards, write_shards
from bigmodel.errors import DataError
from bigmodel.recipe import validate
from bigmodel.train import build

N, SHARD, B, WORLD, STREAMS = 96, 10, 4, 2, 2  # 10 shards (9 × 10 + 6); 48 samples per stream
STEPS = N // B  # steps in one epoch: 24, each rank reading B / WORLD samples of each


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """96 grey 6×6 images; label = index, and the image is filled with it, so each sample is known."""
    idx = torch.arange(N)
    images = (idx[:, None, None, None] * 2).to(torch.uint8).expand(N, 1, 6, 6).contiguous()
    dst = tmp_path_factory.mktemp("corpus")
    write_shards(TensorImages(images, idx), dst, "train", SHARD)
    return dst


def _run(corpus: Path, monkeypatch, rank: int, start: int, stop: int, workers: int, world: int = WORLD,
         **kw) -> list[list[int]]:
    ds = Shards(str(corpus), streams=STREAMS, shuffle=kw.pop("shuffle", 7), **kw)  # fresh, as after a restart
    out = []
    for images, labels in batches(ds, B, seed=3, start=start, stop=stop, num_workers=workers, rank=rank, world=world):
        assert images.shape == (B // world, 1, 6, 6) and torch.equal(images[:, 0, 0, 0].long(), labels * 2)
        out.append(labels.tolist())
    return out


def test_index_and_length(corpus: Path):
    ds = Shards(str(corpus))
    assert len(ds) == N and ds.counts == [10] * 9 + [6]
    assert (ds.channels, ds.image_size, ds.num_classes) == (1, 6, N)


def test_every_sample_once_across_two_workers_and_two_ranks(corpus: Path, monkeypatch):
    per_rank = [_run(corpus, monkeypatch, r, 0, STEPS, workers=2) for r in range(WORLD)]
    seen = Counter(i for run in per_rank for batch in run for i in batch)
    assert sorted(seen) == list(range(N)) and set(seen.values()) == {1}
    # the next epoch again delivers each sample once, in another order
    again = [_run(corpus, monkeypatch, r, STEPS, 2 * STEPS, workers=2) for r in range(WORLD)]
    seen2 = Counter(i for run in again for batch in run for i in batch)
    assert sorted(seen2) == list(range(N)) and set(seen2.values()) == {1}
    assert again != per_rank


def test_kill_and_resume_neither_repeats_nor_skips(corpus: Path, monkeypatch):
    for rank in range(WORLD):
        whole = _run(corpus, monkeypatch, rank, 0, STEPS + 5, workers=2)
        for k in (5, STEPS + 1):  # killed after k steps, resumed at step k with a fresh loader
            first = _run(corpus, monkeypatch, rank, 0, k, workers=2)
            rest = _run(corpus, monkeypatch, rank, k, STEPS + 5, workers=2)
            assert first + rest == whole
    # the stream does not depend on the number of workers, so it may change on resume
    assert _run(corpus, monkeypatch, 1, 0, 5, workers=2) + _run(corpus, monkeypatch, 1, 5, 9, workers=0) == \
        _run(corpus, monkeypatch, 1, 0, 9, workers=1)


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_the_ranks_together_read_the_batches_of_one_process(corpus: Path, monkeypatch, accum_steps: int):
    """The cursor is global: the batch of a step is the same for 1 and 2 processes, so a run saved on
    2 processes resumes on 1 (and back) at the same sample."""
    one = _run(corpus, monkeypatch, 0, 0, STEPS + 3, workers=2, world=1)
    ds = [Shards(str(corpus), streams=STREAMS, shuffle=7) for _ in range(WORLD)]
    per_rank = [[y.tolist() for _, y in batches(ds[r], B, seed=3, stop=STEPS + 3, num_workers=2, rank=r, world=WORLD,
                                                 accum_steps=accum_steps)] for r in range(WORLD)]
    for step, batch in enumerate(one):
        together = [0] * B
        for r in range(WORLD):
            for row, y in zip(rank_rows(B, accum_steps, r, WORLD).tolist(), per_rank[r][step], strict=True):
                together[row] = y
        assert together == batch


def test_each_stream_reads_its_own_shards(corpus: Path, monkeypatch):
    """A stream opens only the shards of its range: the 10 shards are split across the 2 streams,
    a boundary shard shared by at most two neighbours; every rank reads the same streams."""
    opened: dict[tuple[int, int], set[str]] = {}
    real = shards_mod.raw_samples
    for rank in range(WORLD):
        for v in range(STREAMS):
            monkeypatch.setattr(shards_mod, "raw_samples",
                                lambda url, key=(rank, v): opened.setdefault(key, set()).add(url) or real(url))
            ds = Shards(str(corpus), streams=STREAMS, shuffle=0)
            steps = range(v, STEPS, STREAMS)  # the steps this stream serves in epoch 0
            list(ds.step_batches(steps, B, seed=3, rank=rank, world=WORLD))
    per_shard = Counter(u for (rank, _), urls in opened.items() if rank == 0 for u in urls)
    assert len(per_shard) == 10 and max(per_shard.values()) <= 2
    assert all(len(urls) <= 6 for urls in opened.values())
    assert all(opened[(0, v)] == opened[(1, v)] for v in range(STREAMS))


def test_no_shuffle_reads_shards_in_epoch_order(corpus: Path, monkeypatch):
    run = _run(corpus, monkeypatch, 0, 0, STEPS, workers=0, world=1, shuffle=0)
    for v in range(STREAMS):  # each stream's range is a contiguous stretch of whole shards, read in order
        stream = [i for batch in run[v::STREAMS] for i in batch]
        assert all(b - a == 1 for a, b in zip(stream, stream[1:], strict=False) if a // SHARD == b // SHARD)


def test_explicit_urls_with_braces_and_split(corpus: Path, tmp_path: Path):
    pattern = str(corpus / "{split}-{000000..000009}.tar")
    ds = Shards(pattern)
    assert len(ds) == N and ds.counts == [10] * 9 + [6]
    # without an index the shards are counted by reading them
    for tar in corpus.glob("*.tar"):
        (tmp_path / tar.name).symlink_to(tar)
    scanned = Shards(str(tmp_path / "train-{000000..000009}.tar"))
    assert scanned.counts == ds.counts and scanned.channels == 1 and scanned.num_classes == N


def test_cli_data_shard_round_trips_a_dataset(tmp_path: Path):
    dst = tmp_path / "digits"
    assert cli.main(["data", "shard", "digits", "split=test", str(dst), "--size", "100"]) == 0
    ref = digits(split="test")
    back = Shards(str(dst), split="test")
    assert len(back) == len(ref) and back.counts == [100] * 4 + [50]
    got = materialize(back)
    assert torch.equal(got.images, ref.images) and torch.equal(got.targets, ref.targets)
    assert got.classes == ref.classes
    # refuses to overwrite without --force; errors are one line with status 2
    assert cli.main(["data", "shard", "digits", "split=test", str(dst), "--size", "100"]) == 2
    assert cli.main(["data", "shard", "digits", "split=test", str(dst), "--size", "100", "--force"]) == 0
    assert cli.main(["data", "shard", "digits", "bogus=1", str(dst)]) == 2



def test_a_killed_pretraining_run_resumes_exactly_on_shards(corpus: Path, tmp_path: Path):
    """The trainer's data position (the step in the checkpoint) is all a streamed run needs: a run
    resumed from its step-3 checkpoint ends with the weights of the uninterrupted run."""
    def run(out: Path, workers: int) -> dict[str, torch.Tensor]:
        recipe = validate({
            "architecture": {"name": "vit", "size": "nano", "image_size": 8, "patch_size": 4, "in_chans": 1},
            "data": {"name": "shards", "urls": str(corpus), "streams": 2, "shuffle": 7},
            "objective": {"name": "supervised"},
            "optim": {"batch_size": 8, "steps": 6, "warmup_steps": 1},
            "run": {"out": str(out), "checkpoint_every": 3, "num_workers": workers, "deterministic": True}})
        out.mkdir(exist_ok=True)
        data, model = build.experiment(recipe)
        pretrain(recipe, out, data, model, Console(quiet=True))
        return model.state_dict()

    whole = run(tmp_path / "whole", workers=2)
    run(tmp_path / "killed", workers=2)
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "step_00000006")  # as if killed before step 6 was saved
    resumed = run(tmp_path / "killed", workers=0)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_urls_may_name_the_shared_data_folder(corpus: Path, monkeypatch):
    monkeypatch.setenv("BIGMODEL_SHARED_DATA", str(corpus.parent))
    ds = Shards(f"$BIGMODEL_SHARED_DATA/{corpus.name}")
    assert len(ds) == N and ds.urls[0] == str(corpus / "train-000000.tar")


# -- an index is data, never code (issue 17) ----------------------------------------------------


@pytest.fixture()
def sharded_digits(tmp_path: Path, monkeypatch) -> Path:
    """``bigmodel data shard digits split=train sh --size 500``, run in ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["data", "shard", "digits", "split=train", "sh", "--size", "500"]) == 0
    return tmp_path / "sh"


def _edit_first_url(sh: Path, url: str) -> None:
    index = json.loads((sh / "train.json").read_text())
    index["shards"][0]["url"] = url
    (sh / "train.json").write_text(json.dumps(index))


def test_an_index_naming_a_shell_command_is_refused_and_runs_nothing(sharded_digits: Path, tmp_path: Path):
    _edit_first_url(sharded_digits, "pipe:touch PWNED; cat sh/train-000000.tar")
    with pytest.raises(DataError) as e:
        list(islice(iter(Shards("sh")), 3))
    assert str(e.value) == ("shard index sh/train.json: entry 0 'pipe:touch PWNED; cat sh/train-000000.tar' is a "
                            "command or URL, not a file of the index's folder; an index may only name shard files "
                            "inside its folder (write a pipe: or remote URL in the recipe's data.urls instead)")
    assert not (tmp_path / "PWNED").exists() and not (sharded_digits / "PWNED").exists()
    # through the recipe as well: refused while building, before any shard is opened
    with pytest.raises(DataError, match=r"^shard index sh/train.json: entry 0 'pipe:touch PWNED"):
        build.experiment(validate({"architecture": {"name": "vit", "size": "nano", "image_size": 8, "patch_size": 4,
                                                    "in_chans": 1},
                                   "data": {"name": "shards", "urls": "sh"}, "objective": {"name": "supervised"}}))
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("url, why", [
    ("/etc/passwd", "leads out of the index's folder"),
    ("../outside.tar", "leads out of the index's folder"),
    ("sub/../../outside.tar", "leads out of the index's folder"),
    ("https://example.com/x.tar", "is a command or URL, not a file of the index's folder"),
    ("file:train-000000.tar", "is a command or URL, not a file of the index's folder"),
    ("link.tar", "is a link that leads out of the index's folder"),
])
def test_an_index_entry_outside_its_folder_is_refused(sharded_digits: Path, tmp_path: Path, url: str, why: str):
    shutil.copy(sharded_digits / "train-000000.tar", tmp_path / "outside.tar")
    (sharded_digits / "link.tar").symlink_to(tmp_path / "outside.tar")
    _edit_first_url(sharded_digits, url)
    with pytest.raises(DataError) as e:
        Shards(str(sharded_digits))
    assert str(e.value).startswith(f"shard index {sharded_digits / 'train.json'}: entry 0 {url!r} {why}; ")


def test_a_link_inside_the_folder_and_a_user_written_pipe_url_still_work(sharded_digits: Path):
    ref = materialize(Shards("sh"))
    assert len(ref) == 1347 and Shards("sh").counts == [500, 500, 347]
    (sharded_digits / "sub").mkdir()
    (sharded_digits / "train-000000.tar").rename(sharded_digits / "sub" / "a.tar")
    (sharded_digits / "train-000000.tar").symlink_to(sharded_digits / "sub" / "a.tar")  # a link within the folder
    _edit_first_url(sharded_digits, "sub/a.tar")
    assert torch.equal(materialize(Shards("sh")).images, ref.images)
    # a pipe: URL the user wrote in data.urls is theirs to run
    piped = Shards(f"pipe:cat {sharded_digits}/train-{{000000..000002}}.tar")
    assert piped.counts == [500, 500, 347]
    got = materialize(piped)
    assert torch.equal(got.images, ref.images) and torch.equal(got.targets, ref.targets)


# -- bad shards are data errors ----------------------------------------------------------------


def test_a_shard_shorter_than_its_index_is_refused_when_built(corpus: Path, tmp_path: Path):
    """Found from the tar headers when the dataset is built, not at the step that reaches the shard."""
    sh = tmp_path / "sh"
    shutil.copytree(corpus, sh)
    short = tmp_path / "short"
    write_shards(TensorImages(torch.zeros(4, 1, 6, 6, dtype=torch.uint8), torch.arange(4)), short, "train", SHARD)
    shutil.copy(short / "train-000000.tar", sh / "train-000003.tar")
    with pytest.raises(DataError) as e:
        Shards(str(sh))
    assert str(e.value) == (f"shard {sh / 'train-000003.tar'} holds fewer samples than its index says (4 of 10); "
                            f"rewrite the index or the shard")
    data = (sh / "train-000005.tar").read_bytes()
    (sh / "train-000003.tar").write_bytes(data)
    (sh / "train-000005.tar").write_bytes(data[:len(data) // 2])  # cut short: only the whole members count
    with pytest.raises(DataError, match=r"train-000005.tar holds fewer samples than its index says \(\d of 10\)"):
        Shards(str(sh))


def test_tar_samples_counts_samples_as_webdataset_groups_them(corpus: Path, tmp_path: Path):
    counts = json.loads((corpus / "train.json").read_text())["shards"]
    assert [shard_check.tar_samples(corpus / s["url"]) for s in counts] == [s["count"] for s in counts]
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "gz.tar").write_bytes(b"\x1f\x8b" + b"\x00" * 600)  # not a plain tar: left to the reader
    assert shard_check.tar_samples(tmp_path / "empty.tar") == 0 and shard_check.tar_samples(tmp_path / "gz.tar") is None


@pytest.mark.parametrize("bad, message", [
    ("no-index", "data.urls='{sh}': no train.json index and no train-*.tar shards there"),
    ("not-json", "shard index {sh}/train.json: not readable as JSON"),
    ("not-an-index", "{sh}/train.json: not a bigmodel shard index (format None, expected 'bigmodel-shards/1')"),
])
def test_bad_shard_folders_are_data_errors(corpus: Path, tmp_path: Path, bad: str, message: str):
    sh = tmp_path / "sh"
    sh.mkdir()
    if bad == "not-json":
        (sh / "train.json").write_text("{oops")
    elif bad == "not-an-index":
        (sh / "train.json").write_text("[1, 2]")
    with pytest.raises(DataError) as e:
        Shards(str(sh))
    assert str(e.value).startswith(message.format(sh=sh))
    if bad == "no-index":
        assert isinstance(e.value, FileNotFoundError)
