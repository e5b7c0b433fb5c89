"""The Gradio app, for real: launched in a thread on 127.0.0.1 over a tiny bundle of the test
doubles, driven through ``gradio_client`` — every endpoint, the limits, readable errors,
and a modality plugin the app has never heard of getting its tabs from its media kind."""

from __future__ import annotations

import struct
import wave
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from doubles import FixedDouble, GridDouble, VariableDouble, register_doubles
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from tessera.apps import app as app_module
from tessera.apps.app import AppLimits, TesseraApp, app_bundle, media_component, serve
from tessera.pipelines.bundle import Bundle, tiny_bundle

PLUGINS = ("double_grid", "double_variable", "double_fixed")


def doubles_bundle() -> Bundle:
    register_doubles()
    return tiny_bundle(plugins={"double_grid": GridDouble.debug(), "double_variable": VariableDouble.debug(),
                                "double_fixed": FixedDouble.debug()})


@pytest.fixture(scope="session")
def running_app() -> Iterator[tuple[TesseraApp, str]]:
    """(the app, its URL), served from a thread for the whole session (also used by test_browser)."""
    app = TesseraApp(doubles_bundle(), limits=AppLimits.debug())
    demo, url = serve(app)
    yield app, url
    demo.close()


@pytest.fixture(scope="module")
def client(running_app: tuple[TesseraApp, str]) -> Client:
    return Client(running_app[1], verbose=False)


def test_every_modality_gets_its_tabs_and_components_from_its_media_kind(client: Client) -> None:
    endpoints = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    for m in PLUGINS:  # none of these names appears in the app's code
        assert {f"/text_to_{m}", f"/{m}_to_text", f"/lab_{m}", f"/example_{m}"} <= endpoints
    assert {"/chat", "/clear_chat"} <= endpoints
    assert isinstance(media_component("image", label="x", interactive=True), gr.Image)
    assert isinstance(media_component("audio", label="x", interactive=True), gr.Audio)
    assert isinstance(media_component("video", label="x", interactive=True), gr.Video)
    assert isinstance(media_component("timeseries", label="x", interactive=True), gr.File)


def test_text_to_media_endpoints_return_files_the_plugins_read(client: Client) -> None:
    bundle_plugins = {"double_grid": GridDouble.debug(), "double_variable": VariableDouble.debug(),
                      "double_fixed": FixedDouble.debug()}
    for m, plugin in bundle_plugins.items():
        path = client.predict("a red circle on the left", 0, 30, api_name=f"/text_to_{m}")
        media = plugin.read(path)
        assert Path(path).suffix in plugin.file_extensions and media.numel() > 0, m
    grid = np.asarray(Image.open(client.predict("a red circle", 0, 30, api_name="/text_to_double_grid")))
    again = np.asarray(Image.open(client.predict("a red circle", 0, 30, api_name="/text_to_double_grid")))
    np.testing.assert_array_equal(grid, again)  # seeded


def test_the_samples_slider_reaches_the_pipeline_and_is_capped(running_app: tuple[TesseraApp, str],
                                                                client: Client) -> None:
    app = running_app[0]
    pipe = app.tasks["text-to-double_grid"]
    saved = dict(app.bundle.settings.get("best_of", {}))
    app.bundle.settings["best_of"] = {"double_grid": 3}
    try:
        assert app.default_best_of(pipe) == 3
        app.bundle.settings["best_of"] = {"double_grid": 64}
        assert app.default_best_of(pipe) == app.limits.max_best_of == 4  # the demo's cap wins
        # the slider's value is the best_of the pipeline gets: the same image as calling it so
        for k in (1, 3):
            served = np.asarray(Image.open(client.predict("a red circle", 0, 30, k, api_name="/text_to_double_grid")))
            direct = pipe("a red circle", seed=0, best_of=k)
            np.testing.assert_array_equal(served, np.asarray(Image.open(app.write_media("double_grid", direct))))
        app.bundle.settings["best_of"] = {"double_grid": 0}  # a bad bundle setting is named, not clamped
        with pytest.raises(ValueError, match=r"settings\['best_of'\]\['double_grid'\]=0 must be an integer >= 1"):
            app.default_best_of(pipe)
        app.bundle.settings["best_of"] = {"double_grid": 2}
        for bad in (0, 5, 2.5):
            with pytest.raises(ValueError, match=rf"samples {bad}: this demo draws 1 to 4 samples"):
                app.text_to_media("text-to-double_grid", "a red circle", 0, 30, bad)
    finally:
        app.bundle.settings["best_of"] = saved


def test_media_to_text_and_the_tokenizer_lab(client: Client, tmp_path: Path) -> None:
    image = client.predict(3, api_name="/example_double_grid")
    text = client.predict(handle_file(image), 0, 12, api_name="/double_grid_to_text")
    assert isinstance(text, str)
    tokens, recon, metrics, usage = client.predict(handle_file(image), api_name="/lab_double_grid")
    plugin = GridDouble.debug()
    ids = plugin.encode(plugin.read(image))
    assert tokens.splitlines()[0].startswith(f"{ids.numel()} tokens")
    assert len(tokens.splitlines()) == 1 + ids.numel() - 2  # one line per step after the 2 meta tokens
    assert metrics["tokens"] == ids.numel() and 5 < metrics["psnr_db"] < 60
    assert 1 <= usage["level 0"]["codes used"] <= 16 and usage["level 0"]["codebook size"] == 16
    assert plugin.read(recon).shape == plugin.read(image).shape

    audio = client.predict(1, api_name="/example_double_variable")
    _, _, metrics, _ = client.predict(handle_file(audio), api_name="/lab_double_variable")
    assert metrics["snr_db"] > 20  # the 3-level residual double is close to lossless

    signal = tmp_path / "signal.txt"
    np.savetxt(signal, np.linspace(0, 1, 16))
    _, _, metrics, usage = client.predict(handle_file(str(signal)), api_name="/lab_double_fixed")
    assert metrics["mse"] < 1e-3 and usage["level 0"]["codes used"] == 16


def test_chat_takes_text_and_files_and_keeps_the_conversation(client: Client) -> None:
    image = client.predict(2, api_name="/example_double_grid")
    box, history = client.predict({"text": "describe this image", "files": [handle_file(image)]}, 0, 20,
                                  api_name="/chat")
    assert box["text"] == "" and [m["role"] for m in history[:2]] == ["user", "user"]
    assert history[1]["content"][0]["text"] == "describe this image"
    assert any(m["role"] == "assistant" for m in history)
    _, longer = client.predict({"text": "and again", "files": []}, 1, 20, api_name="/chat")  # the session's state
    assert longer[: len(history)] == history and longer[len(history)]["content"][0]["text"] == "and again"
    client.predict(api_name="/clear_chat")
    _, fresh = client.predict({"text": "hello", "files": []}, 0, 20, api_name="/chat")
    assert fresh[0]["content"][0]["text"] == "hello"


def test_bad_uploads_and_requests_get_a_readable_message(client: Client, tmp_path: Path) -> None:
    not_audio = tmp_path / "noise.wav"
    not_audio.write_bytes(b"this is not a wav file")
    with pytest.raises(AppError, match="noise.wav"):
        client.predict(handle_file(str(not_audio)), 0, 10, api_name="/double_variable_to_text")
    picture = tmp_path / "picture.png"
    Image.new("RGB", (4, 4)).save(picture)
    with pytest.raises(AppError, match=r"picture.png: the double_fixed tokenizer reads \.txt files"):
        client.predict(handle_file(str(picture)), api_name="/lab_double_fixed")
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(AppError, match="cannot identify image file"):
        client.predict(handle_file(str(broken)), api_name="/lab_double_grid")
    with pytest.raises(AppError, match="type a caption"):
        client.predict("   ", 0, 10, api_name="/text_to_double_grid")
    with pytest.raises(AppError, match="up to 200"):
        client.predict("x" * 201, 0, 10, api_name="/text_to_double_grid")
    odd = tmp_path / "scene.xyz"
    odd.write_text("1 2 3")
    with pytest.raises(AppError, match=r"upload a file that is one of these formats: \['.png', '.txt', '.wav'\]"):
        client.predict({"text": "what is this", "files": [handle_file(str(odd))]}, 0, 10, api_name="/chat")
    with pytest.raises(AppError, match="type a message or attach a file"):
        client.predict({"text": "", "files": []}, 0, 10, api_name="/chat")


def test_limits_refuse_long_and_large_uploads(running_app: tuple[TesseraApp, str], tmp_path: Path) -> None:
    app = running_app[0]
    long_wav = tmp_path / "long.wav"
    with wave.open(str(long_wav), "wb") as w:  # 6 s of silence at 8 kHz; the debug limit is 5 s
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(struct.pack("<h", 0) * 8000 * 6)
    with pytest.raises(ValueError, match=r"long.wav lasts 6.0 s; this demo takes audio up to 5 s"):
        app.read_upload("double_variable", str(long_wav))
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1200, 3), dtype=np.uint8)).save(big)
    with pytest.raises(ValueError, match=r"big.png is \d+\.\d MB; this demo takes uploads up to 2 MB"):
        app.read_upload("double_grid", str(big))
    odd = tmp_path / "scene.xyz"
    odd.write_text("1 2 3")
    with pytest.raises(ValueError, match=r"scene.xyz: no tokenizer of this bundle reads .xyz files; give one of .png"):
        app.chat({"text": "what is this", "files": [str(odd)]}, {}, 0, 10)
    with pytest.raises(ValueError, match="generates 1 to 64 tokens"):
        app.media_to_text("double_grid-to-text", app.example("double_grid"), 0, 65)
    assert app.limits.queue_size == 4 and torch.is_tensor(app.read_upload("double_grid", app.example("double_grid")))


def test_without_a_default_bundle_the_app_serves_a_tiny_one_and_says_so(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "DEFAULT_BUNDLE", tmp_path / "not_built")
    bundle, notice = app_bundle()
    assert bundle.path is None and notice is not None
    assert "not_built" in notice and "untrained" in notice and "tessera build-default" in notice
    with pytest.raises(ValueError, match="no manifest.json"):
        app_bundle(tmp_path / "elsewhere")
