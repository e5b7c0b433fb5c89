"""The LLM: golden value, causality, packed documents, the static KV cache, append-only
vocabulary growth with frozen rows, checkpoints guarded by the manifest hash, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tessera.core.vocab import ManifestMismatchError
from tessera.llm.model import KVCache, LLMConfig, TesseraLM

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


def debug_model(vocab_size: int = 128, **overrides: object) -> TesseraLM:
    torch.manual_seed(0)
    config = LLMConfig.preset("debug", vocab_size)
    for k, v in overrides.items():
        setattr(config, k, v)
    return TesseraLM(config).eval()


def test_golden_logits_of_fixed_seed_debug_model() -> None:
    model = debug_model()
    ids = (torch.arange(24) * 7 % 128)[None]
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (1, 24, 128) and logits.dtype == torch.float32
    torch.testing.assert_close(logits.sum(), torch.tensor(-42.45848083496094), atol=2e-3, rtol=0)
    torch.testing.assert_close(logits.abs().sum(), torch.tensor(383.8223876953125), atol=2e-3, rtol=0)
    torch.testing.assert_close(logits[0, -1, :4], torch.tensor([-0.214126, -0.123648, 0.025818, 0.041058]),
                               atol=1e-5, rtol=0)


def test_attention_is_causal() -> None:
    model = debug_model()
    ids = torch.randint(0, 128, (2, 16))
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 128
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


def test_packed_documents_equal_running_them_separately() -> None:
    model = debug_model()
    docs = [torch.randint(0, 128, (n,)) for n in (5, 7, 4)]
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    segments = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed = model(ids, positions=positions, segment_ids=segments)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
        leaky = model(ids, positions=positions)[0]  # without segments the later docs see the earlier
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert (leaky[5:] - alone[5:]).abs().max() > 1e-3


def test_kv_cache_chunks_equal_one_forward_pass() -> None:
    model = debug_model(n_kv_heads=1)
    ids = torch.randint(0, 128, (2, 20))
    cache = KVCache(model.config, 2, 32)
    with torch.no_grad():
        full = model(ids)
        parts = [model(ids[:, a:b], kv_cache=cache) for a, b in ((0, 8), (8, 9), (9, 20))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 20
    with pytest.raises(ValueError, match="exceeds the limit 32"):
        model(ids, kv_cache=cache)


@pytest.mark.parametrize("tied", [False, True])
def test_resize_keeps_old_rows_and_old_logits(tied: bool) -> None:
    model = debug_model(tie_embeddings=tied)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        before = model(ids)
    old_emb = model.tok_emb.weight.detach().clone()
    model.resize_vocab(160)
    with torch.no_grad():
        after = model(ids)
    assert model.config.vocab_size == 160 and after.shape == (2, 12, 160)
    assert torch.equal(model.tok_emb.weight[:128], old_emb)
    torch.testing.assert_close(after[..., :128], before)
    new = model.tok_emb.weight[128:].detach()
    # new rows: the mean of the old rows plus noise much smaller than the rows' spread
    assert (new.mean(0) - old_emb.mean(0)).abs().max() < 0.01
    assert 0 < (new - old_emb.mean(0)).std() < 0.1 * old_emb.std()
    with pytest.raises(ValueError, match="append-only"):
        model.resize_vocab(100)


@pytest.mark.parametrize("tied", [False, True])
def test_frozen_old_rows_survive_an_optimizer_step(tied: bool) -> None:
    model = debug_model(tie_embeddings=tied).train()
    model.resize_vocab(140, freeze_old=True)
    emb, head = model.tok_emb.weight.detach().clone(), model.lm_head.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    ids = torch.randint(0, 140, (2, 16))
    loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    assert torch.equal(model.tok_emb.weight[:128], emb[:128])
    assert torch.equal(model.lm_head.weight[:128], head[:128])
    assert not torch.equal(model.lm_head.weight[128:], head[128:])
    assert not torch.equal(model.layers[0].mlp.down.weight, debug_model().layers[0].mlp.down.weight)


@pytest.mark.parametrize("tied", [False, True])
def test_remap_moves_kept_rows_to_their_new_ids(tied: bool) -> None:
    model = debug_model(tie_embeddings=tied)
    model.resize_vocab(140, freeze_old=True)
    emb, head = model.tok_emb.weight.detach().clone(), model.lm_head.weight.detach().clone()
    # ids [0, 100) stay, [100, 128) are dropped, [128, 140) move up by 20 to [148, 160)
    old_ids = torch.cat([torch.arange(100), torch.arange(128, 140)])
    new_ids = torch.cat([torch.arange(100), torch.arange(148, 160)])
    model.remap_vocab(160, old_ids, new_ids, generator=torch.Generator().manual_seed(0))
    assert model.config.vocab_size == 160 and model.tok_emb.weight.shape == (160, 64)
    assert torch.equal(model.tok_emb.weight[new_ids], emb[old_ids])
    assert torch.equal(model.lm_head.weight[new_ids], head[old_ids])
    assert (model.lm_head.weight is model.tok_emb.weight) == tied
    fresh = model.tok_emb.weight[100:148].detach()  # the mean of the old rows plus small noise
    assert (fresh.mean(0) - emb.mean(0)).abs().max() < 0.01 and 0 < fresh.std() < 0.1 * emb.std()
    assert model._frozen_rows == 0 and not model._freeze_hooks  # the frozen ids moved: nothing stays frozen
    with pytest.raises(ValueError, match="2 old ids but 1 new ids"):
        model.remap_vocab(170, torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 160\)"):
        model.remap_vocab(170, torch.tensor([160]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"outside the new vocabulary \[0, 170\)"):
        model.remap_vocab(170, torch.tensor([0]), torch.tensor([170]))
    with pytest.raises(ValueError, match="given twice"):
        model.remap_vocab(170, torch.tensor([0, 1]), torch.tensor([5, 5]))
    assert model.config.vocab_size == 160  # a refused remap changes nothing


def test_checkpoint_round_trip_and_manifest_guard(tmp_path) -> None:
    model = debug_model(tie_embeddings=True)
    model.save_pretrained(tmp_path, manifest_hash="a" * 64)
    loaded = TesseraLM.from_pretrained(tmp_path, expected_manifest_hash="a" * 64)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    assert loaded.manifest_hash == "a" * 64
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    with pytest.raises(ManifestMismatchError, match=f"{'a' * 64}.*{'b' * 64}"):
        TesseraLM.from_pretrained(tmp_path, expected_manifest_hash="b" * 64)
    with pytest.raises(ManifestMismatchError, match="c" * 64):
        TesseraLM.from_pretrained(tmp_path, expected_manifest={"hash": "c" * 64})


def test_config_rules_and_presets() -> None:
    with pytest.raises(ValueError, match="n_heads=6 is not a multiple of n_kv_heads=4"):
        LLMConfig(vocab_size=10, dim=48, n_layers=1, n_heads=6, n_kv_heads=4, ffn_dim=8, max_seq_len=8)
    with pytest.raises(ValueError, match="unknown LLM preset 'tiny'"):
        LLMConfig.preset("tiny", 10)
    with pytest.raises(ValueError, match="unknown LLMConfig keys \\['dims'\\]"):
        LLMConfig.from_dict({"dims": 3})
    c = LLMConfig.preset("cpu-small", 8000)
    assert LLMConfig.from_dict(c.to_dict()) == c
    assert 5e6 < TesseraLM(c).num_params() < 20e6
    model = debug_model()
    c = model.config
    per_layer = c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.dim * c.dim + 3 * c.dim * c.ffn_dim + 2 * c.dim
    assert model.num_params() == c.n_layers * per_layer + 2 * c.vocab_size * c.dim + c.dim
    assert model.flops_per_token(64) == 6 * (model.num_params() - c.vocab_size * c.dim - (2 * c.n_layers + 1) * c.dim) \
        + 12 * c.n_layers * c.dim * 64


def test_debug_model_learns_a_repeating_sequence() -> None:
    model = debug_model(vocab_size=32).train()
    pattern = torch.randint(0, 32, (8,)).repeat(8)[None]  # period 8, 64 tokens
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(model(pattern[:, :-1]).flatten(0, 1), pattern[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.0 and losses[-1] < 0.5, (losses[0], losses[-1])


def test_loading_with_another_vocabulary_says_what_differs(tmp_path) -> None:
    from tessera.core.spec import ModalitySpec, TokenLayout
    from tessera.core.vocab import UnifiedVocab

    def spec(fingerprint: str) -> ModalitySpec:
        layout = TokenLayout(kind="fixed", levels=(16,), steps=4)
        return ModalitySpec(name="image", version="1", media_kind="image", layout=layout, fingerprint=fingerprint)

    trained = UnifiedVocab.build(100, [spec("a" * 64)])
    in_use = UnifiedVocab.build(100, [spec("b" * 64)])
    model = debug_model()
    model.save_pretrained(tmp_path, manifest_hash=trained.manifest_hash, manifest=trained.manifest())
    TesseraLM.from_pretrained(tmp_path, expected_manifest=trained.manifest())
    with pytest.raises(ManifestMismatchError, match="What differs.*fingerprint"):
        TesseraLM.from_pretrained(tmp_path, expected_manifest=in_use.manifest())
    with pytest.raises(ValueError, match="pass the manifest"):
        model.save_pretrained(tmp_path, manifest_hash="x" * 64, manifest=trained.manifest())


def test_decode_copies_match_f_linear_and_follow_weight_updates() -> None:
    """CPU decoding multiplies by a cached transposed weight: same numbers as F.linear,
    remade when the weight is written in place or replaced, never saved."""
    model = debug_model()
    ids = torch.randint(0, 128, (2, 1))
    with torch.no_grad():
        reference = model(ids)  # F.linear everywhere (not inference mode)
    with torch.inference_mode():
        fast = model(ids)
    torch.testing.assert_close(fast, reference)
    head = model.layers[0].mlp.gate_up
    assert "_weight_t" in head.__dict__ and all("_weight_t" not in k for k in model.state_dict())

    with torch.no_grad():
        head.weight.mul_(2.0)  # in place, as an optimizer step does
        reference = model(ids)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), reference)
    model.resize_vocab(140)  # the tied head/embedding becomes another tensor
    with torch.no_grad():
        reference = model(ids)
    with torch.inference_mode():
        fast = model(ids)
    assert fast.shape[-1] == 140
    torch.testing.assert_close(fast, reference)
    model.drop_decode_copies()
    assert "_weight_t" not in head.__dict__
    with torch.inference_mode():  # many rows: F.linear, no copy made
        model(torch.randint(0, 128, (4, 8)))
    assert "_weight_t" not in head.__dict__


def test_decode_copies_survive_dtype_moves_copies_and_inference_weights() -> None:
    import copy

    model = debug_model()
    ids = torch.randint(0, 128, (1, 1))
    with torch.inference_mode():
        model(ids)
    assert all("_weight_t" not in m.__dict__ for m in copy.deepcopy(model).modules())  # not carried along
    model.double()  # .data replaced in place of the Parameter: the copy is dropped, not reused
    with torch.no_grad():
        reference = model(ids)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), reference)
    with torch.inference_mode():  # weights made inside inference mode have no version counter
        fresh = debug_model()
        assert fresh(ids).shape == (1, 1, 128)


def test_merging_lora_drops_the_decode_copies_it_makes_stale() -> None:
    """peft's merge writes through ``weight.data`` (no version bump): merge_lora must drop
    the transposed copies, or decoding would keep using the pre-merge weights."""
    from tessera.llm.lora import LoraOptions, apply_lora, merge_lora

    model = debug_model()
    ids = torch.randint(0, 128, (1, 1))
    with torch.inference_mode():
        model(ids)  # copies of the pre-LoRA weights
    apply_lora(model, LoraOptions(r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # a non-zero adapter
    merge_lora(model)
    with torch.no_grad():
        reference = model(ids)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), reference)


@pytest.mark.parametrize(("every", "tied"), [(1, True), (2, False)])
def test_grow_depth_keeps_outputs_and_the_new_blocks_learn(every: int, tied: bool, tmp_path) -> None:
    model = debug_model(vocab_size=32, tie_embeddings=tied).train()
    torch.manual_seed(1)
    pattern = torch.randint(0, 32, (8,)).repeat(8)[None]

    def loss_of(m: TesseraLM) -> torch.Tensor:
        return F.cross_entropy(m(pattern[:, :-1]).flatten(0, 1), pattern[:, 1:].flatten())

    before = {k: v.clone() for k, v in model.state_dict().items()}
    grown = model.grow_depth(every)
    n = model.config.n_layers
    assert grown.config.n_layers == n + n // every and grown.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    with torch.no_grad():
        torch.testing.assert_close(grown(pattern), model(pattern), atol=1e-6, rtol=0)
    new = [every + i * (every + 1) for i in range(n // every)]  # indices of the zero-output copies
    assert all(float(grown.layers[j].attn.proj.weight.detach().abs().sum()) == 0.0 for j in new)

    opt = torch.optim.AdamW(grown.parameters(), lr=3e-3)
    first = loss_of(grown).item()
    for _ in range(60):
        loss = loss_of(grown)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.0 and loss.item() < 0.5, (first, loss.item())
    assert all(float(grown.layers[j].mlp.down.weight.detach().abs().sum()) > 0.0 for j in new)  # the copies learned

    grown.save_pretrained(tmp_path, manifest_hash="0" * 64)
    loaded = TesseraLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pattern), grown.eval()(pattern))


@pytest.mark.parametrize("every", [0, 3, 1.5, True])
def test_grow_depth_refuses_a_bad_every(every: object) -> None:
    with pytest.raises(ValueError, match=r"every=.* must be an integer in \[1, 2\]"):
        debug_model().grow_depth(every)  # type: ignore[arg-type]
