"""The ``tessera`` command: a light ``--help`` (no torch, gradio or deepspeed imported), help
with examples on every command, user errors as one line and exit status 2, and every
subcommand run for real on a tiny bundle of the test doubles."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from doubles import GridConfig, GridDouble, VariableDouble, register_doubles
from PIL import Image
from tessera.apps.cli import FORWARDED, main
from tessera.core.checkpoint import load_json
from tessera.pipelines.bundle import load_bundle, tiny_bundle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    register_doubles()
    path = tmp_path_factory.mktemp("cli") / "bundle"
    tiny_bundle(path, plugins={"double_grid": GridDouble.debug(), "double_variable": VariableDouble.debug()})
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_is_light_and_lists_every_command() -> None:
    probe = ("import sys\nfrom tessera.apps.cli import main\ncode = main(['--help'])\n"
             "print(code, sorted(m for m in ('torch', 'gradio', 'deepspeed') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.stdout.strip().endswith("0 []"), result.stdout + result.stderr
    for command in ("demo", "generate", "chat", "tokenize", "train", "tokenizer", "bundle", "export",
                    "build-default", "eval"):
        assert f"\n    {command}" in result.stdout, command


@pytest.mark.parametrize("argv", [["demo"], ["generate"], ["chat"], ["tokenizer"], ["bundle"], ["bundle", "info"],
                                  ["bundle", "add-modality"], ["bundle", "replace-modality"], ["bundle", "grow"],
                                  ["export"]])
def test_every_command_has_help_with_examples(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, _ = run(capsys, *argv, "--help")
    assert code == 0 and f"usage: tessera {' '.join(argv)}" in out and "examples:\n  tessera " in out


@pytest.mark.parametrize("command", list(FORWARDED))
def test_forwarded_commands_show_their_own_help(capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and f"usage: tessera {command}" in out


def test_user_errors_are_one_line_with_status_2(capsys: pytest.CaptureFixture[str], bundle_dir: Path,
                                                tmp_path: Path) -> None:
    code, _, err = run(capsys, "generate", "text-to-double_grid", "x", "--bundle", str(tmp_path / "nowhere"))
    assert code == 2 and err.startswith("tessera: error: ") and "not a Tessera bundle (no manifest.json)" in err
    assert "Traceback" not in err
    code, _, err = run(capsys, "generate", "text-to-nothing", "x", "--bundle", str(bundle_dir))
    assert code == 2 and "'text-to-double_grid'" in err and "pick one" in err
    code, _, err = run(capsys, "generate", "text-to-double_grid", "x", "--bundle", str(bundle_dir),
                       "--out", str(tmp_path / "x.jpg"))
    assert code == 2 and "writes .png; end the file name with one of them" in err
    code, _, err = run(capsys, "bundle", "add-modality", str(bundle_dir), "double_fixed")
    assert code == 2 and "give --checkpoint FOLDER" in err
    code, _, err = run(capsys, "bundle", "add-modality", str(bundle_dir), "no_such_modality", "--debug")
    assert code == 2 and "no_such_modality" in err
    code, _, err = run(capsys, "tokenizer", "train", "double_grid")
    assert code == 2 and "has no command-line tools" in err
    code, _, err = run(capsys, "train")  # forwarded; its own `SystemExit("...")` becomes status 2
    assert code == 2 and "--data is required" in err
    code, _, err = run(capsys, "demo", str(tmp_path / "nowhere"))
    assert code == 2 and "not a Tessera bundle" in err
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice: 'frobnicate'" in err


def test_bundle_info_prints_the_checked_manifest(capsys: pytest.CaptureFixture[str], bundle_dir: Path) -> None:
    code, out, _ = run(capsys, "bundle", "info", str(bundle_dir))
    manifest = load_json(bundle_dir / "manifest.json")
    assert code == 0 and manifest["hash"][:16] in out and f"vocabulary {manifest['size']} ids" in out
    for entry in manifest["modalities"]:
        line = next(x for x in out.splitlines() if x.strip().startswith(entry["name"]))
        assert f"ids {entry['start']}..{entry['stop'] - 1}" in line and entry["spec"]["fingerprint"][:12] in line
    params = load_bundle(bundle_dir).model.num_params()
    assert f"{params / 1e6:.2f}M parameters" in out


def test_generate_writes_seeded_media_and_reads_it_back(capsys: pytest.CaptureFixture[str], bundle_dir: Path,
                                                        tmp_path: Path) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for path in (a, b):
        code, out, _ = run(capsys, "generate", "text-to-double_grid", "a red circle", "--bundle", str(bundle_dir),
                           "--seed", "4", "--out", str(path))
        assert code == 0 and f"wrote {path}" in out
    assert Image.open(a).tobytes() == Image.open(b).tobytes()
    code, out, _ = run(capsys, "generate", "text-to-double_variable", "hi", "yo", "--bundle", str(bundle_dir),
                       "--out", str(tmp_path / "batch"), "--temperature", "1.5", "--max-new-tokens", "30")
    assert code == 0 and sorted(p.name for p in (tmp_path / "batch").iterdir()) == [
        "double_variable-0.wav", "double_variable-1.wav"]
    texts = []
    for _ in range(2):
        code, out, _ = run(capsys, "generate", "double_grid-to-text", str(a), "--bundle", str(bundle_dir),
                           "--max-new-tokens", "8")
        texts.append(out)
    assert code == 0 and texts[0] == texts[1]
    code, out, _ = run(capsys, "generate", "text-to-double_grid", "a red circle", "--bundle", str(bundle_dir),
                       "--best-of", "3", "--out", str(tmp_path / "best.png"))
    assert code == 0 and (tmp_path / "best.png").is_file()
    code, _, err = run(capsys, "generate", "double_grid-to-text", str(a), "--bundle", str(bundle_dir), "--best-of", "2")
    assert code == 2 and "--best-of 2 reranks generated media" in err


def test_chat_once_and_interactively(capsys: pytest.CaptureFixture[str], bundle_dir: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "in.png"
    GridDouble.debug().write(GridDouble.debug().example(0), str(image))
    code, _, err = run(capsys, "chat", "-m", "describe this image", "--file", str(image), "--bundle", str(bundle_dir),
                       "--max-new-tokens", "12", "--out-dir", str(tmp_path / "media"))
    assert code == 0 and err == ""
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"hello\n/file {tmp_path / 'missing.png'}\nlook\nagain\n/quit\n"))
    code, out, err = run(capsys, "chat", "--bundle", str(bundle_dir), "--max-new-tokens", "8",
                         "--out-dir", str(tmp_path / "media"))
    assert code == 0 and out.startswith("Tessera chat:")
    assert err.count("tessera: error:") == 1 and "missing.png: no such file" in err  # the session went on


def test_add_modality_then_export(capsys: pytest.CaptureFixture[str], bundle_dir: Path, tmp_path: Path) -> None:
    grown = tmp_path / "grown"
    code, out, _ = run(capsys, "bundle", "add-modality", str(bundle_dir), "double_fixed", "--debug", "--out", str(grown))
    assert code == 0 and "added 'double_fixed'" in out
    old, new = load_json(bundle_dir / "manifest.json"), load_json(grown / "manifest.json")
    assert [m["name"] for m in new["modalities"]] == ["double_grid", "double_variable", "double_fixed"]
    assert new["modalities"][:2] == old["modalities"]  # append-only: no id moved
    a, b = load_bundle(bundle_dir).model, load_bundle(grown).model
    torch.testing.assert_close(b.tok_emb.weight[: old["size"]], a.tok_emb.weight)

    code, out, _ = run(capsys, "export", "hf", str(grown), "--out", str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert code == 0 and config["vocab_size"] == new["size"] and (tmp_path / "hf" / "tokenizer.model").is_file()


def test_replace_modality_writes_a_loadable_bundle(capsys: pytest.CaptureFixture[str], bundle_dir: Path,
                                                   tmp_path: Path) -> None:
    GridDouble(GridConfig(grey_levels=24)).save(str(tmp_path / "grid24"))
    out_dir = tmp_path / "replaced"
    code, out, err = run(capsys, "bundle", "replace-modality", str(bundle_dir), "double_grid",
                         "--checkpoint", str(tmp_path / "grid24"), "--out", str(out_dir))
    assert code == 0 and "24 new" in out and "tessera train --init-from" in out, err
    replaced = load_bundle(out_dir)
    assert replaced.tokenizers["double_grid"].spec.layout.levels == (24,)
    assert replaced.model.config.vocab_size == replaced.vocab.size == load_bundle(bundle_dir).vocab.size + 8
    code, _, err = run(capsys, "bundle", "replace-modality", str(bundle_dir), "double_grid")
    assert code == 2 and "--checkpoint" in err


def test_bundle_grow_writes_a_deeper_bundle_with_the_same_outputs(capsys: pytest.CaptureFixture[str],
                                                                  bundle_dir: Path, tmp_path: Path) -> None:
    code, out, err = run(capsys, "bundle", "grow", str(bundle_dir), "--every", "1", "--out", str(tmp_path / "deep"))
    old, new = load_bundle(bundle_dir), load_bundle(tmp_path / "deep")
    assert code == 0 and "tessera train" in out and new.model.config.n_layers == 2 * old.model.config.n_layers, err
    ids = torch.arange(20)[None] % old.vocab.size
    with torch.no_grad():  # bf16 on disk for both: the copies' zero projections keep the outputs
        torch.testing.assert_close(new.model(ids), old.model(ids), atol=1e-5, rtol=0)
    code, _, err = run(capsys, "bundle", "grow", str(bundle_dir), "--every", "9", "--out", str(tmp_path / "bad"))
    assert code != 0 and "every=9 must be an integer in [1," in err and not (tmp_path / "bad").exists()
    code, _, err = run(capsys, "bundle", "grow", str(bundle_dir), "--out", str(bundle_dir))
    assert code != 0 and "new folder" in err
