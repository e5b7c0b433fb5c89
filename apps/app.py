"""The Tessera Gradio app (``tessera demo [BUNDLE]``): multimodal chat, one tab per task, a tokenizer lab.

The app is thin: every button calls a :mod:`tessera.pipelines.tasks` pipeline or a
plugin's own ``read``/``encode``/``decode``/``write``, as the CLI does. Nothing in it
names a modality: the tabs come from :func:`~tessera.pipelines.tasks.tasks_for` and the
bundle's tokenizers, and the input/output widget of each comes from the plugin's declared
``media_kind`` through one mapping, :func:`media_component` (image → ``gr.Image``,
audio → ``gr.Audio``, video → ``gr.Video``, any other kind → ``gr.File`` in the plugin's
own file format). Media travel as files, read and written by the plugin, so a new
modality plugin appears in the app without editing it.

Limits a public demo needs (:class:`AppLimits`): upload size, audio/video duration, text
length, generated tokens, and a bounded queue (``demo.queue(max_size=...)``, one request
at a time). A user's mistake (a ``ValueError`` from the app or a pipeline, e.g. an
unreadable upload) is shown in the UI as a ``gr.Error`` with the message; a file Gradio
itself cannot open (a broken image) is reported with Gradio's message; never a stack trace.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network at run time

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from ..core.metrics import psnr  # noqa: E402
from ..core.spec import ModalityPlugin  # noqa: E402
from ..pipelines.bundle import DEFAULT_BUNDLE, Bundle, load_bundle, tiny_bundle  # noqa: E402
from ..pipelines.tasks import ChatPipeline, MediaToTextPipeline, TextToMediaPipeline, tasks_for  # noqa: E402
from .cli import modality_for_file  # noqa: E402

__all__ = ["AppLimits", "TesseraApp", "media_component", "app_bundle", "build_app", "serve", "launch"]

log = logging.getLogger(__name__)

_PREFERRED_EXT = {"image": ".png", "audio": ".wav", "video": ".mp4"}


@dataclass(kw_only=True)
class AppLimits:
    """What one request may ask of a public demo."""

    max_upload_mb: float = 20.0
    max_seconds: float = 30.0  # longest audio or video upload
    max_text_chars: int = 500
    max_new_tokens: int = 1024  # most tokens one request generates
    max_best_of: int = 32  # most samples one text->media request draws to keep the best
    queue_size: int = 16  # requests waiting; more are turned away

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"AppLimits.{name}={value!r} must be positive")

    @classmethod
    def debug(cls) -> AppLimits:
        """Small limits for tests."""
        return cls(max_upload_mb=2.0, max_seconds=5.0, max_text_chars=200, max_new_tokens=64, max_best_of=4, queue_size=4)


def media_component(media_kind: str, *, label: str, interactive: bool) -> gr.components.Component:
    """The one mapping from a plugin's media kind to a Gradio component (values are file paths)."""
    if media_kind == "image":
        return gr.Image(type="filepath", label=label, interactive=interactive, sources=["upload"])
    if media_kind == "audio":
        return gr.Audio(type="filepath", label=label, interactive=interactive, sources=["upload"])
    if media_kind == "video":
        return gr.Video(label=label, interactive=interactive, sources=["upload"])
    return gr.File(label=label, interactive=interactive)


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Show a user's mistake (ValueError) in the UI as its message, not as a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False) from e

    return wrapper


def _duration(path: str) -> float | None:
    """Seconds of an audio or video file (None when the container does not say)."""
    import av

    try:
        with av.open(path) as container:
            return None if container.duration is None else container.duration / av.time_base
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"{Path(path).name}: not a readable audio or video file ({e})") from e


class TesseraApp:
    """The app's behaviour over one bundle, as plain methods (the UI in :meth:`build` wires them)."""

    def __init__(self, bundle: Bundle, *, limits: AppLimits | None = None, notice: str | None = None) -> None:
        self.bundle = bundle
        self.limits = limits or AppLimits()
        self.notice = notice
        self.tasks = tasks_for(bundle)
        self.chat_pipeline = ChatPipeline(bundle)
        self.out_dir = Path(tempfile.mkdtemp(prefix="tessera-app-"))

    # ---- media in and out ---------------------------------------------------------------
    def plugin(self, modality: str) -> ModalityPlugin:
        if modality not in self.bundle.tokenizers:
            raise ValueError(f"modality {modality!r} is not in this bundle ({list(self.bundle.tokenizers)})")
        return self.bundle.tokenizers[modality]

    def read_upload(self, modality: str, path: str | None) -> Any:
        """An uploaded file → canonical media, within the limits."""
        plugin = self.plugin(modality)
        if not path:
            raise ValueError(f"no file: upload a {plugin.media_kind} file ({', '.join(plugin.file_extensions)})")
        name = Path(path).name
        size_mb = os.path.getsize(path) / 1e6
        if size_mb > self.limits.max_upload_mb:
            raise ValueError(f"{name} is {size_mb:.1f} MB; this demo takes uploads up to "
                             f"{self.limits.max_upload_mb:g} MB, upload a smaller file")
        if Path(path).suffix.lower() not in plugin.file_extensions:
            raise ValueError(f"{name}: the {modality} tokenizer reads {', '.join(plugin.file_extensions)} files; "
                             f"convert it to one of those")
        if plugin.media_kind in ("audio", "video"):
            seconds = _duration(path)
            if seconds is not None and seconds > self.limits.max_seconds:
                raise ValueError(f"{name} lasts {seconds:.1f} s; this demo takes {plugin.media_kind} up to "
                                 f"{self.limits.max_seconds:g} s, cut it shorter")
        return plugin.read(path)

    def write_media(self, modality: str, media: Any) -> str:
        """Media → a file the browser can show, in the plugin's format."""
        plugin = self.plugin(modality)
        ext = _PREFERRED_EXT.get(plugin.media_kind)
        ext = ext if ext in plugin.file_extensions else plugin.file_extensions[0]
        path = self.out_dir / f"{modality}-{uuid.uuid4().hex[:12]}{ext}"
        plugin.write(media, str(path))
        return str(path)

    def _new_tokens(self, requested: float | None) -> int:
        n = int(requested or self.limits.max_new_tokens)
        if not 1 <= n <= self.limits.max_new_tokens:
            raise ValueError(f"max new tokens {n}: this demo generates 1 to {self.limits.max_new_tokens} tokens")
        return n

    def _text(self, text: str | None, what: str) -> str:
        text = (text or "").strip()
        if len(text) > self.limits.max_text_chars:
            raise ValueError(f"the {what} is {len(text)} characters; this demo takes up to "
                             f"{self.limits.max_text_chars}, shorten it")
        return text

    # ---- tasks --------------------------------------------------------------------------
    def text_to_media(self, task: str, caption: str, seed: float = 0, max_new_tokens: float | None = None,
                      best_of: float | None = None) -> str:
        pipe = self.tasks[task]
        if not isinstance(pipe, TextToMediaPipeline):
            raise ValueError(f"{task!r} is not a text-to-media task")
        caption = self._text(caption, "caption")
        if not caption:
            raise ValueError("type a caption, e.g. 'a red circle on the left'")
        media = pipe(caption, seed=int(seed), max_new_tokens=self._capped_media_tokens(pipe, max_new_tokens),
                     best_of=self._best_of(pipe, best_of))
        return self.write_media(pipe.modality, media)

    def default_best_of(self, pipe: TextToMediaPipeline) -> int:
        """The bundle's ``best_of`` for the modality (checked by the pipeline), within this demo's limit."""
        return min(pipe.resolve_best_of(), self.limits.max_best_of)

    def _best_of(self, pipe: TextToMediaPipeline, requested: float | None) -> int:
        if requested is None:
            return self.default_best_of(pipe)
        n = int(requested)
        if n != requested or not 1 <= n <= self.limits.max_best_of:
            raise ValueError(f"samples {requested}: this demo draws 1 to {self.limits.max_best_of} samples a request "
                             f"(more is slower and usually better; 1 is fastest)")
        return n

    def _capped_media_tokens(self, pipe: TextToMediaPipeline, requested: float | None) -> int | None:
        """A fixed-size span is generated whole (the pipeline knows its length); a variable
        one is capped by the request and the demo's limit."""
        if pipe.layout.kind != "variable":
            return None
        return self._new_tokens(requested)

    def media_to_text(self, task: str, path: str | None, seed: float = 0, max_new_tokens: float | None = None) -> str:
        pipe = self.tasks[task]
        if not isinstance(pipe, MediaToTextPipeline):
            raise ValueError(f"{task!r} is not a media-to-text task")
        media = self.read_upload(pipe.modality, path)
        return pipe(media, seed=int(seed), max_new_tokens=self._new_tokens(max_new_tokens))

    # ---- chat ---------------------------------------------------------------------------
    def chat(self, message: dict[str, Any] | None, state: dict[str, list[dict[str, Any]]] | None, seed: float = 0,
             max_new_tokens: float | None = None) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
        """One turn: the user's text and files → (the cleared input box, the chat shown, the new state).
        ``state`` holds the chat shown (``"history"``, media as files) and the conversation as
        the model sees it (``"messages"``, media as token ids, so nothing is encoded twice)."""
        message = message or {}
        text = self._text(message.get("text"), "message")
        files = [f if isinstance(f, str) else f["path"] for f in message.get("files") or []]
        if not text and not files:
            raise ValueError("type a message or attach a file")
        history = list((state or {}).get("history", []))
        parts: list[dict[str, Any]] = []
        for path in files:
            modality = modality_for_file(self.bundle, path)
            ids = torch.as_tensor(self.plugin(modality).encode(self.read_upload(modality, path)))
            parts.append({"type": modality, "ids": ids.tolist()})
            history.append({"role": "user", "content": {"path": path}})
        if text:
            parts.append({"type": "text", "text": text})
            history.append({"role": "user", "content": text})
        messages = [*(state or {}).get("messages", []), {"role": "user", "content": parts}]
        reply = self.chat_pipeline(messages, seed=int(seed), max_new_tokens=self._new_tokens(max_new_tokens))
        kept: list[dict[str, Any]] = []
        for part in reply:
            if part["type"] == "text":
                history.append({"role": "assistant", "content": part["text"]})
                kept.append(part)
            else:
                history.append({"role": "assistant", "content": {"path": self.write_media(part["type"], part["media"])}})
                kept.append({"type": part["type"], "ids": part["ids"]})
        if not reply:
            history.append({"role": "assistant", "content": "(the model ended its turn without output)"})
        messages.append({"role": "assistant", "content": kept})
        return {"text": "", "files": []}, history, {"history": history, "messages": messages}

    # ---- tokenizer lab ------------------------------------------------------------------
    def example(self, modality: str, seed: float = 0) -> str:
        """A file of the plugin's built-in world, to try the lab without an upload."""
        return self.write_media(modality, self.plugin(modality).example(int(seed)))

    def lab(self, modality: str, path: str | None) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
        """Upload → (the tokens, the reconstruction's file, metrics, codebook usage)."""
        plugin = self.plugin(modality)
        layout = self.bundle.vocab.spec(modality).layout
        media = self.read_upload(modality, path)
        ids = torch.as_tensor(plugin.encode(media))
        recon = plugin.decode(ids)
        meta, codes = layout.unflatten(ids)  # codes: (steps, levels)
        lines = [f"{ids.numel()} tokens" + (f"; meta {meta}" if meta else "")]
        lines += [" ".join(str(int(c)) for c in step) for step in codes]
        bits = (sum(n * math.log2(hi - lo) for n, lo, hi in layout.parts) if layout.parts  # each part its own codes
                else sum(math.log2(size) for size in layout.levels) * codes.shape[0])
        metrics: dict[str, Any] = {"tokens": int(ids.numel()), "steps": int(codes.shape[0]), "bits": round(bits, 1)}
        metrics.update(_quality(plugin.media_kind, media, recon))
        usage = {}
        for level, size in enumerate(layout.levels):
            counts = torch.bincount(codes[:, level], minlength=size).float()
            p = counts[counts > 0] / counts.sum()
            usage[f"level {level}"] = {"codes used": int((counts > 0).sum()), "codebook size": size,
                                       "usage": round(float((counts > 0).float().mean()), 4),
                                       "perplexity": round(float(torch.exp(-(p * p.log()).sum())), 2)}
        return "\n".join(lines), self.write_media(modality, recon), metrics, usage

    # ---- the UI -------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        b = self.bundle
        with gr.Blocks(title="Tessera") as demo:
            gr.Markdown(f"# Tessera\nEvery modality as tokens of one vocabulary, read and written by one LLM. "
                        f"Bundle: `{b.path or 'in memory'}` — modalities {', '.join(b.modalities)}, "
                        f"{b.model.num_params() / 1e6:.1f}M-parameter LLM.")
            if self.notice:
                gr.Markdown(f"**Note:** {self.notice}", elem_id="notice")
            with gr.Tabs():
                with gr.Tab("Chat"):
                    self._chat_tab()
                for task, pipe in self.tasks.items():
                    if isinstance(pipe, (TextToMediaPipeline, MediaToTextPipeline)):
                        with gr.Tab(task):
                            self._task_tab(task, pipe)
                with gr.Tab("Tokenizer lab"):
                    for modality in b.tokenizers:
                        with gr.Tab(modality):
                            self._lab_tab(modality)
        return demo

    def _settings(self) -> tuple[gr.Number, gr.Slider]:
        with gr.Row():
            seed = gr.Number(value=0, precision=0, label="seed")
            tokens = gr.Slider(1, self.limits.max_new_tokens, value=min(256, self.limits.max_new_tokens), step=1,
                               label="max new tokens")
        return seed, tokens

    def _chat_tab(self) -> None:
        extensions = sorted({e for p in self.bundle.tokenizers.values() for e in p.file_extensions})
        chatbot = gr.Chatbot(label="Tessera", height=420, elem_id="chatbot")
        box = gr.MultimodalTextbox(placeholder="Ask, or attach media (" + " ".join(extensions) + ")",
                                   file_types=extensions, file_count="multiple", show_label=False, elem_id="chat-input")
        seed, tokens = self._settings()
        state = gr.State({})
        box.submit(_user_errors(self.chat), [box, state, seed, tokens], [box, chatbot, state], api_name="chat")
        gr.Button("Clear").click(lambda: ([], {}), None, [chatbot, state], api_name="clear_chat")

    def _task_tab(self, task: str, pipe: TextToMediaPipeline | MediaToTextPipeline) -> None:
        kind = pipe.plugin.media_kind
        api = task.replace("-", "_")
        if isinstance(pipe, TextToMediaPipeline):
            caption = gr.Textbox(label="caption", placeholder="a red circle on the left")
            seed, tokens = self._settings()
            samples = gr.Slider(1, self.limits.max_best_of, value=self.default_best_of(pipe), step=1,
                                label="samples (keeps the one the model captions best; fewer is faster)")
            output = media_component(kind, label=pipe.modality, interactive=False)
            run = _user_errors(functools.partial(self.text_to_media, task))
            gr.Button("Generate", variant="primary").click(run, [caption, seed, tokens, samples], output, api_name=api)
        else:
            upload = media_component(kind, label=pipe.modality, interactive=True)
            seed, tokens = self._settings()
            text = gr.Textbox(label="text")
            run = _user_errors(functools.partial(self.media_to_text, task))
            gr.Button("Describe", variant="primary").click(run, [upload, seed, tokens], text, api_name=api)

    def _lab_tab(self, modality: str) -> None:
        kind = self.plugin(modality).media_kind
        with gr.Row():
            upload = media_component(kind, label=f"{modality} in", interactive=True)
            recon = media_component(kind, label="reconstruction (encode → decode)", interactive=False)
        with gr.Row():
            example_seed = gr.Number(value=0, precision=0, label="example seed")
            gr.Button("Load a built-in example").click(_user_errors(functools.partial(self.example, modality)),
                                                       example_seed, upload, api_name=f"example_{modality}")
            tokenize = gr.Button("Tokenize", variant="primary")
        with gr.Row():
            tokens = gr.Textbox(label="tokens (one line per step, local ids)", lines=8, max_lines=16)
            metrics = gr.JSON(label="metrics")
            usage = gr.JSON(label="codebook usage")
        tokenize.click(_user_errors(functools.partial(self.lab, modality)), upload, [tokens, recon, metrics, usage],
                       api_name=f"lab_{modality}")


def _quality(media_kind: str, media: Any, recon: Any) -> dict[str, float]:
    """Reconstruction quality: PSNR for images and video in [0, 1], SNR for audio, MSE otherwise."""
    if not (isinstance(media, torch.Tensor) and isinstance(recon, torch.Tensor)) or media.shape != recon.shape:
        return {}
    x, y = media.float(), recon.float()
    if media_kind in ("image", "video"):
        return {"psnr_db": round(float(psnr(y[None], x[None])), 2)}
    mse = float((x - y).pow(2).mean())
    if media_kind == "audio":
        return {"snr_db": round(10 * math.log10(float(x.pow(2).mean()) / max(mse, 1e-12) + 1e-12), 2)}
    return {"mse": round(mse, 6)}


def app_bundle(path: str | os.PathLike | None = None, *, compile: bool = False) -> tuple[Bundle, str | None]:
    """The bundle to serve and a notice for the page: ``path``, else the default bundle, else
    (when it has not been built yet) a tiny untrained one, with a notice saying so.
    ``compile``: decode through ``torch.compile`` (:attr:`Bundle.compile`)."""
    if path is not None:
        return load_bundle(path, compile=compile), None
    if (DEFAULT_BUNDLE / "manifest.json").is_file():
        return load_bundle(DEFAULT_BUNDLE, compile=compile), None
    notice = (f"no trained default bundle at {DEFAULT_BUNDLE}, so this is a tiny untrained bundle and its outputs "
              f"are noise. Build the real one with `tessera build-default`, or pass a bundle: `tessera demo BUNDLE`.")
    log.warning(notice)
    bundle = tiny_bundle()
    bundle.compile = compile
    return bundle, notice


def build_app(app: TesseraApp) -> gr.Blocks:
    """The Gradio Blocks with its bounded queue (one request runs at a time)."""
    return app.build().queue(max_size=app.limits.queue_size, default_concurrency_limit=1)


def serve(app: TesseraApp, *, host: str = "127.0.0.1", port: int | None = None,
          block: bool = False) -> tuple[gr.Blocks, str]:
    """Start the app; returns (the Blocks, its URL). With ``block=False`` it serves from a
    thread (stop it with ``demo.close()``)."""
    demo = build_app(app)
    demo.launch(server_name=host, server_port=port, max_file_size=int(app.limits.max_upload_mb * 1e6),
                share=False, show_error=True, prevent_thread_lock=True, quiet=not block, inbrowser=False)
    url = f"http://{host}:{demo.server_port}/"
    if block:
        print(f"Tessera demo at {url} (Ctrl+C stops it)")
        demo.block_thread()
    return demo, url


def launch(path: str | os.PathLike | None = None, *, host: str = "127.0.0.1", port: int = 7860,
           limits: AppLimits | None = None, compile: bool = False) -> None:
    """``tessera demo [BUNDLE]``: serve until interrupted (``compile``: see :func:`app_bundle`)."""
    bundle, notice = app_bundle(path, compile=compile)
    if notice:
        print(f"tessera demo: {notice}")
    serve(TesseraApp(bundle, limits=limits, notice=notice), host=host, port=port, block=True)
