"""The SmallDoge checkpoints people download, on local fixtures with the published config.json fields (tiny
sizes): dynamic NTK RoPE against transformers, small-doge's layout against small-doge's own modeling code, the
early key names, a tokenizer of the Doge-tokenizer's shape, and a dense Doge grown into a CDMoE."""
import json
import os
import subprocess
import sys
import types
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanodoge import checkpoint as ckpt, tokenizer as tk
import eval as ev
import sample
import train_pt
from nanodoge.engine import Engine
from model import Doge, DogeConfig, KVCache

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
# the fields of the published Doge config.json files (Doge-20M, Doge-60M, -Instruct, -MoE-Instruct), at a
# max_position_embeddings of 32 instead of 2048, so that tiny sequences cross it
PUBLISHED = dict(model_type="doge", architectures=["DogeForCausalLM"], max_position_embeddings=32,
                 rope_scaling={"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 32},
                 rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                 torch_dtype="float32", keep_window_size=2048, dynamic_mask_ratio=0.0, hidden_bias=False,
                 auto_map={"AutoConfig": "configuration_doge.DogeConfig",
                           "AutoModelForCausalLM": "modeling_doge.DogeForCausalLM"})


def off_init(model, scale=0.5):
    """A, residuals and norms moved off their init and the matrices made larger, so that a mix-up shows and
    greedy generation does not settle on one token."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.5 + (0.0 if name.endswith(".A") else 1.0))
            else:
                p.mul_(scale / 0.02)
    return model.eval()


def published_dir(path, state, **fields):
    """A checkpoint directory as the Hub serves it: the published config.json fields and model.safetensors."""
    os.makedirs(path, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**PUBLISHED, **TINY, **fields}))
    save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}, path / "model.safetensors")
    return path


def transformers_doge(directory):
    """transformers' DogeForCausalLM from a config.json directory (weights as loaded), fresh: its dynamic RoPE
    keeps state between calls."""
    return transformers.DogeForCausalLM.from_pretrained(str(directory)).eval()


def max_diff(a, b):
    return (a - b).abs().max().item()

# -----------------------------------------------------------------------------
# dynamic NTK RoPE

@pytest.fixture(scope="module")
def dynamic_dir(tmp_path_factory):
    torch.manual_seed(0)
    reference = off_init(transformers.DogeForCausalLM(transformers.DogeConfig.from_dict({**PUBLISHED, **TINY})))
    return published_dir(tmp_path_factory.mktemp("dynamic"), reference.state_dict())


@pytest.mark.parametrize("T", [20, 32, 77, 128])
def test_dynamic_rope_logits_equal_transformers_below_and_above_max_position_embeddings(dynamic_dir, T):
    model = Doge.from_pretrained(dynamic_dir)
    assert model.config.rope_scaling["factor"] == 4.0 and model.config.max_sequence_length == 128
    idx = torch.randint(97, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        assert max_diff(model(idx)[0], transformers_doge(dynamic_dir)(idx).logits) <= 1e-4
    with pytest.raises(ValueError, match="128 positions"):  # factor x max_position_embeddings is the limit
        model(torch.zeros(1, 129, dtype=torch.long))


def test_dynamic_rope_legacy_type_and_round_trip(dynamic_dir, tmp_path):
    config = json.loads((dynamic_dir / "config.json").read_text())
    config["rope_scaling"] = {"type": "dynamic", "factor": 4.0}  # the older spelling
    legacy = published_dir(tmp_path / "legacy", load_file(dynamic_dir / "model.safetensors"))
    (legacy / "config.json").write_text(json.dumps(config))
    model = Doge.from_pretrained(legacy)
    idx = torch.randint(97, (1, 90))
    with torch.no_grad():
        expected = transformers_doge(dynamic_dir)(idx).logits
        assert max_diff(model(idx)[0], expected) <= 1e-4
        model.save_pretrained(tmp_path / "saved")  # the export writes the rope block back
        saved = json.loads((tmp_path / "saved" / "config.json").read_text())
        assert saved["rope_parameters"] == {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
        assert max_diff(Doge.from_pretrained(tmp_path / "saved")(idx)[0], expected) <= 1e-4
        assert max_diff(transformers_doge(tmp_path / "saved")(idx).logits, expected) <= 1e-4


def cached_logits(model, out, T):
    """The next-token logits [n, V] of KV-cached decoding that reads out [1, T + n] (prompt T), as generate does:
    the prompt in one pass, then one token a step."""
    cache = KVCache(model.config.num_hidden_layers, out.size(1))
    steps = [out[:, :T]] + [out[:, t:t + 1] for t in range(T, out.size(1) - 1)]
    with torch.no_grad():
        return torch.cat([model.lm_head(model.hidden_states(ids, cache)[0][:, -1]) for ids in steps])


def reference_generate(reference, idx, n):
    """transformers' greedy generate: (ids [1, T + n], the raw logits of each step [n, V])."""
    out = reference.generate(idx, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=2,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.cat(out.logits)


def test_kv_cached_generation_past_max_position_embeddings_equals_transformers_generate(dynamic_dir):
    """A prompt inside the limit generating far past it (each new token rotated with the base of the length so
    far, the cached keys kept), and a prompt already past it: transformers' generate token for token, and each
    step's logits; they are not those of plain RoPE."""
    model = Doge.from_pretrained(dynamic_dir)
    plain = Doge(replace(model.config, rope_scaling=None))
    plain.load_state_dict(model.state_dict())
    for T, n in ((12, 60), (40, 30)):
        idx = torch.randint(3, 97, (1, T), generator=torch.Generator().manual_seed(T))
        expected, expected_logits = reference_generate(transformers_doge(dynamic_dir), idx, n)
        assert model.generate(idx, n, temperature=0).tolist() == expected.tolist()
        assert Engine(model).generate(idx, n, temperature=0).tolist() == expected.tolist()
        assert max_diff(cached_logits(model, expected, T), expected_logits) <= 1e-4
        assert max_diff(cached_logits(plain, expected, T), expected_logits) > 1e-2


def test_other_rope_types_are_one_line(dynamic_dir, tmp_path):
    directory = published_dir(tmp_path, load_file(dynamic_dir / "model.safetensors"),
                              rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError) as e:
        Doge.from_pretrained(directory)
    assert "\n" not in str(e.value) and "'yarn'" in str(e.value) and "config.json" in str(e.value)

# -----------------------------------------------------------------------------
# small-doge's layout (the -Instruct checkpoints): against small-doge's own modeling code

def small_doge_reference():
    """tests/small_doge_reference/modeling_doge.py (small-doge's, unchanged) importable under transformers 5.23:
    the names it imports from older transformers, and its causal mask call, shimmed here."""
    import transformers.masking_utils as masking_utils
    import transformers.utils.generic as generic
    from transformers.utils.output_capturing import OutputRecorder
    generic.OutputRecorder = getattr(generic, "OutputRecorder", OutputRecorder)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.modules.setdefault("small_doge_reference.configuration_doge",
                           types.SimpleNamespace(DogeConfig=transformers.DogeConfig))
    import small_doge_reference.modeling_doge as reference
    reference.DogeForCausalLM._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def create_causal_mask(config, input_embeds, attention_mask, cache_position, past_key_values, position_ids):
        return masking_utils.create_causal_mask(  # always a mask: small-doge's code adds its dt to it
            config=config, inputs_embeds=input_embeds, attention_mask=attention_mask,
            past_key_values=past_key_values, position_ids=position_ids, allow_is_causal_skip=False)
    reference.create_causal_mask = create_causal_mask
    return reference


@pytest.fixture(scope="module")
def small_doge(tmp_path_factory):
    """(small-doge's DogeForCausalLM on random weights, the same weights as a published directory)."""
    reference_module = small_doge_reference()
    torch.manual_seed(0)
    config = transformers.DogeConfig.from_dict({**PUBLISHED, **TINY, "keep_window_size": 24,
                                                "attn_implementation": "eager"})
    reference = off_init(reference_module.DogeForCausalLM(config), scale=0.1)
    assert reference.model.layers[0].self_attn.A.shape == (4,)  # per query head
    directory = published_dir(tmp_path_factory.mktemp("small_doge"), reference.state_dict(), keep_window_size=24)
    return reference, directory


def test_small_doge_layout_logits_equal_small_doges_code(small_doge):
    """T <= keep_window_size goes through the folded attention, T > it through the top-k bias: both equal."""
    reference, directory = small_doge
    model = Doge.from_pretrained(directory)
    assert model.config.mask_per_query_head and not any("q_norm" in k for k in model.state_dict())
    for T in (16, 30):
        idx = torch.randint(97, (2, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            assert max_diff(model(idx)[0], reference(idx).logits) <= 1e-4


def test_small_doge_layout_greedy_generation_equals_small_doges_code(small_doge):
    """KV-cached greedy generation, each step one query over a mask per query head: small-doge's tokens and each
    step's logits. It stays inside the keep window (24): past it, a token the generation repeats gives layer 0 the
    same dt twice, and which of two tied keys top-k keeps is up to the implementation."""
    reference, directory = small_doge
    model = Doge.from_pretrained(directory)
    idx = torch.randint(3, 97, (1, 10), generator=torch.Generator().manual_seed(1))
    expected, expected_logits = reference_generate(reference, idx, 14)
    assert model.generate(idx, 14, temperature=0).tolist() == expected.tolist()
    assert Engine(model).generate(idx, 14, temperature=0).tolist() == expected.tolist()
    assert max_diff(cached_logits(model, expected, 10), expected_logits) <= 1e-4


def test_early_key_names_are_renamed_and_the_early_moe_router_is_refused(small_doge, tmp_path):
    reference, directory = small_doge
    state = load_file(directory / "model.safetensors")
    early = {}
    for key, tensor in state.items():
        key = key.replace("model.embed_tokens.", "model.word_embed.").replace("model.norm.", "model.final_layernorm.")
        key = key.replace(".input_layernorm.", ".pre_layernorm.").replace(".post_attention_layernorm.",
                                                                          ".post_layernorm.")
        key = key.replace(".input_residual", ".pre_residual.weight").replace(".post_attention_residual",
                                                                             ".post_residual.weight")
        early[key.replace(".mlp.", ".feed_forward.")] = tensor
    renamed = published_dir(tmp_path / "early", early, keep_window_size=24)
    idx = torch.randint(97, (1, 12))
    with torch.no_grad():
        assert max_diff(Doge.from_pretrained(renamed)(idx)[0], reference(idx).logits) <= 1e-4
    early["model.layers.0.feed_forward.queries_proj.weight"] = torch.zeros(8, 64)  # the March-2025 MoE
    published_dir(renamed, early, keep_window_size=24)
    with pytest.raises(ValueError) as e:
        Doge.from_pretrained(renamed)
    assert "\n" not in str(e.value) and "queries_proj" in str(e.value) and "cannot be mapped" in str(e.value)

# -----------------------------------------------------------------------------
# a tokenizer of the Doge-tokenizer's shape, filling the model's vocabulary

DOGE_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                 "<|end_header_id|>"]
HEADER_TEMPLATE = (  # the Doge-tokenizer's shape: a header per turn, turns ended by <|end_of_text|>
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n{{ message['content'] }}<|end_of_text|>\n\n"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n{% endif %}")


def eos_after(model, prompt_ids, eos_id, n=8):
    """Swap the embedding rows of eos_id and a token the model would generate k >= 2 tokens into its greedy
    continuation of prompt_ids: the model (a permutation of itself) then ends there with eos. Returns k."""
    out = model.generate(torch.tensor([prompt_ids]), n, temperature=0)[0, len(prompt_ids):].tolist()
    k = next(k for k in range(2, n) if out[k] not in out[:k] + prompt_ids + [0, 1, 2])
    with torch.no_grad():  # tied: the input and output rows swap together
        embed = model.model.embed_tokens.weight
        embed[[eos_id, out[k]]] = embed[[out[k], eos_id]].clone()
    return k


@pytest.fixture(scope="module")
def doge_tokenizer_dir(tmp_path_factory, tiny_text):
    """tokenizer.json (specials at ids 0/1/2, a byte-level BPE after them) and tokenizer_config.json with the
    header template, and a published-config model whose vocabulary the tokenizer fills exactly."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    directory = tmp_path_factory.mktemp("doge_tokenizer")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.train_from_iterator([tiny_text[:30_000]], trainers.BpeTrainer(
        vocab_size=320, special_tokens=DOGE_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf.save(str(directory / "tokenizer.json"))
    assert [hf.token_to_id(t) for t in DOGE_SPECIALS[:3]] == [0, 1, 2]
    (directory / "tokenizer_config.json").write_text(json.dumps(dict(
        chat_template=HEADER_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        tokenizer_class="PreTrainedTokenizerFast")))
    vocab = hf.get_vocab_size(with_added_tokens=True)
    torch.manual_seed(0)
    config = {**TINY, "vocab_size": vocab, "max_position_embeddings": 256}
    model = off_init(Doge(DogeConfig(**config, tie_word_embeddings=True)), scale=0.3)
    tok = tk.hf_tokenizer(str(directory), vocab, 1)
    prompt_ids = tok.encode("Thou art")
    k = eos_after(model, prompt_ids, 1)
    published_dir(directory, model.state_dict(), **config)
    return directory, prompt_ids, k


def test_doge_tokenizer_keeps_its_own_ids_and_template(doge_tokenizer_dir):
    directory, _, _ = doge_tokenizer_dir
    model, tok, _ = ckpt.load_model(str(directory))
    assert tok.vocab_size == model.config.vocab_size  # nothing appended: there is no room
    assert tok.eos_id == 1 and tok.end_of_turn_id == 1  # <|end_of_text|>: the config's eos_token_id
    assert tok.special_id("<|im_end|>") is None and tok.special_id("<think>") is None
    assert tok.encode("a <think> b") == tok._hf.encode("a <think> b", add_special_tokens=False).ids  # plain text
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))
    messages = [dict(role="user", content="What is 12 + 7?")]
    expected = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if not isinstance(expected, list) else expected
    assert tk.render_chat(tok, messages, add_generation_prompt=True)[0] == list(expected)
    # the same roles through a nanodoge data directory (save, load)
    tok.save(str(directory / "saved"))
    again = tk.load_tokenizer(str(directory / "saved"))
    assert (again.vocab_size, again.eos_id, again.end_of_turn_id) == (tok.vocab_size, 1, 1)


def test_sample_and_eval_on_a_doge_tokenizer_directory(doge_tokenizer_dir, tmp_path, capsys):
    directory, prompt_ids, k = doge_tokenizer_dir
    model, tok, _ = ckpt.load_model(str(directory))
    ids = model.generate(torch.tensor([prompt_ids]), 12, temperature=0)[0, len(prompt_ids):].tolist()
    assert ids[k] == 1  # the continuation reaches eos
    # float32 as the reference: dtype=auto is bf16 on a CPU with AVX-512 BF16, whose greedy tokens may differ
    sample.main([f"--init_from={directory}", "--prompt=Thou art", "--temperature=0", "--max_new_tokens=12",
                 "--dtype=float32"])
    assert capsys.readouterr().out == "Thou art" + tok.decode(ids[:k]) + "\n---------------\n"  # stopped at id 1
    result = subprocess.run([sys.executable, "sample.py", f"--init_from={directory}", "--chat", "--temperature=0",
                             "--max_new_tokens=6", "--system=", "--dtype=float32"], cwd=ROOT,
                            input="What is 2 + 3?\n/exit\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    chat_ids, _ = tk.render_chat(tok, [dict(role="user", content="What is 2 + 3?")], add_generation_prompt=True)
    assert tok.decode(chat_ids).startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n")
    reply = model.generate(torch.tensor([chat_ids]), 6, temperature=0)[0, len(chat_ids):].tolist()
    reply = reply[:reply.index(1)] if 1 in reply else reply  # the template's end of turn, the model's eos
    shown = tok.decode(reply).removesuffix("\ufffd")  # a character's first bytes wait for the rest (stream_text)
    assert f"> {shown}\n> " in result.stdout
    arithmetic_dir = tmp_path / "arithmetic"
    arithmetic_dir.mkdir()
    problems = [dict(messages=[dict(role="user", content=f"What is {a} + 3?")], answer=str(a + 3)) for a in range(3)]
    (arithmetic_dir / "test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    ev.main([f"--init_from={directory}", "--tasks=arithmetic", f"--arithmetic_dir={arithmetic_dir}",
             "--max_new_tokens=8", f"--out_dir={tmp_path}"])
    assert "accuracy" in json.loads((tmp_path / "eval.json").read_text())["tasks"]["arithmetic"]


def test_a_directory_without_tokenizer_names_the_option(doge_tokenizer_dir, tmp_path, capsys):
    directory, _, _ = doge_tokenizer_dir
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((directory / name).read_bytes())
    with pytest.raises(FileNotFoundError) as e:
        sample.main([f"--init_from={bare}", "--prompt=Thou art"])
    assert "\n" not in str(e.value) and "no tokenizer.json" in str(e.value) and "--tokenizer=" in str(e.value)
    sample.main([f"--init_from={bare}", f"--tokenizer={directory}", "--prompt=Thou art", "--temperature=0",
                 "--max_new_tokens=4"])
    assert capsys.readouterr().out.startswith("Thou art")

# -----------------------------------------------------------------------------
# dense -> MoE

MOE = ["--is_moe=True", "--num_experts=64", "--num_experts_per_tok=4"]
SMALL = ["--hidden_size=32", "--intermediate_size=64", "--num_hidden_layers=2", "--num_attention_heads=2",
         "--num_key_value_heads=1", "--batch_size=2", "--seq_len=32", "--batch_tokens=128", "--learning_rate=1e-2",
         "--dtype=float32", "--device=cpu", "--eval_batches=8", "--log_interval=1"]


def val_losses(out_dir):
    return [r["val_loss"] for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl"))) if "val_loss" in r]


@pytest.fixture(scope="module")
def dense_run(tiny_data, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dense")
    train_pt.main([f"--data_dir={tiny_data['prose']}", f"--out_dir={out_dir}", "--max_steps=20",
                   "--eval_interval=20"] + SMALL)
    return tiny_data["prose"], out_dir


def test_grow_into_moe_keeps_every_dense_tensor(dense_run):
    _, out_dir = dense_run
    dense = ckpt.load_model(str(out_dir))[0]
    moe, note = ckpt.grow_into_moe(dense, 64, 4, "the dense run")
    assert moe.config.is_moe and (moe.config.num_experts, moe.config.num_experts_per_tok) == (64, 4)
    grown = moe.state_dict()
    for key, tensor in dense.state_dict().items():
        assert torch.equal(grown[key], tensor), key  # bit for bit; the MLP is the shared expert
    new = sorted(grown.keys() - dense.state_dict().keys())
    assert new == sorted(f"model.layers.{i}.mlp.{name}.weight" for i in range(2)
                         for name in ("router_gate", "down_embed", "up_embed"))
    assert abs(grown[new[0]].std().item() - 0.02) < 0.005  # N(0, initializer_range)
    assert note.startswith("grew the dense run into a CDMoE") and "kept all" in note and "new: router_gate" in note


@pytest.mark.parametrize("source", ["checkpoint", "hugging_face"])
def test_is_moe_grows_the_dense_model_and_trains(dense_run, tmp_path, capsys, source):
    """From the nanodoge run and from its Hugging Face export: the first evaluation is the dense model's (the new
    experts add a little), the MoE then trains, a fresh optimizer from step 0, and it exports as MoE."""
    data_dir, dense_dir = dense_run
    init_from = dense_dir if source == "checkpoint" else dense_dir / "hf"
    capsys.readouterr()
    train_pt.main([f"--data_dir={data_dir}", f"--out_dir={tmp_path}", f"--init_from={init_from}", "--max_steps=20",
                   "--eval_interval=10"] + SMALL + MOE)
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith(f"grew {init_from} into a CDMoE (64 experts, 4 per token)")
    first, *_, last = val_losses(tmp_path)
    assert abs(first - val_losses(dense_dir)[-1]) < 0.02 and last < first
    assert json.load(open(tmp_path / "hf" / "config.json"))["is_moe"] is True
    assert ckpt.load_checkpoint(str(tmp_path))["step"] == 20  # counted from 0: the dense run's 20 not carried


def test_other_shape_changes_are_one_line(dense_run, tmp_path):
    data_dir, dense_dir = dense_run
    for init_from, flag in ((dense_dir, "--hidden_size=48"), (dense_dir / "hf", "--num_hidden_layers=3")):
        with pytest.raises(ValueError) as e:
            train_pt.main([f"--data_dir={data_dir}", f"--out_dir={tmp_path}", f"--init_from={init_from}",
                           "--max_steps=2"] + SMALL + [flag])
        assert "\n" not in str(e.value) and "another shape" in str(e.value) and flag[2:].split("=")[0] in str(e.value)
