"""Token shards: writing, packing, shuffling, resume, rank/worker splits, manifest checks."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from tessera.llm.data import (
    PackedBatch,
    ShardManifestError,
    TokenDoc,
    TokenShardReader,
    step_batches,
    write_token_shards,
)

HASH = "manifest-aaaa"
MANIFEST = {"hash": HASH, "size": 100, "modalities": [{"name": "image", "start": 60, "stop": 100}]}


def _docs(n: int = 37, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Document i holds ids that identify it: i*1000 + position (mod 2**16 not reached)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        length = int(rng.integers(1, 30))
        mask = rng.integers(0, 2, size=length)
        docs.append({"ids": i * 1000 + np.arange(length), "loss_mask": mask})
    return docs


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, np.ndarray]]]:
    docs = _docs()
    out = tmp_path_factory.mktemp("shards")
    write_token_shards(iter(docs), out, HASH, shard_size=8)
    return out, docs


def test_writer_index_and_round_trip(shards: tuple[Path, list]) -> None:
    folder, docs = shards
    tars = sorted(folder.glob("*.tar"))
    assert len(tars) == 5  # 37 docs, 8 per shard
    reader = TokenShardReader(folder, seq_len=8, shuffle=False, loop=False, expected_manifest_hash=HASH)
    assert reader.n_docs == 37 and reader.index["tokens"] == sum(len(d["ids"]) for d in docs)
    # a single unshuffled pass: every target token (masked in, not the first of its document) exactly once
    want = sorted(int(t) for d in docs for t, m in zip(d["ids"][1:], d["loss_mask"][1:], strict=True) if m)
    got = []
    for b in reader.batches(3):
        got += b.targets[b.loss_weight > 0].tolist()
    assert sorted(got) == want


def test_packing_segments_positions_and_no_cross_document_targets(shards: tuple[Path, list]) -> None:
    folder, _ = shards
    reader = TokenShardReader(folder, seq_len=16, seed=3, shuffle_buffer=5)
    b = TokenShardReader.collate(list(itertools.islice(reader.rows(), 40)))
    assert b.ids.shape == (40, 16) and b.positions.max() < 16
    doc_of = b.ids // 1000
    same_doc_next = doc_of == b.targets // 1000
    # a target is trained only inside its own segment, so never across documents
    assert not ((b.loss_weight > 0) & ~same_doc_next).any()
    # positions restart at 0 at every segment start, and count up by one inside a segment
    starts = torch.ones_like(b.segment_ids, dtype=torch.bool)
    starts[:, 1:] = b.segment_ids[:, 1:] != b.segment_ids[:, :-1]
    assert (b.positions[starts] == 0).all()
    inside = ~starts[:, 1:]
    assert (b.positions[:, 1:][inside] == b.positions[:, :-1][inside] + 1).all()
    # within a segment the ids are one document's consecutive tokens
    assert (b.ids[:, 1:][inside] == b.ids[:, :-1][inside] + 1).all()


def test_resume_yields_exactly_the_continuation_across_epochs(shards: tuple[Path, list]) -> None:
    folder, _ = shards
    a = TokenShardReader(folder, seq_len=16, seed=7, shuffle_buffer=6)
    rows = a.rows()
    list(itertools.islice(rows, 23))
    state = a.state_dict()
    expected = [r["tokens"] for r in itertools.islice(rows, 60)]  # runs into epochs 1 and 2
    assert a.epoch >= 1
    b = TokenShardReader(folder, seq_len=16, seed=7, shuffle_buffer=6)
    b.load_state_dict(state)
    got = [r["tokens"] for r in itertools.islice(b.rows(), 60)]
    assert all((x == y).all() for x, y in zip(expected, got, strict=True))
    c = TokenShardReader(folder, seq_len=32, seed=7, shuffle_buffer=6)
    with pytest.raises(ValueError, match="seq_len=16"):
        c.load_state_dict(state)


def test_shuffle_is_seeded_and_each_epoch_is_a_permutation(shards: tuple[Path, list]) -> None:
    folder, docs = shards

    def epoch_docs(seed: int, epoch: int) -> list[int]:
        r = TokenShardReader(folder, seq_len=8, seed=seed, shuffle_buffer=10)
        return [int(r._doc(epoch, c).ids[0]) // 1000 for c in range(r.n_docs)]

    e0 = epoch_docs(1, 0)
    assert sorted(e0) == list(range(len(docs)))
    assert e0 == epoch_docs(1, 0)  # same seed, same order
    assert e0 != epoch_docs(2, 0) and e0 != epoch_docs(1, 1)
    assert e0 != list(range(len(docs)))


def test_ranks_and_workers_split_the_same_global_steps(shards: tuple[Path, list]) -> None:
    folder, _ = shards

    def steps(world: int, mb: int, ga: int, workers: int = 0) -> list[torch.Tensor]:
        out = []
        per_rank = []
        for rank in range(world):
            r = TokenShardReader(folder, seq_len=8, seed=5, shuffle_buffer=6)
            it = step_batches(r, micro_batch=mb, grad_accum=ga, rank=rank, world_size=world, num_workers=workers)
            per_rank.append([torch.cat([b.ids for b in micro]) for micro, _ in itertools.islice(it, 6)])
        for s in range(6):  # the rows of one optimizer step, as a sorted set
            rows = torch.cat([per_rank[r][s] for r in range(world)])
            out.append(rows[torch.argsort(rows[:, 0] * 10**6 + rows[:, 1])])
        return out

    one = steps(1, 4, 1)
    for a, b in zip(one, steps(2, 2, 1), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(one, steps(2, 1, 2), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(one, steps(1, 4, 1, workers=2), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="rank=2"):
        step_batches(TokenShardReader(folder, seq_len=8), micro_batch=1, grad_accum=1, rank=2, world_size=2)


def test_step_state_resumes_at_the_next_step(shards: tuple[Path, list]) -> None:
    folder, _ = shards
    it = step_batches(TokenShardReader(folder, seq_len=8, seed=2, shuffle_buffer=4), micro_batch=3, grad_accum=2)
    seen = list(itertools.islice(it, 5))
    r = TokenShardReader(folder, seq_len=8, seed=2, shuffle_buffer=4)
    r.load_state_dict(seen[2][1])
    resumed = list(itertools.islice(step_batches(r, micro_batch=3, grad_accum=2), 2))
    for (m_a, _), (m_b, _) in zip(seen[3:], resumed, strict=True):
        assert all(torch.equal(x.ids, y.ids) and torch.equal(x.loss_weight, y.loss_weight) for x, y in zip(m_a, m_b, strict=True))


def test_manifest_hash_mismatch_is_refused_naming_both(shards: tuple[Path, list]) -> None:
    folder, _ = shards
    with pytest.raises(ShardManifestError) as e:
        TokenShardReader(folder, seq_len=8, expected_manifest_hash="manifest-bbbb")
    assert HASH in str(e.value) and "manifest-bbbb" in str(e.value)


def test_modality_tags_weights_and_writer_errors(tmp_path: Path) -> None:
    docs = [TokenDoc(ids=np.array([1, 2, 60, 61, 99, 3]), loss_weight=np.array([1, 1, 0.5, 0.5, 0.5, 2.0])),
            {"ids": torch.tensor([5, 70, 6]), "loss_mask": torch.tensor([1, 0, 1])}]
    write_token_shards(docs, tmp_path / "a", HASH, manifest=MANIFEST)
    r = TokenShardReader(tmp_path / "a", seq_len=8, shuffle=False, loop=False)
    assert r.modalities == ["image"] and r.index["vocab_size"] == 100
    b: PackedBatch = next(r.batches(4))
    assert b.targets[0, :5].tolist() == [2, 60, 61, 99, 3]
    assert b.modality[0, :5].tolist() == [0, 1, 1, 1, 0]
    assert b.loss_weight[0, :5].tolist() == [1.0, 0.5, 0.5, 0.5, 2.0]
    assert b.loss_weight[0, 5] == 0  # 5 starts another document: not a target of 3
    assert b.loss_weight[0, 6] == 0  # 70 has loss mask 0
    with pytest.raises(ValueError, match=r"id 100, outside the vocabulary \[0, 100\)"):
        write_token_shards([{"ids": [1, 100]}], tmp_path / "b", HASH, manifest=MANIFEST)
    with pytest.raises(ValueError, match="loss_mask has 1 entries for 2 ids"):
        write_token_shards([{"ids": [1, 2], "loss_mask": [1]}], tmp_path / "c", HASH)
    with pytest.raises(ValueError, match="already holds token shards"):
        write_token_shards(docs, tmp_path / "a", HASH)
    with pytest.raises(ShardManifestError, match="differs from the given manifest"):
        write_token_shards(docs, tmp_path / "d", "other", manifest=MANIFEST)
    with pytest.raises(ValueError, match="no index.json"):
        TokenShardReader(tmp_path, seq_len=8)


def test_several_folders_and_tars_read_as_one_corpus(tmp_path: Path) -> None:
    first, second = _docs(11, seed=1), _docs(7, seed=2)
    for d in second:
        d["ids"] = d["ids"] + 50_000  # tell the two corpora apart
    write_token_shards(iter(first), tmp_path / "a", HASH, shard_size=4, manifest=MANIFEST | {"size": 60_000})
    write_token_shards(iter(second), tmp_path / "b", HASH, shard_size=4, manifest=MANIFEST | {"size": 60_000})
    both = TokenShardReader([tmp_path / "a", tmp_path / "b"], seq_len=8, shuffle=False, loop=False,
                            expected_manifest_hash=HASH)
    assert both.n_docs == 18 and both.modalities == ["image"]
    assert both.index["vocab_size"] == 60_000 and both.index["max_id"] == max(int(d["ids"].max()) for d in second)
    got = sorted(t for b in both.batches(2) for t in b.targets[b.loss_weight > 0].tolist())
    want = sorted(int(t) for d in first + second for t, m in zip(d["ids"][1:], d["loss_mask"][1:], strict=True) if m)
    assert got == want
    # a folder and a loose .tar of the same vocabulary mix too
    mixed = TokenShardReader([tmp_path / "a", tmp_path / "b" / "shard-000000.tar"], seq_len=8, loop=False)
    assert mixed.n_docs == 15 and mixed.modalities == ["image"] and mixed.index["vocab_size"] == 60_000
    assert mixed.index["max_id"] == max(int(d["ids"].max()) for d in second[:4])  # read off the loose .tar
    assert all(int(b.modality.max()) <= 1 for b in mixed.batches(2))
    loose = TokenShardReader([tmp_path / "b" / "shard-000000.tar", tmp_path / "b" / "shard-000001.tar"], seq_len=8,
                             loop=False)  # loose .tar files alone name no modalities: every token weighs as text
    assert loose.modalities is None and all(int(b.modality.max()) == 0 for b in loose.batches(2))
    # a source given twice (however spelled) would be trained on twice per epoch
    for twice in ([tmp_path / "a", tmp_path / "a"], [tmp_path / "a", tmp_path / "x" / ".." / "a" / "shard-000000.tar"]):
        (tmp_path / "x").mkdir(exist_ok=True)
        with pytest.raises(ValueError, match="given twice"):
            TokenShardReader(twice, seq_len=8)
    (tmp_path / "notes.tar").write_text("not a tar")
    with pytest.raises(ValueError, match="notes.tar is not a readable .tar"):
        TokenShardReader([tmp_path / "a", tmp_path / "notes.tar"], seq_len=8)
    # a saved position belongs to its sources, in their order
    state = both.state_dict()
    TokenShardReader([tmp_path / "a", tmp_path / "b"], seq_len=8, shuffle=False).load_state_dict(state)
    with pytest.raises(ValueError, match="same --data sources in the same order"):
        TokenShardReader([tmp_path / "b", tmp_path / "a"], seq_len=8, shuffle=False).load_state_dict(state)
    # another vocabulary is refused, naming each source and its manifest
    write_token_shards(iter(first), tmp_path / "c", "manifest-cccc", shard_size=4)
    with pytest.raises(ShardManifestError, match=r"mix manifests: .*a \(manifest-aaaa\).*c \(manifest-cccc\)"):
        TokenShardReader([tmp_path / "a", tmp_path / "c"], seq_len=8)
    with pytest.raises(ValueError, match="no such shard or folder"):
        TokenShardReader([tmp_path / "a", tmp_path / "missing"], seq_len=8)
    with pytest.raises(ValueError, match="no shards given"):
        TokenShardReader([], seq_len=8)


def test_broken_samples_in_a_shard_are_named_not_a_bare_key_error(tmp_path: Path) -> None:
    """A sample missing a member, with a corrupt .npy or meta.json, or with ids and mask of
    different lengths is refused naming the shard, the sample and the fix."""
    import io
    import tarfile

    def npy(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    good_meta = b'{"manifest_hash": "%s", "n_tokens": 3}' % HASH.encode()
    cases = {
        "no mask.npy": ({"meta.json": good_meta, "ids.npy": npy(np.arange(3))}, "has no mask.npy"),
        "truncated ids": ({"meta.json": good_meta, "ids.npy": npy(np.arange(3))[:-7],
                           "mask.npy": npy(np.ones(3))}, "is corrupt"),
        "bad meta": ({"meta.json": b"{not json", "ids.npy": npy(np.arange(3)), "mask.npy": npy(np.ones(3))},
                     "is corrupt"),
        "meta without hash": ({"meta.json": b"{}", "ids.npy": npy(np.arange(3)), "mask.npy": npy(np.ones(3))},
                              "has no manifest_hash"),
        "short mask": ({"meta.json": good_meta, "ids.npy": npy(np.arange(3)), "mask.npy": npy(np.ones(2))},
                       "must be one 1-D length"),
    }
    for i, (name, (members, message)) in enumerate(cases.items()):
        folder = tmp_path / f"case{i}"
        write_token_shards(iter(_docs(4)), folder, HASH, shard_size=8)
        shard = folder / "shard-000000.tar"
        with tarfile.open(shard, "a") as tar:  # a fifth sample, broken
            for member, data in members.items():
                info = tarfile.TarInfo(f"broken.{member}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        index = folder / "index.json"
        index.write_text(index.read_text().replace('"docs": 4', '"docs": 5').replace("[4]", "[5]"))
        reader = TokenShardReader(folder, seq_len=64, shuffle=False, loop=False)
        with pytest.raises(ValueError, match=message) as e:
            list(reader.batches(1))
        assert "shard-000000.tar" in str(e.value) and "'broken'" in str(e.value) and "rewrite" in str(e.value), name
