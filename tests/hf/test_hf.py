"""miras.hf: the transformers wrapper, generation with the recurrent state, save/load, export, lm-eval."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="miras.hf needs transformers (pip install miras-lm[hf])")

from miras.hf import MirasCache, MirasConfig, MirasForCausalLM, select_state  # noqa: E402
from miras.hf.export import export  # noqa: E402
from miras.hf.modeling import CACHE_NAME  # noqa: E402
from miras.hf.state import BATCHED_FIELDS, SHARED_FIELDS  # noqa: E402
from miras.hf.tokenization import bpe_tokenizer, byte_tokenizer, hf_tokenizer  # noqa: E402
from miras.models import FAMILIES, create  # noqa: E402
from miras.models.state import STATE_TYPES, ModelState  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
TEXTS = ["hello world", "  two  spaces\n\n\ttab", "Ā ü 日本語 🙂", "a . b , c 's <|endoftext|>", ""]


def make(family, seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    return create(f"{family}-tiny", **overrides).to(dtype)


def prompt(tokens, batch=1, seed=1):
    return torch.randint(0, 256, (batch, tokens), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy_reference(native, ids, new_tokens):
    """Uncached greedy decoding: the full forward over the whole sequence at every step."""
    for _ in range(new_tokens):
        logits, _ = native(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def record_call_lengths(model):
    """The number of tokens of every forward call of ``model`` (hooked on its embedding)."""
    lengths = []
    model.embed.register_forward_hook(lambda module, args, output: lengths.append(args[0].shape[1]))
    return lengths


# --- the wrapper -----------------------------------------------------------------------------------

def test_state_dict_keys_are_the_native_ones_and_weights_are_shared():
    native = make("titans-mac")
    model = MirasForCausalLM.from_native(native)
    assert list(model.state_dict()) == list(native.state_dict())
    x = prompt(13)
    torch.testing.assert_close(model(x).logits, native(x)[0], rtol=0, atol=0)
    with torch.no_grad():
        native.norm.weight.mul_(2)  # a change to the native model is a change to the wrapper
    torch.testing.assert_close(model(x).logits, native(x)[0], rtol=0, atol=0)
    # a native state dict loads directly (strict) into a fresh wrapper
    fresh = MirasForCausalLM(MirasConfig.from_native(native.config)).double()
    fresh.load_state_dict(native.state_dict())
    torch.testing.assert_close(fresh(x).logits, native(x)[0], rtol=0, atol=0)
    assert fresh.head.weight is fresh.embed.weight


def test_auto_classes_resolve_in_process():
    config = transformers.AutoConfig.for_model("miras", miras=create("deltanet-tiny").config.to_dict())
    assert isinstance(config, MirasConfig) and config.vocab_size == 256 and config.hidden_size == 64
    for auto in (transformers.AutoModel, transformers.AutoModelForCausalLM):
        model = auto.from_config(config)
        assert type(model) is MirasForCausalLM and model.config.model_config.family == "deltanet"


def test_config_rejects_contradicting_tie_and_unknown_fields():
    native = create("titans-lmm-tiny").config.to_dict()
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        MirasConfig(miras=native, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="unknown config field"):
        MirasConfig(miras={**native, "depth": 3})


def test_labels_give_the_mean_next_token_loss():
    native = make("deltanet")
    model = MirasForCausalLM.from_native(native)
    x = prompt(12)
    labels = x.clone()
    labels[:, :4] = -100
    logits = native(x)[0]
    expected = torch.nn.functional.cross_entropy(logits[0, 3:-1], x[0, 4:])  # predictions of tokens 4..
    torch.testing.assert_close(model(x, labels=labels).loss, expected.float(), rtol=1e-6, atol=1e-6)


def test_padding_is_refused():
    model = MirasForCausalLM.from_native(make("titans-lmm"))
    x = prompt(6, batch=2)
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="padding"):
        model(x, attention_mask=mask)
    with pytest.raises(ValueError, match="padding"):
        model.generate(x, attention_mask=mask, max_new_tokens=2, do_sample=False)


def test_importing_miras_does_not_import_transformers():
    code = ("import sys, miras, miras.models, miras.layers, miras.memory\n"
            "assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_miras_hf_without_transformers_names_the_install(tmp_path):
    code = ("import sys\nsys.modules['transformers'] = None  # as if it were not installed\n"
            "try:\n    import miras.hf\nexcept ModuleNotFoundError as error:\n    print(error.name, '|', error)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120).stdout
    assert out == "transformers | miras.hf needs Hugging Face transformers: pip install 'miras-lm[hf]' (or pip " \
                  "install transformers)\n"
    (tmp_path / "config.json").write_text("{}")  # a run folder, as far as `export` checks before miras.hf
    code = f"import sys\nsys.modules['transformers'] = None\nfrom miras.cli import main\nmain(['export', " \
           f"{str(tmp_path)!r}, {str(tmp_path / 'hf')!r}])"
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stderr
    assert err == ("miras export: error: this command needs the HF extra (transformers is not installed): pip install "
                   "'miras-lm[hf]' (and 'miras-lm[eval]' for lm-eval)\n")


# --- state selection (beam search) -----------------------------------------------------------------

def test_state_tables_cover_every_field_of_every_state_type():
    """A field added to a state type must be declared batched or shared, or select_state would skip it."""
    assert set(STATE_TYPES.values()) | {ModelState} == set(BATCHED_FIELDS) == set(SHARED_FIELDS)
    for cls in BATCHED_FIELDS:
        batched, shared = set(BATCHED_FIELDS[cls]), set(SHARED_FIELDS[cls])
        assert not batched & shared
        assert batched | shared == {f.name for f in dataclasses.fields(cls)}, cls.__name__


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_selected_state_continues_like_the_selected_sequences(family):
    """select_state(state of x, index) continues exactly as the state of x[index]."""
    native, index = make(family), torch.tensor([2, 0, 2])
    x, more = prompt(19, batch=3), prompt(5, batch=3, seed=2)
    with torch.no_grad():
        _, state = native(x)
        expected, _ = native(more, native(x[index])[1])
        got, _ = native(more, select_state(state, index))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_the_cache_reorders_selects_and_repeats_its_rows():
    """MirasCache's own reorder_cache / batch_select_indices / batch_repeat_interleave (the Cache API a
    transformers release may call instead of the model's _reorder_cache) each continue like the rows picked:
    reorder_cache doing nothing passed every test."""
    native = make("titans-mac")
    x, more = prompt(19, batch=3), prompt(5, batch=3, seed=2)
    with torch.no_grad():
        _, state = native(x)
        for method, argument, index in (("reorder_cache", torch.tensor([2, 0, 0]), [2, 0, 0]),
                                        ("batch_select_indices", torch.tensor([1, 2]), [1, 2]),
                                        ("batch_repeat_interleave", 2, [0, 0, 1, 1, 2, 2])):
            cache = MirasCache(state)
            getattr(cache, method)(argument)
            assert cache.from_beam_search == (method == "reorder_cache")
            got, _ = native(more[index], cache.state)
            torch.testing.assert_close(got, native(more[index], native(x[index])[1])[0], rtol=0, atol=1e-12,
                                       msg=method)


# --- generation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_greedy_generate_equals_uncached_decoding(family):
    """Prompts of 11 tokens (not a multiple of the chunk, 8) and 21 (longer than a MAC segment, 16)."""
    native = make(family)
    model = MirasForCausalLM.from_native(native)
    lengths = record_call_lengths(model)
    for tokens in (11, 21):
        x = prompt(tokens, seed=tokens)
        lengths.clear()
        out = model.generate(x, max_new_tokens=8, do_sample=False)
        # one prefill over the whole prompt, then one token per step with the carried state
        assert lengths == [tokens] + [1] * 7
        assert out.tolist() == greedy_reference(native, x, 8).tolist()


@pytest.mark.parametrize("family", ["titans-mag", "transformer"])
def test_sampling_with_the_state_equals_sampling_without(family):
    model = MirasForCausalLM.from_native(make(family))
    x = prompt(13)
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(3)
        outputs.append(model.generate(x, max_new_tokens=8, do_sample=True, top_k=50, temperature=1.5,
                                      num_return_sequences=2, use_cache=use_cache))
    assert outputs[0].tolist() == outputs[1].tolist()
    assert outputs[0][0].tolist() != outputs[0][1].tolist()  # two different samples


@pytest.mark.parametrize("family", ["titans-lmm", "titans-mac", "transformer"])
def test_beam_search_with_reordered_states_equals_beam_search_without_cache(family):
    model = MirasForCausalLM.from_native(make(family))
    x = prompt(11, batch=2)
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=3, num_return_sequences=3)
    cached = model.generate(x, **kwargs, return_dict_in_generate=True, output_scores=True)
    uncached = model.generate(x, **kwargs, use_cache=False, return_dict_in_generate=True, output_scores=True)
    assert cached.sequences.tolist() == uncached.sequences.tolist()
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=0, atol=1e-9)
    # some returned beam descends from different beams over the steps: the states were reordered
    assert (cached.beam_indices[:, 1:6] != cached.beam_indices[:, :1]).any()
    two = model.generate(x, max_new_tokens=6, do_sample=False, num_beams=2)
    assert two.shape == (2, 17)
    one = model.generate(x, max_new_tokens=6, do_sample=False, num_beams=1)
    assert one.tolist() == greedy_reference(model.to_native(), x, 6).tolist()


def test_generate_continues_a_given_state():
    native = make("titans-mal")
    model = MirasForCausalLM.from_native(native)
    x = prompt(15)
    cache = getattr(model(x[:, :9]), CACHE_NAME)
    assert isinstance(cache, MirasCache) and cache.get_seq_length() == 9
    out = model.generate(x, cache=cache, max_new_tokens=5, do_sample=False)
    assert out.tolist() == greedy_reference(native, x, 5).tolist()
    assert cache.get_seq_length() == 19  # advanced in place, as transformers' own caches are
    # beam search expands the given state to its beams
    beams = model.generate(x, cache=getattr(model(x[:, :9]), CACHE_NAME), max_new_tokens=4, num_beams=2)
    assert beams.tolist() == model.generate(x, max_new_tokens=4, num_beams=2).tolist()


def test_generation_refuses_to_go_on_without_the_state(monkeypatch):
    """If transformers ever stops handing the state back, generate raises instead of decoding from scratch."""
    model = MirasForCausalLM.from_native(make("deltanet"))
    update = type(model)._update_model_kwargs_for_generation

    def drop_state(self, *args, **kwargs):
        model_kwargs = update(self, *args, **kwargs)
        model_kwargs.pop("cache", None)
        model_kwargs.pop("past_key_values", None)
        return model_kwargs

    monkeypatch.setattr(type(model), "_update_model_kwargs_for_generation", drop_state)
    with pytest.raises(RuntimeError, match="did not hand the recurrent state back"):
        model.generate(prompt(5), max_new_tokens=3, do_sample=False)


# --- tokenizers ------------------------------------------------------------------------------------

def test_byte_tokenizer_is_utf8_bytes_and_round_trips(tmp_path):
    tokenizer = byte_tokenizer()
    assert len(tokenizer) == 256 and tokenizer.eos_token_id == 0
    tokenizer.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for tok in (tokenizer, loaded):
        for text in TEXTS:
            assert tok.encode(text) == list(text.encode("utf-8"))
            assert tok.decode(tok.encode(text)) == text
    assert tokenizer.decode([0xE6, 0x97]) == "\ufffd"  # a cut UTF-8 sequence decodes, replaced


def test_bpe_tokenizer_round_trips(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["the cat sat on the mat", "the dog ate the cat food"] * 20, trainer)
    backend.save(str(tmp_path / "tokenizer.json"))
    tokenizer = bpe_tokenizer(Tokenizer.from_file(str(tmp_path / "tokenizer.json")))
    assert tokenizer.eos_token_id == 0 and len(tokenizer) == backend.get_vocab_size()
    tokenizer.save_pretrained(tmp_path / "hf")
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in [*TEXTS, "the cat ate the mat"]:
        ids = backend.encode(text, add_special_tokens=False).ids
        assert tokenizer.encode(text) == loaded.encode(text) == ids
        assert loaded.decode(ids) == text
    assert len(tokenizer.encode("the cat")) < len("the cat")  # merges are used


def test_a_runs_bpe_reads_the_end_marker_s_text_as_text_as_in_training(tmp_path):
    """The native BPE encodes "<|endoftext|>" in a document as text; the HF tokenizer of an export must too (only
    the document boundary miras adds is the eos id)."""
    from miras.data.text import from_path
    from miras.data.tokenizers import get_tokenizer

    (tmp_path / "corpus.txt").write_text("the cat sat on the mat. the dog ate the cat food.\n" * 40)
    native = get_tokenizer("bpe:300", from_path(tmp_path / "corpus.txt"))
    hf_tokenizer(native).save_pretrained(tmp_path / "hf")
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "<|endoftext|>the cat"
    assert loaded.encode(text) == native.encode(text) and len(native.encode(text)) > 3
    assert loaded.eos_token_id == native.eos_id == 0 and loaded.decode(native.encode(text)) == text


# --- save, load, export ----------------------------------------------------------------------------

FRESH_PROCESS = textwrap.dedent("""
    import sys, torch
    folder, ids_path, out_path, threads = sys.argv[1:5]
    torch.set_num_threads(int(threads))
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    assert "miras" not in sys.modules, "miras was imported before loading"
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.load(ids_path)
    with torch.no_grad():
        logits = model(ids).logits
    torch.save({"config": type(config).__name__, "model": type(model).__module__ + "." + type(model).__name__,
                "auto_model": type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__,
                "tied": model.head.weight is model.embed.weight, "logits": logits,
                "tokens": model.generate(ids, max_new_tokens=8, do_sample=False),
                "encoded": tokenizer.encode("miras ✓")}, out_path)
""")


def run_fresh_process(folder, ids, tmp_path):
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(folder), str(tmp_path / "ids.pt"),
                           str(tmp_path / "out.pt"), str(torch.get_num_threads())],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def test_exported_model_loads_in_a_fresh_process_with_identical_outputs(tmp_path):
    native = make("titans-mac", dtype=torch.float32)
    export(native, SimpleNamespace(kind="byte"), tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert set(saved["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert (tmp_path / "hf" / "modeling_miras.py").is_file()
    x = prompt(21)
    result = run_fresh_process(tmp_path / "hf", x, tmp_path)
    assert result["config"] == "MirasConfig" and result["auto_model"] == "MirasForCausalLM"
    assert result["model"] == "miras.hf.modeling_miras.MirasForCausalLM" and result["tied"]
    with torch.no_grad():
        assert torch.equal(result["logits"], native(x)[0])
    reference = greedy_reference(native, x, 8)
    assert result["tokens"][0, :21].tolist() == x[0].tolist()
    # the saved generation config stops at eos (byte 0): compare up to where the reference first emits it
    stop = next((i + 1 for i, token in enumerate(reference[0, 21:].tolist()) if token == 0), 8)
    assert result["tokens"][0, 21:21 + stop].tolist() == reference[0, 21:21 + stop].tolist()
    assert result["encoded"] == list("miras ✓".encode())


@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_round_trip(tmp_path, tie):
    native = make("ttt-linear", tie_embeddings=tie)
    MirasForCausalLM.from_native(native).save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as saved:
        assert ("head.weight" in saved.keys()) == (not tie)  # a tied head is stored once
    loaded = MirasForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert (loaded.head.weight is loaded.embed.weight) == tie
    x = prompt(10)
    torch.testing.assert_close(loaded(x).logits, native(x)[0], rtol=0, atol=0)


def test_an_export_wider_than_its_tokenizer_never_generates_ids_it_lacks(tmp_path):
    from miras.data.tokenizers import ByteTokenizer

    torch.manual_seed(0)
    native = create("transformer-tiny", vocab_size=512)
    with torch.no_grad():  # the ids past the bytes the likeliest: without the limit they would be drawn
        native.head.weight[256:] += 10 * native.head.weight[:256].norm(dim=-1).max()
    export(native, ByteTokenizer(), tmp_path / "hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([list(b"hi")])
    for options in ({"do_sample": False}, {"do_sample": True, "temperature": 2.0}, {"num_beams": 2}):
        torch.manual_seed(1)
        new = loaded.generate(ids, max_new_tokens=12, **options)[0, 2:]
        assert new.max() < 256, options
    assert native.generate(ids, 4, temperature=0)[0].min() >= 256  # the head does favour them


def test_a_folder_lacking_weights_or_contradicting_the_tie_is_refused(tmp_path):
    """transformers would leave a missing weight as uninitialised memory (NaN logits) and only report it."""
    from safetensors.torch import load_file, save_file

    MirasForCausalLM.from_native(make("transformer", dtype=torch.float32)).save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    loaded, info = MirasForCausalLM.from_pretrained(tmp_path, output_loading_info=True)  # still given when asked
    assert isinstance(loaded, MirasForCausalLM) and not info["missing_keys"] and not info["mismatched_keys"]
    with pytest.raises(ValueError, match=r"tie_word_embeddings=False contradicts the native config's "
                                         r"tie_embeddings=True"):
        MirasForCausalLM.from_pretrained(tmp_path, tie_word_embeddings=False)
    weights.pop("blocks.0.mixer_norm.weight")
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"the checkpoint lacks \['blocks.0.mixer_norm.weight'\]: a miras "
                                         r"export holds every weight"):
        MirasForCausalLM.from_pretrained(tmp_path)
    weights["blocks.0.mlp.down.weight"] = weights["blocks.0.mlp.down.weight"][:, :3].contiguous()
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks \['blocks.0.mixer_norm.weight'\] and has other shapes for "
                                         r"\['blocks.0.mlp.down.weight'\]"):
        MirasForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True)


def test_a_folder_whose_config_has_no_place_for_some_of_its_weights_is_refused(tmp_path):
    """A config of a smaller model than its weights: transformers would drop the rest and load another model."""
    MirasForCausalLM.from_native(make("titans-lmm", dtype=torch.float32)).save_pretrained(tmp_path / "two")
    MirasForCausalLM.from_native(make("titans-lmm", dtype=torch.float32, layers=1)).save_pretrained(tmp_path / "one")
    (tmp_path / "two" / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"the checkpoint holds weights its config has no place for, "
                                         r"\['blocks.1.mixer.conv_weight', .*\]: a miras export"):
        MirasForCausalLM.from_pretrained(tmp_path / "two")


def test_a_cache_from_beam_search_cannot_continue_and_an_empty_prompt_is_refused():
    """Its rows are the running beams, not the returned sequences (sorted by score): continuing from it
    paired each sequence with another beam's state."""
    model = MirasForCausalLM.from_native(make("titans-lmm"))
    x = prompt(9)
    out = model.generate(x, max_new_tokens=4, num_beams=3, num_return_sequences=3, do_sample=False,
                         eos_token_id=None, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="this cache comes from a beam search"):
        model.generate(out.sequences, cache=getattr(out, CACHE_NAME), max_new_tokens=3, do_sample=False)
    given = getattr(model(x[:, :5]), CACHE_NAME)  # a cache handed to a beam search: expanded, reordered in place
    model.generate(x, cache=given, max_new_tokens=3, num_beams=2, do_sample=False, eos_token_id=None)
    with pytest.raises(ValueError, match="this cache comes from a beam search"):
        model.generate(x, cache=given, max_new_tokens=3)
    greedy = getattr(model.generate(x, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                    eos_token_id=None), CACHE_NAME)
    assert not greedy.from_beam_search  # a greedy cache continues (test_generate_continues_a_given_state)
    with pytest.raises(ValueError, match="the prompt is empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)


def test_exporting_again_without_a_tokenizer_leaves_none_of_the_previous_one(tmp_path):
    from miras.data.tokenizers import ByteTokenizer
    from miras.hf.export import TRAIN_CONFIG

    export(create("transformer-tiny"), ByteTokenizer(), tmp_path, train_config={"model": "first-run"})
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / TRAIN_CONFIG).exists()
    export(create("transformer-tiny", vocab_size=64), None, tmp_path)
    assert not (tmp_path / "tokenizer.json").exists() and not (tmp_path / "tokenizer_config.json").exists()
    assert not (tmp_path / TRAIN_CONFIG).exists()
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path).config.vocab_size == 64


def test_the_usual_size_names_are_views_that_refuse_another_value(tmp_path):
    export(create("titans-lmm-tiny"), None, tmp_path)
    # the same value is accepted (tools pass the config's own values back), another one names the field
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, num_hidden_layers=2)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    with pytest.raises(ValueError, match=r"num_hidden_layers=3: .* view of the native config's 'layers' \(here 2\)"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, num_hidden_layers=3)
    config = MirasConfig.from_native(create("titans-lmm-tiny").config)
    for name, field in [("vocab_size", "vocab_size"), ("hidden_size", "dim"), ("num_attention_heads", "heads")]:
        with pytest.raises(ValueError, match=f"{name}=7: .*'{field}'"):
            setattr(config, name, 7)
    assert (config.vocab_size, config.hidden_size, config.num_attention_heads) == (256, 64, 2)


def test_resizing_the_embeddings_is_refused_before_anything_changes():
    model = MirasForCausalLM.from_native(create("titans-lmm-tiny"))
    with pytest.raises(NotImplementedError, match="vocabulary is fixed when it is created"):
        model.resize_token_embeddings(300)
    assert model.embed.weight.shape[0] == model.head.weight.shape[0] == model.config.vocab_size == 256


def test_export_run_converts_a_native_run(tmp_path):
    """A real `miras train` run, exported (`miras export`), loads with identical logits and its tokenizer."""
    from miras.cli import main
    from miras.train import TrainConfig, load_run, train

    run_dir = train(TrainConfig(model="mamba2-tiny", data="task:passkey", seq_len=128, batch_size=2, max_steps=2,
                                warmup_steps=1, eval_every=0, save_every=2, progress=False,
                                out_dir=str(tmp_path / "run")))
    assert main(["export", str(run_dir), str(tmp_path / "hf")]) == 0
    native, _, _ = load_run(run_dir)
    saved = json.loads((tmp_path / "hf" / "miras_train_config.json").read_text())
    assert saved["model"] == "mamba2-tiny" and saved["max_steps"] == 2
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    x = torch.tensor([tokenizer.encode("Hello, miras")])
    assert x.tolist() == [list(b"Hello, miras")]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, native(x)[0], rtol=0, atol=0)
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "hf2")]) == 2
    assert not (tmp_path / "hf2").exists()
    (tmp_path / "file").write_text("x")
    assert main(["export", str(run_dir), str(tmp_path / "file")]) == 2  # a file where the folder should go
    # a run folder (this one or another) or another program's config.json is never written over; an earlier
    # export is replaced
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert main(["export", str(run_dir), str(run_dir)]) == 2
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "config.json").write_text('{"model_type": "gpt2"}')
    assert main(["export", str(run_dir), str(tmp_path / "theirs")]) == 2
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert (tmp_path / "theirs" / "config.json").read_text() == '{"model_type": "gpt2"}'
    assert main(["export", str(run_dir), str(tmp_path / "hf")]) == 0
    if importlib.util.find_spec("lm_eval") is not None:  # `miras eval RUN --lm-eval`: exports to RUN/hf, then runs
        # an unknown task (or none) is refused before anything is exported
        for tasks in ("miras_tiny_loglikelihood,no_such_task_xyz", ","):
            assert main(["eval", str(run_dir), "--lm-eval", tasks, "--include-path",
                         str(FIXTURES / "tiny_tasks")]) == 2
        # options of the native evaluation, a --limit of 0 and a bad device are refused before anything runs
        for bad in (["--examples", "5"], ["--lengths", "64", "--seed", "3"], ["--depths", "0,0.5"],
                    ["--sweep", "pairs=1,2"], ["--limit", "0"], ["--device", "tpu"]):
            assert main(["eval", str(run_dir), "--lm-eval", "miras_tiny_loglikelihood", *bad]) == 2
        assert not (run_dir / "hf").exists()
        assert main(["eval", str(run_dir), "--lm-eval", "miras_tiny_loglikelihood", "--limit", "2",
                     "--include-path", str(FIXTURES / "tiny_tasks"), "--out", str(tmp_path / "lm")]) == 0
        assert (run_dir / "hf" / "model.safetensors").is_file()
        written = json.loads((tmp_path / "lm" / "results.json").read_text())
        assert "miras_tiny_loglikelihood" in written["lm_eval"] and written["limit"] == 2


# --- lm-evaluation-harness -------------------------------------------------------------------------

def test_lm_eval_keeps_long_contexts_whole_unless_told(tmp_path, monkeypatch):
    """lm-eval's HF model cuts a context to its last 2048 tokens unless given max_length: these models have no
    positional limit, so run_lm_eval gives 2**20; `miras eval --lm-eval` passes --max-length and --metadata on."""
    lm_eval = pytest.importorskip("lm_eval", reason="run_lm_eval needs lm-evaluation-harness")
    import miras.hf
    from miras.cli import main
    from miras.hf.harness import CONTEXT_LIMIT, run_lm_eval

    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        return {"results": {}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake)
    run_lm_eval(tmp_path, ["some_task"])
    assert seen["model_args"]["max_length"] == CONTEXT_LIMIT == 2**20
    calls = []
    monkeypatch.setattr(miras.hf, "run_lm_eval", lambda *args, **kwargs: calls.append(kwargs) or {"results": {}})
    monkeypatch.setattr(miras.hf, "check_lm_eval_tasks", lambda tasks, include_path: None)
    export(make("titans-lmm", dtype=torch.float32), SimpleNamespace(kind="byte"), tmp_path / "hf")
    assert main(["eval", str(tmp_path / "hf"), "--lm-eval", "niah_single_1", "--max-length", "70000", "--metadata",
                 '{"max_seq_lengths": [65536]}']) == 0
    assert calls[-1]["max_length"] == 70000 and calls[-1]["metadata"] == {"max_seq_lengths": [65536]}
    assert main(["eval", str(tmp_path / "hf"), "--lm-eval", "niah_single_1"]) == 0
    assert "max_length" not in calls[-1] and calls[-1]["metadata"] is None  # run_lm_eval's default
    assert main(["eval", str(tmp_path / "hf"), "--lengths", "32", "--max-length", "9"]) == 2  # lm-eval's option
    for bad in ("{bad", "[1]"):  # argparse's usage error (exit 2) with what is wrong, for bad JSON and a non-object
        with pytest.raises(SystemExit) as exit_:
            main(["eval", str(tmp_path / "hf"), "--lm-eval", "niah_single_1", "--metadata", bad])
        assert exit_.value.code == 2


def test_lm_eval_on_a_local_task(tmp_path):
    pytest.importorskip("lm_eval", reason="run_lm_eval needs lm-evaluation-harness (pip install lm-eval)")
    from miras.hf.harness import run_lm_eval

    native = make("titans-lmm", dtype=torch.float32)
    export(native, SimpleNamespace(kind="byte"), tmp_path)
    results = run_lm_eval(tmp_path, ["miras_tiny_loglikelihood", "miras_tiny_generate"], limit=2,
                          include_path=FIXTURES / "tiny_tasks", bootstrap_iters=0)
    scores = results["results"]
    assert 0 <= scores["miras_tiny_loglikelihood"]["acc,none"] <= 1
    assert scores["miras_tiny_loglikelihood"]["perplexity,none"] > 1
    assert 0 <= scores["miras_tiny_generate"]["exact_match,none"] <= 1
    # lm-eval's log-likelihood of a continuation is the one the native model gives
    sample = results["samples"]["miras_tiny_loglikelihood"][0]
    context, continuation = sample["arguments"][0]
    ids = torch.tensor([list((context + continuation).encode())])
    with torch.no_grad():
        logprobs = native(ids)[0].log_softmax(-1)
    start = len(context.encode())
    expected = sum(logprobs[0, i - 1, ids[0, i]].item() for i in range(start, ids.shape[1]))
    assert sample["resps"][0][0][0] == pytest.approx(expected, abs=1e-4)
    # and the generated text is the model's greedy continuation, cut at the first newline
    sample = results["samples"]["miras_tiny_generate"][0]
    question = torch.tensor([list(sample["arguments"][0][0].encode())])
    greedy = greedy_reference(native, question, 6)[0, question.shape[1]:].tolist()
    greedy = greedy[:greedy.index(0)] if 0 in greedy else greedy  # generation stops at eos (byte 0)
    assert sample["resps"][0][0] == byte_tokenizer().decode(greedy).split("\n")[0]


def test_lm_eval_generation_with_a_larger_batch_is_one_error_line(tmp_path, capsys):
    """lm-eval left-pads a batch of generation prompts, which the models refuse: one line with the remedy."""
    pytest.importorskip("lm_eval", reason="run_lm_eval needs lm-evaluation-harness (pip install lm-eval)")
    from miras.cli import main

    export(make("titans-lmm", dtype=torch.float32), SimpleNamespace(kind="byte"), tmp_path / "hf")
    assert main(["eval", str(tmp_path / "hf"), "--lm-eval", "miras_tiny_generate", "--include-path",
                 str(FIXTURES / "tiny_tasks"), "--limit", "2", "--batch-size", "2"]) == 2
    assert capsys.readouterr().err.count(  # (lm-eval's progress bar writes there too)
        "miras eval: error: --lm-eval with --batch-size 2: miras models do not support padding (the recurrent state "
        "would absorb the pad tokens): generate one sequence at a time, or batch sequences of equal length; "
        "generation tasks batch prompts of unequal length with padding: use --batch-size 1 for them "
        "(log-likelihood tasks may use larger batches)\n") == 1


@pytest.mark.slow
def test_ruler_niah_single_1_runs_offline(tmp_path):
    """RULER's niah_single_1 makes its data locally with the model's own tokenizer (~1 min: it builds
    500 samples per length whatever the limit)."""
    pytest.importorskip("lm_eval", reason="run_lm_eval needs lm-evaluation-harness (pip install lm-eval)")
    pytest.importorskip("wonderwords", reason="RULER's needles need lm-eval[ruler] (pip install wonderwords)")
    from miras.hf.harness import run_lm_eval

    # seed 1: the untrained model's greedy continuation of the prompt is not eos at once (seed 0's is: an empty
    # response, which any plumbing would give)
    native = make("titans-lmm", seed=1, dtype=torch.float32)
    export(native, SimpleNamespace(kind="byte"), tmp_path)
    results = run_lm_eval(tmp_path, ["niah_single_1"], limit=1, metadata={"max_seq_lengths": [512]},
                          bootstrap_iters=0)
    sample = results["samples"]["niah_single_1"][0]
    (prompt_text, arguments), (needle,) = sample["arguments"][0], sample["target"]
    assert len(prompt_text.encode()) <= 512 and f"is: {needle}." in prompt_text
    # the response is the native model's greedy continuation of the whole prompt, cut at eos (byte 0)
    new, _ = native.generate(torch.tensor([list(prompt_text.encode())]), arguments["max_gen_toks"], temperature=0)
    new = new[0].tolist()
    expected = transformers.AutoTokenizer.from_pretrained(tmp_path).decode(new[:new.index(0)] if 0 in new else new)
    (response,) = sample["resps"][0]
    assert len(expected) > 10 and response == expected
    assert results["results"]["niah_single_1"]["512,none"] == float(needle in response)
