"""The tokenizer machinery shared by plugins: the folder format (core/tokenizer_files.py)
and the encode/decode command-line verbs (core/tokenizer_cli.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from doubles import FixedConfig, FixedDouble
from tessera.core.checkpoint import CheckpointError
from tessera.core.spec import ModalitySpec, TokenLayout
from tessera.core.tokenizer_cli import (
    add_codec_verbs,
    decode_file,
    encode_file,
    load_tokenizer,
    read_ids_file,
    with_overrides,
)
from tessera.core.tokenizer_files import (
    MissingCheckpointError,
    load_weights,
    pretrained_folder,
    read_tokenizer_folder,
    save_tokenizer_folder,
)

SPEC = ModalitySpec(name="toy", version="1", media_kind="timeseries",
                    layout=TokenLayout(kind="fixed", levels=(4,), steps=2), fingerprint="ab" * 32)


def test_folder_round_trip_format_check_and_weight_mismatch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    save_tokenizer_folder(tmp_path, state=net.state_dict(), config_key="model", config={"width": 3},
                          spec=SPEC, format_version="2")
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["format"] == "2" and meta["model"] == {"width": 3} and meta["spec"] == SPEC.to_dict()
    config, state = read_tokenizer_folder(tmp_path, config_key="model", format_version="2")
    back = load_weights(torch.nn.Linear(3, 2).train(), state, tmp_path)
    assert config == {"width": 3} and not back.training
    assert torch.equal(back.weight, net.weight) and torch.equal(back.bias, net.bias)

    with pytest.raises(CheckpointError, match="format '2', this version reads '1'; re-save"):
        read_tokenizer_folder(tmp_path, config_key="model", format_version="1")
    with pytest.raises(CheckpointError, match="no 'codec' object"):
        read_tokenizer_folder(tmp_path, config_key="codec", format_version="2")
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match config.json"):
        load_weights(torch.nn.Linear(4, 2), state, tmp_path)
    with pytest.raises(ValueError, match="config_key='spec' clashes"):
        save_tokenizer_folder(tmp_path, state={}, config_key="spec", config={}, spec=SPEC, format_version=None)

    # format_version=None: the older layout without a "format" entry (the shipped image weights)
    save_tokenizer_folder(tmp_path / "old", state=net.state_dict(), config_key="config", config={},
                          spec=SPEC, format_version=None)
    assert "format" not in json.loads((tmp_path / "old" / "config.json").read_text())
    assert read_tokenizer_folder(tmp_path / "old", config_key="config", format_version=None)[0] == {}


def test_missing_folders_say_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(MissingCheckpointError, match=r"empty/config.json: no such file"):
        read_tokenizer_folder(tmp_path / "empty", config_key="model", format_version="1")
    with pytest.raises(FileNotFoundError, match="no shipped toy checkpoint; train one"):
        pretrained_folder(tmp_path, modality="toy", hint="train one")
    (tmp_path / "config.json").write_text("{}")
    assert pretrained_folder(tmp_path, modality="toy", hint="") == tmp_path


def test_encode_decode_files_round_trip_and_refuse_foreign_ids(tmp_path: Path) -> None:
    tok = FixedDouble.debug()
    tok.save(str(tmp_path / "tok"))
    assert load_tokenizer(FixedDouble, tmp_path / "tok").spec == tok.spec
    signal = torch.linspace(0, 1, 16)
    tok.write(signal, str(tmp_path / "s.txt"))

    ids, out, seconds = encode_file(tok, tmp_path / "s.txt", None)
    assert out == tmp_path / "s.ids.json" and seconds >= 0
    assert json.loads(out.read_text()) == {"modality": "double_fixed", "fingerprint": tok.spec.fingerprint,
                                           "ids": ids.tolist()}
    media, back, target, _ = decode_file(tok, out, None, default_suffix=".txt")
    assert target == tmp_path / "s.ids.decoded.txt" and torch.equal(back, ids)
    torch.testing.assert_close(media, signal, atol=0.5 / 31, rtol=0)
    torch.testing.assert_close(tok.read(str(target)), media)

    other = FixedDouble(FixedConfig(), torch.linspace(0, 2, 32))
    with pytest.raises(ValueError, match="decode with the checkpoint that encoded it"):
        decode_file(other, out, None, default_suffix=".txt")
    with pytest.raises(ValueError, match="modality 'double_fixed', not 'speech'"):
        read_ids_file(out, modality="speech", fingerprint=tok.spec.fingerprint)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="no 'ids' list; expected the JSON written by 'tessera tokenizer encode toy'"):
        read_ids_file(tmp_path / "bad.json", modality="toy", fingerprint="")
    (tmp_path / "nested.json").write_text(json.dumps({"modality": "toy", "ids": [[1], 2]}))
    with pytest.raises(ValueError, match="not a flat list of integers"):
        read_ids_file(tmp_path / "nested.json", modality="toy", fingerprint="")


def test_codec_verbs_accept_out_and_output() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="verb", required=True)
    _, dec = add_codec_verbs(sub, media="toy file", encode=lambda a: 0, decode=lambda a: 1, decoded_suffix=".txt")
    dec.add_argument("--levels", type=int)
    a = p.parse_args(["decode", "x.json", "--output", "y.txt", "--levels", "2"])
    assert (a.out, a.levels, a.checkpoint, a.func(a)) == ("y.txt", 2, None, 1)
    assert p.parse_args(["encode", "x.txt", "--out", "x.json"]).out == "x.json"


def test_with_overrides_takes_only_given_options() -> None:
    args = argparse.Namespace(length=None, bins=8)
    assert with_overrides(FixedConfig(length=4), args, ("length", "bins")) == FixedConfig(length=4, bins=8)
    with pytest.raises(TypeError, match="colour"):
        with_overrides(FixedConfig(), argparse.Namespace(colour=1), ("colour",))


def test_warmup_cosine_and_count_check() -> None:
    from tessera.core.training import check_at_least_one, warmup_cosine

    factors = [warmup_cosine(s, warmup=4, steps=20, floor=0.1) for s in range(25)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0] and factors[4] == 1.0
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))
    assert factors[12] == pytest.approx(0.55) and factors[20] == factors[24] == pytest.approx(0.1)
    assert warmup_cosine(0, warmup=0, steps=10, floor=0.0) == 1.0

    with pytest.raises(ValueError, match=r"FixedConfig.bins=0 must be >= 1"):
        check_at_least_one(FixedConfig(bins=0), ("length", "bins"))
    check_at_least_one(FixedConfig(), ("length", "bins"))
