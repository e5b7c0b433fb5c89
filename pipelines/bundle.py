"""The Tessera bundle: everything needed to read and write every modality, in one folder.

    BUNDLE/
      manifest.json            the unified vocabulary (core/vocab.py), with its hash
      text.model               the sentencepiece text tokenizer
      tokenizers/<name>/       one folder per modality plugin (its own config JSON + safetensors)
      llm/                     config.json + model.safetensors (TesseraLM.save_pretrained)
      settings.json            which plugin class reads each tokenizer folder, default sampling
                               per modality, classifier-free guidance scales, limits

:func:`load_bundle` checks every part against the manifest before anything runs: the
text model's sha256, every tokenizer's fingerprint (a hash of its weights) and full spec,
and the manifest hash the LLM was trained with; a mismatch is refused with a message
that names the file, what differs and how to fix it. Nothing is loaded with pickle.

:func:`add_modality` grows a (trained) bundle by one modality: the vocabulary appends
its range (no id moves), the LLM's embedding grows append-only (old rows and old logits
untouched), and the manifest and settings record it. :func:`replace_modality` swaps one
modality's tokenizer for another (a better checkpoint) and carries every embedding row
that keeps its meaning to its new id.
"""

from __future__ import annotations

import copy
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.checkpoint import CheckpointError, load_json, save_json, sha256_file
from ..core.grammar import Grammar
from ..core.registry import RegistryError, get_modality
from ..core.spec import ModalityPlugin
from ..core.text import TextTokenizer
from ..core.vocab import GLOBAL_SPECIALS, ManifestMismatchError, UnifiedVocab
from ..llm.generate import SamplingConfig
from ..llm.model import LLMConfig, TesseraLM

__all__ = [
    "Bundle",
    "BundleError",
    "DEFAULT_BUNDLE",
    "load_bundle",
    "load_tokenizers",
    "read_vocab",
    "save_bundle",
    "create_bundle",
    "add_modality",
    "replace_modality",
    "grow_llm",
    "default_settings",
    "tiny_bundle",
]

DEFAULT_BUNDLE = Path(__file__).resolve().parent / "default_bundle"
"""The committed default bundle (built by ``tessera build-default``)."""

SETTINGS_VERSION = 1
_MEDIA_CFG = {"image": 1.5, "video": 1.5}  # guidance helps visual spans; speech follows its text closely


class BundleError(ValueError):
    """A bundle folder is incomplete, or one of its parts does not match its manifest."""


@dataclass
class Bundle:
    """A loaded bundle. ``tokenizers`` maps modality name → plugin instance, in vocabulary order."""

    path: Path | None
    vocab: UnifiedVocab
    text: TextTokenizer
    tokenizers: dict[str, ModalityPlugin]
    model: TesseraLM
    grammar: Grammar
    settings: dict[str, Any] = field(default_factory=dict)
    compile: bool = False
    """Run the pipelines' decode steps through ``torch.compile`` (see :func:`~tessera.llm.generate.stream`):
    1.3-2x faster generation after a first request that compiles (~1 min on 2 CPU cores).
    A runtime choice for long-running servers and evaluations; never saved."""

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.vocab.modalities

    def sampling(self, overrides: dict[str, SamplingConfig] | None = None) -> dict[str, SamplingConfig]:
        """Per-modality sampling: the bundle's defaults with ``overrides`` on top."""
        out = {k: SamplingConfig.from_dict(v) for k, v in self.settings["sampling"].items()}
        for k, v in (overrides or {}).items():
            if k != "text" and k not in self.modalities:
                raise ValueError(f"sampling key {k!r} is not 'text' or a modality of the bundle {list(self.modalities)}")
            if not isinstance(v, SamplingConfig):
                raise ValueError(f"sampling[{k!r}] is a {type(v).__name__}; pass a SamplingConfig(temperature=..., ...)")
            out[k] = v
        return out

    def cfg_scales(self, override: float | dict[str, float] | None = None) -> dict[str, float]:
        """Per-modality guidance scales (1.0 = no guidance), the bundle's defaults unless overridden;
        a single number applies to every media span."""
        scales = {k: float(v) for k, v in self.settings["cfg_scale"].items()}
        if override is None:
            return scales
        if isinstance(override, (int, float)) and not isinstance(override, bool):
            return {"text": 1.0, **{m: float(override) for m in self.modalities}}
        if isinstance(override, dict):
            bad = [k for k in override if k != "text" and k not in self.modalities]
            if bad:
                raise ValueError(f"cfg_scale keys {bad} are not 'text' or a modality of the bundle {list(self.modalities)}")
            return {**scales, **{k: float(v) for k, v in override.items()}}
        raise ValueError(f"cfg_scale={override!r}; give a number (e.g. 2.0) or a dict per modality, or None")

    def __repr__(self) -> str:
        return (f"Bundle(path={self.path}, vocab={self.vocab.size} ids, modalities={list(self.modalities)}, "
                f"llm={self.model.num_params() / 1e6:.1f}M params)")


def default_settings(plugins: dict[str, ModalityPlugin]) -> dict[str, Any]:
    """Settings for a new bundle: greedy text, sampled media, guidance on visual spans, and
    for layouts with meta tokens the shape to generate (that of the plugin's own example)."""
    return {
        "version": SETTINGS_VERSION,
        "plugins": {name: _class_path(p) for name, p in plugins.items()},
        "sampling": {"text": SamplingConfig(temperature=0.0).to_dict(),
                     **{m: SamplingConfig(temperature=0.8, top_k=50).to_dict() for m in plugins}},
        "cfg_scale": {"text": 1.0, **{m: _MEDIA_CFG.get(p.media_kind, 1.0) for m, p in plugins.items()}},
        "meta": {m: _example_meta(p) for m, p in plugins.items() if p.spec.layout.meta},
        "limits": {"max_text_tokens": 96, "max_media_tokens": 600},
    }


def _example_meta(plugin: ModalityPlugin) -> dict[str, int]:
    """The meta values (e.g. grid height and width) of the plugin's built-in example."""
    meta, _ = plugin.spec.layout.unflatten(torch.as_tensor(plugin.encode(plugin.example(0))))
    return meta


def _class_path(plugin: ModalityPlugin) -> str:
    cls = type(plugin)
    return f"{cls.__module__}:{cls.__qualname__}"


def _plugin_class(name: str, class_path: str | None) -> type:
    """The registered plugin for ``name``, else the class recorded in settings.json."""
    try:
        return get_modality(name)
    except RegistryError as e:
        if class_path is None:
            raise BundleError(f"{e}; the bundle does not record which class reads its {name!r} tokenizer") from e
        module, _, qualname = class_path.partition(":")
        try:
            obj: Any = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e2:
            raise BundleError(f"the bundle's {name!r} tokenizer is read by {class_path}, which cannot be imported "
                              f"({e2}); install the package that provides it") from e2
        return obj


# ---- loading -------------------------------------------------------------------------
def read_vocab(path: str | os.PathLike) -> UnifiedVocab:
    """The vocabulary of the bundle folder ``path`` (its manifest, checked against its hash)."""
    folder = Path(path)
    if not (folder / "manifest.json").is_file():
        raise BundleError(f"{folder} is not a Tessera bundle (no manifest.json); build one with "
                          f"`tessera build-default --out {folder}` or save one with save_bundle")
    try:
        return UnifiedVocab.load_manifest(folder / "manifest.json")
    except ManifestMismatchError as e:
        raise BundleError(str(e)) from e


def load_tokenizers(path: str | os.PathLike) -> tuple[UnifiedVocab, TextTokenizer, dict[str, ModalityPlugin], dict[str, Any]]:
    """The checked vocabulary, text tokenizer, modality tokenizers and settings of a
    bundle folder, without the LLM (what `tessera tokenize` workers need)."""
    folder = Path(path)
    vocab = read_vocab(folder)
    manifest = vocab.manifest()
    settings = load_json(folder / "settings.json")

    # 1. the text model
    text_file = folder / "text.model"
    if not text_file.is_file():
        raise BundleError(f"{text_file}: missing; the bundle is incomplete, restore the file or rebuild the bundle")
    want = manifest["text"]["sha256"]
    got = sha256_file(text_file)
    if want is not None and got != want:
        raise BundleError(f"{text_file}: sha256 {got[:12]} differs from the manifest's text model {want[:12]}; the "
                          f"file was replaced or edited. Restore the original text.model (ids would mean other text)")
    text = TextTokenizer.load(text_file)
    if text.vocab_size != vocab.text_size:
        raise BundleError(f"{text_file}: {text.vocab_size} text ids, the manifest says {vocab.text_size}; restore it")

    # 2. the modality tokenizers
    tokenizers: dict[str, ModalityPlugin] = {}
    for name in vocab.modalities:
        sub = folder / "tokenizers" / name
        if not sub.is_dir():
            raise BundleError(f"{sub}: missing; the manifest lists modality {name!r}. Restore the folder or rebuild")
        cls = _plugin_class(name, settings.get("plugins", {}).get(name))
        try:
            plugin = cls.load(str(sub))
        except (ValueError, CheckpointError, RuntimeError, KeyError, OSError) as e:
            raise BundleError(f"{sub}: the {name} tokenizer does not load ({e}); restore the folder") from e
        expected = vocab.spec(name).to_dict()
        got_spec = plugin.spec.to_dict()
        if got_spec["fingerprint"] != expected["fingerprint"]:
            raise BundleError(
                f"{sub}: the {name} tokenizer's weights have fingerprint {got_spec['fingerprint'][:12]}, the manifest "
                f"was built with {expected['fingerprint'][:12]}; its tokens would mean other things to the LLM. "
                f"Restore the original weights, or add the new tokenizer as a new modality and fine-tune")
        diffs = [f"{k}: manifest {expected[k]!r}, tokenizer {got_spec[k]!r}" for k in expected if expected[k] != got_spec.get(k)]
        if diffs:
            raise BundleError(f"{sub}: the {name} tokenizer's spec differs from the manifest ({'; '.join(diffs)}); "
                              f"restore the folder the bundle was built with")
        tokenizers[name] = plugin
    return vocab, text, tokenizers, settings


def load_bundle(path: str | os.PathLike = DEFAULT_BUNDLE, *, device: str | torch.device = "cpu",
                compile: bool = False) -> Bundle:
    """Load and check a bundle folder (see the module docstring for what is checked).
    ``compile``: see :attr:`Bundle.compile`."""
    folder = Path(path)
    vocab, text, tokenizers, settings = load_tokenizers(folder)
    manifest = vocab.manifest()
    llm_dir = folder / "llm"
    try:
        model = TesseraLM.from_pretrained(llm_dir, expected_manifest=manifest, device=device)
    except ManifestMismatchError as e:
        raise BundleError(str(e)) from e
    except CheckpointError as e:
        raise BundleError(f"{llm_dir}: the LLM does not load ({e}); restore it or retrain") from e
    if model.config.vocab_size < vocab.size:
        raise BundleError(f"{llm_dir}: the LLM has {model.config.vocab_size} embedding rows for a vocabulary of "
                          f"{vocab.size}; resize it with add_modality")
    return Bundle(path=folder, vocab=vocab, text=text, tokenizers=tokenizers, model=model.eval(),
                  grammar=Grammar(vocab).to(device), settings=settings, compile=compile)


# ---- writing -------------------------------------------------------------------------
def save_bundle(bundle: Bundle, path: str | os.PathLike, *, dtype: torch.dtype | None = torch.bfloat16) -> None:
    """Write ``bundle`` to the folder ``path`` (created; an existing bundle there is
    overwritten file by file). The LLM is stored as ``dtype`` (bf16 by default; None keeps fp32)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = bundle.vocab.manifest()
    if bundle.text.sha256 != manifest["text"]["sha256"]:
        raise BundleError("the bundle's text tokenizer is not the one its vocabulary was built with; rebuild the vocabulary")
    for name, plugin in bundle.tokenizers.items():
        if plugin.spec.fingerprint != bundle.vocab.spec(name).fingerprint:
            raise BundleError(f"the {name} tokenizer's fingerprint differs from the vocabulary's; "
                              f"build the vocabulary from the tokenizers you save")
    bundle.text.save(folder / "text.model")
    for name, plugin in bundle.tokenizers.items():
        plugin.save(str(folder / "tokenizers" / name))
    bundle.model.save_pretrained(folder / "llm", manifest_hash=manifest["hash"], manifest=manifest, dtype=dtype)
    save_json(folder / "settings.json", bundle.settings)
    save_json(folder / "manifest.json", manifest)  # last: a half-written bundle has no valid manifest
    bundle.path = folder


def create_bundle(text: TextTokenizer, tokenizers: dict[str, ModalityPlugin], *,
                  model_config: LLMConfig | str = "debug", seed: int = 0) -> Bundle:
    """A new bundle with an untrained LLM: vocabulary = text ids, specials, then one range
    per tokenizer in the given order. ``model_config`` is an ``LLMConfig`` (its
    vocab_size is set to the vocabulary's) or a preset name."""
    for name, plugin in tokenizers.items():
        if plugin.spec.name != name:
            raise ValueError(f"tokenizers[{name!r}] is the {plugin.spec.name!r} tokenizer; key each tokenizer by its own name")
    vocab = UnifiedVocab.build(text.vocab_size, [p.spec for p in tokenizers.values()], text_sha256=text.sha256)
    if isinstance(model_config, str):
        config = LLMConfig.preset(model_config, vocab.size)
    elif isinstance(model_config, LLMConfig):
        config = LLMConfig.from_dict({**model_config.to_dict(), "vocab_size": vocab.size})
    else:
        raise ValueError(f"model_config={model_config!r}; give an LLMConfig or a preset name such as 'debug'")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TesseraLM(config).eval()
    model.manifest_hash = vocab.manifest_hash
    return Bundle(path=None, vocab=vocab, text=text, tokenizers=dict(tokenizers), model=model,
                  grammar=Grammar(vocab), settings=default_settings(tokenizers))


def add_modality(bundle: Bundle, plugin: ModalityPlugin, *, freeze_old: bool = False, seed: int = 0) -> Bundle:
    """A new bundle with ``plugin``'s modality appended: existing ids, embedding rows and
    their logits unchanged; new rows start at the mean of the old ones. The given bundle
    is left as it was; save the result with :func:`save_bundle`."""
    name = plugin.spec.name
    if name in bundle.vocab.modalities:
        raise ValueError(f"the bundle already has modality {name!r}; a modality is added once (pick another name)")
    vocab = bundle.vocab.add_modality(plugin.spec)
    model = copy.deepcopy(bundle.model)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.resize_vocab(vocab.size, freeze_old=freeze_old)
    model.manifest_hash = vocab.manifest_hash
    tokenizers = {**bundle.tokenizers, name: plugin}
    fresh = default_settings({name: plugin})
    settings = copy.deepcopy(bundle.settings)
    settings["plugins"][name] = fresh["plugins"][name]
    settings["sampling"][name] = fresh["sampling"][name]
    settings["cfg_scale"][name] = fresh["cfg_scale"][name]
    settings.setdefault("meta", {}).update(fresh["meta"])
    return Bundle(path=None, vocab=vocab, text=bundle.text, tokenizers=tokenizers, model=model.eval(),
                  grammar=Grammar(vocab), settings=settings)


def replace_modality(bundle: Bundle, plugin: ModalityPlugin, *, seed: int = 0,
                     noise_std: float = 0.01) -> tuple[Bundle, dict[str, int]]:
    """A new bundle whose ``plugin.spec.name`` tokenizer is ``plugin`` (e.g. a better
    image tokenizer), keeping everything the LLM learned about the rest.

    The vocabulary is rebuilt in the same order with the new spec, so the replaced block
    and the blocks after it may change size and move; the LLM's embedding (and untied
    head) rows are carried to their new ids: text, global specials, every other
    modality, the replaced modality's begin/end and extra special tokens, and its meta
    ids when its meta fields are unchanged (:meth:`TesseraLM.remap_vocab`). Only the new
    codes start fresh, at the mean of the old rows plus N(0, noise_std * row std) noise.
    Returns the bundle and counts ``{"kept": rows carried over, "fresh": new rows}``;
    the model must then be fine-tuned on data tokenized with the new tokenizer."""
    name = plugin.spec.name
    old = bundle.vocab
    if name not in old.modalities:
        raise ValueError(f"the bundle has no modality {name!r} to replace (it has {list(old.modalities)}); "
                         f"add it with add_modality instead")
    specs = [plugin.spec if m == name else old.spec(m) for m in old.modalities]
    vocab = UnifiedVocab.build(old.text_size, specs, text_sha256=old.text_sha256)
    # new id <- old id for every token that keeps its meaning
    n_fixed = old.text_size + len(GLOBAL_SPECIALS)
    pairs = [(torch.arange(n_fixed), torch.arange(n_fixed))]
    for m in old.modalities:
        extra = [t for t in old.spec(m).special_tokens if t in vocab.spec(m).special_tokens]
        kept = [f"<|begin_{m}|>", f"<|end_{m}|>", *extra]
        pairs.append((torch.tensor([old.special_id(t) for t in kept]), torch.tensor([vocab.special_id(t) for t in kept])))
        old_layout, new_layout = old.spec(m).layout, vocab.spec(m).layout
        n = old_layout.local_size if m != name else (old_layout.meta_size if old_layout.meta == new_layout.meta else 0)
        pairs.append((old.local_range(m)[0] + torch.arange(n), vocab.local_range(m)[0] + torch.arange(n)))
    src = torch.cat([p[0] for p in pairs])
    dst = torch.cat([p[1] for p in pairs])
    model = copy.deepcopy(bundle.model)
    model.remap_vocab(vocab.size, src, dst, noise_std=noise_std, generator=torch.Generator().manual_seed(seed))
    model.manifest_hash = vocab.manifest_hash
    settings = copy.deepcopy(bundle.settings)
    fresh_settings = default_settings({name: plugin})
    settings["plugins"][name] = fresh_settings["plugins"][name]
    settings.setdefault("meta", {}).pop(name, None)
    settings["meta"].update(fresh_settings["meta"])
    tokenizers = {m: plugin if m == name else t for m, t in bundle.tokenizers.items()}
    replaced = Bundle(path=None, vocab=vocab, text=bundle.text, tokenizers=tokenizers, model=model.eval(),
                      grammar=Grammar(vocab), settings=settings)
    return replaced, {"kept": int(src.numel()), "fresh": vocab.size - int(src.numel())}


def grow_llm(bundle: Bundle, *, every: int = 2) -> Bundle:
    """A new bundle whose LLM is deeper and computes the same function
    (:meth:`TesseraLM.grow_depth`: a zero-output copy after every ``every``-th block);
    vocabulary, tokenizers and settings are unchanged. Fine-tune it (``tessera train
    --init-from``) so the new blocks learn; the given bundle is left as it was."""
    model = bundle.model.grow_depth(every)
    return Bundle(path=None, vocab=bundle.vocab, text=bundle.text, tokenizers=dict(bundle.tokenizers),
                  model=model.eval(), grammar=bundle.grammar, settings=copy.deepcopy(bundle.settings))


# ---- a tiny bundle for tests -----------------------------------------------------------
_TINY_TEXT = [
    "a red circle on the left", "a blue square at the top", "a green star in the centre",
    "say hello", "draw a picture", "describe this image", "transcribe the audio", "hello world",
]


def tiny_bundle(path: str | os.PathLike | None = None, *, plugins: dict[str, ModalityPlugin] | None = None,
                seed: int = 0) -> Bundle:
    """A small untrained bundle in seconds: a 300-piece text model, the ``debug()`` image,
    video and speech tokenizers that this install provides (or ``plugins``), and the
    ``debug`` LLM with a 1024-token context. Saved to ``path`` when given (then loaded back, so it is checked)."""
    from .tasks import instruction_texts

    if plugins is None:
        plugins = {}
        for name in ("image", "video", "speech"):
            try:
                plugins[name] = get_modality(name).debug()
            except RegistryError:
                continue
    sentences = _TINY_TEXT + instruction_texts(plugins)
    text = TextTokenizer.train(sentences * 4, vocab_size=300)
    debug = LLMConfig.preset("debug", vocab_size=1)
    debug.max_seq_len = 1024  # room for a few seconds of speech codes
    bundle = create_bundle(text, plugins, model_config=debug, seed=seed)
    if path is None:
        return bundle
    save_bundle(bundle, path)
    return load_bundle(path)
