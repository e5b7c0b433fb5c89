"""The third-party plugin template (examples/plugin-template, installed by `make env`):
found through its entry point, placed after the built-ins in the vocabulary, round trips
through global ids, learns, and its files and errors behave."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

import pytest
import tessera.core.registry as reg
import torch
from tessera.core.registry import BUILTIN_MODALITIES, get_modality, registry
from tessera.core.vocab import UnifiedVocab

INSTALL_HINT = "install the template first: make env (pip install -e examples/plugin-template)"


@pytest.fixture(scope="module")
def sensor_cls() -> type:
    eps = distribution("tessera-sensor").entry_points
    assert [(ep.group, ep.name) for ep in eps] == [("tessera.modalities", "sensor")], INSTALL_HINT
    return get_modality("sensor")


@pytest.fixture(scope="module")
def template(sensor_cls: type) -> Any:
    """The template's module, reached through the registered class (the test never imports it)."""
    return sys.modules[sensor_cls.__module__]


def test_discovered_through_the_entry_point_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget the template (module and registration); discovery must import it again."""
    for mod in [m for m in sys.modules if m == "tessera_sensor" or m.startswith("tessera_sensor.")]:
        monkeypatch.delitem(sys.modules, mod)
    saved, discovered = dict(reg._plugins), reg._discovered
    try:
        reg.unregister_modality("sensor")
        reg.discover(reload=True)
        cls = get_modality("sensor")
        assert cls.__module__ == "tessera_sensor.tokenizer" and "tessera_sensor" in sys.modules
        assert sys.modules["tessera_sensor"].SensorTokenizer is cls
    finally:
        with reg._lock:
            reg._plugins.clear()
            reg._plugins.update(saved)
            reg._discovered = discovered


def test_gets_ids_after_the_builtins_and_round_trips_through_the_vocab(sensor_cls: type) -> None:
    names = list(registry)
    builtins = [n for n in names if n in BUILTIN_MODALITIES]
    assert names[: len(builtins)] == builtins and "sensor" in names[len(builtins):]
    specs = [registry[n].debug().spec for n in builtins]
    specs.append(sensor_cls.debug().spec)
    vocab = UnifiedVocab.build(300, specs)
    start, stop = vocab.local_range("sensor")
    assert all(start > vocab.local_range(b)[1] - 1 for b in builtins) and stop == vocab.size

    tok = sensor_cls.debug()
    x = tok.example(3)
    local = tok.encode(x)
    seq = torch.cat([torch.tensor([vocab.begin_id("sensor")]), vocab.to_global("sensor", local),
                     torch.tensor([vocab.end_id("sensor")])])
    assert vocab.explain(int(seq[1])).startswith(f"id {int(seq[1])}: sensor level 0 code ")
    back = vocab.to_local("sensor", seq[1:-1])
    assert torch.equal(back, local)
    assert torch.equal(tok.decode(back), tok.decode(local)) and tok.decode(back).shape == (64, 3)


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """A tiny MLP gains nothing from threads, and they thrash on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.usefixtures("one_thread")
def test_training_reduces_reconstruction_error(template: Any, sensor_cls: type) -> None:
    torch.manual_seed(0)
    tok = sensor_cls.debug()
    data = [tok.example(s) for s in range(64)]
    held_out = [tok.example(1000 + s) for s in range(16)]

    def mse() -> float:
        return float(torch.stack([((tok.decode(tok.encode(x)) - x) ** 2).mean() for x in held_out]).mean())

    before = mse()
    losses = template.train(tok, data, template.TrainConfig.debug())
    after = mse()
    assert losses[-1] < 0.75 * losses[0]  # measured 0.85 -> 0.50
    assert after < 0.6 * before, (before, after)  # measured 1.08 -> 0.47
    with pytest.raises(ValueError, match="at least 2 chunks, got 1; pass more data"):
        template.train(tok, data[:1])


def test_save_load_and_fingerprint(sensor_cls: type, tmp_path: Path) -> None:
    tok = sensor_cls.debug()
    tok.save(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "weights.safetensors"]
    back = sensor_cls.load(str(tmp_path))
    assert back.spec == tok.spec
    with torch.no_grad():
        tok.decoder[0].weight.add_(0.1)  # different weights, different fingerprint
    assert tok.spec.fingerprint != back.spec.fingerprint


def test_csv_files_and_chunking(template: Any, sensor_cls: type, tmp_path: Path) -> None:
    tok = sensor_cls.debug()
    x = tok.example(0)
    tok.write(x, str(tmp_path / "walk.csv"))
    assert (tmp_path / "walk.csv").read_text().splitlines()[0] == "ch0,ch1,ch2"
    torch.testing.assert_close(tok.read(str(tmp_path / "walk.csv")), x, atol=1e-6, rtol=1e-6)
    long = torch.randn(150, 3)
    chunks = template.split_chunks(long, 64)
    assert [c.shape for c in chunks] == [(64, 3), (64, 3)] and torch.equal(chunks[1], long[64:128])


def test_errors_say_what_and_how(template: Any, sensor_cls: type, tmp_path: Path) -> None:
    tok = sensor_cls.debug()
    with pytest.raises(ValueError, match=r"series has shape \(100, 3\), expected \(64, 3\).*split_chunks"):
        tok.encode(torch.randn(100, 3))
    with pytest.raises(ValueError, match="contains NaN or inf; fill the gaps"):
        tok.encode(torch.full((64, 3), float("nan")))
    with pytest.raises(ValueError, match="chunk=30 is not a multiple of frame=4; pick a chunk like 28"):
        template.SensorConfig(chunk=30)
    (tmp_path / "two.csv").write_text("a,b\n1,2\n3,4\n")
    with pytest.raises(ValueError, match=r"two.csv: 2 column\(s\), the sensor tokenizer needs 3"):
        tok.read(str(tmp_path / "two.csv"))
    (tmp_path / "text.csv").write_text("a,b,c\nx,y,z\n")
    with pytest.raises(ValueError, match="text.csv: not a sensor CSV.*one row of 3 numbers per time step"):
        tok.read(str(tmp_path / "text.csv"))


def test_the_example_in_docs_plugins_md_runs(capsys: pytest.CaptureFixture[str]) -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    block = doc.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(block, "docs/plugins.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    # 6 global specials + begin + end after 32000 text ids: local 0 is id 32008
    m = re.fullmatch(r"id (\d+): sensor level 0 code (\d+) \(local (\d+)\)", printed)
    assert m and int(m[1]) == 32008 + int(m[3]) and m[2] == m[3], printed


def test_round_trips_through_a_chat_document(sensor_cls: type, tmp_path: Path) -> None:
    from tessera.core.document import Document, MediaSegment, TextSegment
    from tessera.core.text import TextTokenizer

    text = TextTokenizer.train([f"reading number {i} from the wrist sensor" for i in range(200)], vocab_size=320)
    tok = sensor_cls.debug()
    vocab = UnifiedVocab.build(text.vocab_size, [tok.spec], text_sha256=text.sha256)
    x = tok.example(7)
    tok.write(x, str(tmp_path / "walk.csv"))
    chat = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is this?"}, {"type": "sensor", "path": "walk.csv"}]},
        {"role": "assistant", "content": "a walk"},
    ]}
    doc = Document.from_json(chat, base_dir=tmp_path)
    ids, mask = doc.to_ids(vocab, text, {"sensor": tok}, train_on="assistant")
    begin = int((ids == vocab.begin_id("sensor")).nonzero()[0])
    assert int(ids[begin + 17]) == vocab.end_id("sensor") and not mask[begin]

    back = Document.from_ids(ids, vocab, text)
    kinds = [(type(s).__name__, s.role) for s in back]
    assert kinds == [("TextSegment", "user"), ("MediaSegment", "user"), ("TextSegment", "assistant")]
    assert back.segments[0].text == "what is this?" and back.segments[2].text == "a walk"
    media = back.segments[1]
    assert isinstance(media, MediaSegment) and torch.equal(media.ids, tok.encode(tok.read(str(tmp_path / "walk.csv"))))
    torch.testing.assert_close(tok.decode(media.ids), tok.decode(tok.encode(x)), atol=1e-5, rtol=1e-5)
    assert isinstance(back.segments[0], TextSegment)
