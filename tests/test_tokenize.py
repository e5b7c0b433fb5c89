"""`tessera tokenize`: JSONL documents and webdataset shards → token shards; unreadable files
refused by name and counted without stopping the run; resume after a kill; the worker pool."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from doubles import GridDouble, VariableDouble, register_doubles
from tessera.core.checkpoint import load_json, save_json
from tessera.llm.data import TokenShardReader
from tessera.pipelines.bundle import tiny_bundle
from tessera.pipelines.tokenize import STATE_NAME, main, tokenize_files


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    register_doubles()
    root = tmp_path_factory.mktemp("tok")
    bundle = tiny_bundle(root / "bundle", plugins={"double_grid": GridDouble.debug(),
                                                   "double_variable": VariableDouble.debug()})
    grid = bundle.tokenizers["double_grid"]
    media = root / "media"
    media.mkdir()
    for i in range(4):
        grid.write(grid.example(i), str(media / f"img{i}.png"))
    (media / "broken.png").write_bytes(b"\x89PNG not really")
    lines = [{"messages": [{"role": "user", "content": [{"type": "text", "text": f"draw {i}"}]},
                           {"role": "assistant", "content": [{"type": "double_grid", "path": f"media/img{i}.png"}]}]}
             for i in range(4)]
    lines.insert(2, {"messages": [{"role": "user", "content": [{"type": "double_grid", "path": "media/broken.png"}]}]})
    lines.append(["a caption", {"type": "double_grid", "path": "media/img0.png"}])
    text = "\n".join(json.dumps(x) for x in lines) + "\n{not json\n"
    (root / "docs.jsonl").write_text(text)
    with tarfile.open(root / "shard.tar", "w") as tar:
        for key, files in {"s0": {"png": (media / "img1.png").read_bytes(), "txt": b"a grey square"},
                           "s1": {"png": b"garbage", "txt": b"broken"},
                           "s2": {"png": (media / "img2.png").read_bytes()}}.items():
            for ext, payload in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return {"root": root, "bundle": root / "bundle", "jsonl": root / "docs.jsonl", "tar": root / "shard.tar"}


def test_corrupt_files_are_refused_by_name_and_counted_without_stopping(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "shards"
    s = tokenize_files([data["jsonl"], data["tar"]], data["bundle"], out, chunk_size=3, progress=False)
    assert s.units == 3 + 1 and s.skipped_units == 0  # 7 lines in parts of 3, one .tar
    assert s.docs == 5 + 2  # 5 good JSONL documents; one good tar sample, both directions
    assert s.refused == 4
    joined = "\n".join(s.refusals)
    assert "broken.png" in joined and "docs.jsonl:7" in joined and "shard.tar:s1" in joined
    assert "shard.tar:s2: no caption" in joined
    reader = TokenShardReader(out, seq_len=32, expected_manifest_hash=load_json(data["bundle"] / "manifest.json")["hash"],
                              loop=False, shuffle=False)
    assert reader.n_docs == 7


def test_resume_skips_finished_parts_and_redoes_the_rest(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "shards"
    first = tokenize_files([data["jsonl"]], data["bundle"], out, chunk_size=2, progress=False)
    state = load_json(out / STATE_NAME)
    lost = sorted(state["done"])[-1]  # as if killed before the last part finished
    del state["done"][lost]
    save_json(out / STATE_NAME, state)
    (out / "index.json").unlink()
    again = tokenize_files([data["jsonl"]], data["bundle"], out, chunk_size=2, progress=False)
    assert again.skipped_units == first.units - 1 and again.docs == first.docs and again.tokens == first.tokens
    with pytest.raises(ValueError, match="other inputs, chunk size or bundle"):
        tokenize_files([data["jsonl"]], data["bundle"], out, chunk_size=5, progress=False)


def test_cli_with_a_worker_pool_prints_a_summary(data: dict[str, Path], tmp_path: Path, capsys) -> None:
    code = main([str(data["jsonl"]), "--bundle", str(data["bundle"]), "--out", str(tmp_path / "o"),
                 "--workers", "1", "--chunk-size", "3", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0
    assert "tokenized 5 documents" in captured.out and "2 refused" in captured.out
    assert "refused: " in captured.err and "broken.png" in captured.err
    assert main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
