"""SDXL's text encoders against transformers on the same weights: CLIPTextModel and
CLIPTextModelWithProjection as transformers saves them, the penultimate states SDXL feeds the
UNet, the pooled output under both end-of-text rules, and the config checks."""
import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_close_rel
from sdrt.engine.clip import (CLIPTextModel, CLIPTextModelWithProjection, TextConfig,
                              checkpoint_rename, text_model_class)
from sdrt.engine.configs import model_config
from sdrt.engine.errors import SdrtError
from sdrt.engine.tokenizer import ClipTokenizer
from sdrt.engine.weights import SafetensorsFiles, load_parameters

REL_TOL = 1e-4  # float32, same weights, same inputs
EOS = 49407
# Different lengths, so the two rows pool at different positions.
PROMPTS = ["a photo of a red fox in the snow, highly detailed, 35mm", "an astronaut"]
# Tiny, but every dimension distinct: 3 layers so clip_skip 1 and 2 both leave layers.
TINY = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
            num_attention_heads=4, projection_dim=24, max_position_embeddings=77)
ARCHITECTURES = ["CLIPTextModel", "CLIPTextModelWithProjection"]


def _reference(architecture, eos_token_id, hidden_act="gelu", seed=0):
    """A transformers text encoder with seeded, non-zero weights everywhere (biases and
    LayerNorm affine parameters included, so a missed one shows)."""
    import transformers
    model = getattr(transformers, architecture)(transformers.CLIPTextConfig(
        **TINY, hidden_act=hidden_act, eos_token_id=eos_token_id, bos_token_id=49406,
        pad_token_id=1))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.03 + 0.2 * noise)
    return model.eval()


def _save(model, folder, layout):
    """``folder`` with config.json and model.safetensors as ``layout`` writes them:
    "transformers5" is this transformers' save_pretrained; "transformers4" renames its keys to
    transformers 4.x's (which kept CLIPTextModel's ``text_model.`` level)."""
    model.save_pretrained(folder)
    if layout == "transformers4":
        path = folder / "model.safetensors"
        state = load_file(str(path))
        save_file({k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
                   for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return folder


def _ours(folder):
    """sdrt's module for a saved folder: config checked, built on meta, weights bound by
    name through ``checkpoint_rename``."""
    cfg = TextConfig.from_dict(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        module = text_model_class(cfg)(cfg)
    with SafetensorsFiles([str(folder / "model.safetensors")]) as f:
        return load_parameters(module, f.source, torch.device("cpu"), torch.float32,
                               str(folder), checkpoint_rename(f.source))


def _ids(pad_token):
    return ClipTokenizer.bundled(pad_token=pad_token)(PROMPTS)


@pytest.mark.parametrize("layout", ["transformers5", "transformers4"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_checkpoint_keys_load_by_name(tmp_path, architecture, layout):
    ref = _reference(architecture, EOS)
    folder = _save(ref, tmp_path / "enc", layout)
    ours = _ours(folder)
    assert type(ours).__name__ == architecture
    with SafetensorsFiles([str(folder / "model.safetensors")]) as f:
        rename = checkpoint_rename(f.source) or (lambda n: n)
        used = {rename(n) for n, _ in ours.named_parameters()}
        assert used == set(f.source), "checkpoint keys left unused or missing"


# (pad token, eos_token_id): SDXL's tokenizer_2 pads with "!" (id 0) and its configs carry the
# legacy eos_token_id 2 (pool at the highest id); tokenizer 1 pads with EOS itself, which only
# the first-occurrence rule of eos_token_id 49407 gets right without the legacy argmax.
EOS_CASES = [("!", 2), ("<|endoftext|>", 2), ("!", EOS), ("<|endoftext|>", EOS)]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """{(architecture, eos_token_id): (transformers model, sdrt model)}, loaded from disk."""
    out = {}
    for architecture in ARCHITECTURES:
        for eos in (2, EOS):
            ref = _reference(architecture, eos, seed=len(out))
            folder = tmp_path_factory.mktemp("clip") / "enc"
            out[architecture, eos] = ref, _ours(_save(ref, folder, "transformers5"))
    return out


@pytest.mark.parametrize("pad_token, eos_token_id", EOS_CASES)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_states_and_pooled_match_transformers(pairs, architecture, pad_token, eos_token_id):
    ref, ours = pairs[architecture, eos_token_id]
    ids = _ids(pad_token)
    what = f"{architecture} eos_token_id={eos_token_id} pad={pad_token!r}"
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        pooled = out.text_embeds if architecture.endswith("Projection") else out.pooler_output
        hidden = out.hidden_states  # (embeddings, layer 1, ..., layer N), before the final norm
        states, ours_pooled = ours.encode(ids)
        assert_close_rel(states, out.last_hidden_state, REL_TOL, f"{what}: last_hidden_state")
        assert_close_rel(ours(ids), out.last_hidden_state, REL_TOL, f"{what}: forward")
        assert_close_rel(ours_pooled, pooled, REL_TOL, f"{what}: pooled")
        # SDXL's states: hidden_states[-(k + 2)] for the user's clip_skip k, no final norm.
        for k in (0, 1):
            states, ours_pooled = ours.encode(ids, clip_skip=k + 1, final_norm=False)
            assert_close_rel(states, hidden[-(k + 2)], REL_TOL, f"{what}: hidden_states[-{k + 2}]")
            assert_close_rel(ours(ids, clip_skip=k + 1, final_norm=False), hidden[-(k + 2)],
                             REL_TOL, f"{what}: forward, hidden_states[-{k + 2}]")
            # The pooled output comes from the last layer whatever the states skip.
            assert_close_rel(ours_pooled, pooled, REL_TOL, f"{what}: pooled, clip_skip={k + 1}")
    assert ours_pooled.shape == (len(PROMPTS), 24 if architecture.endswith("Projection") else 32)


def test_pooled_rows_differ_by_prompt(pairs):
    # The comparison above proves little if both rows pooled the same position.
    _, ours = pairs["CLIPTextModelWithProjection", 2]
    ids = _ids("!")
    assert ours.eos_positions(ids).tolist() == [(row == EOS).nonzero()[0].item() for row in ids]
    assert len(set(ours.eos_positions(ids).tolist())) == 2


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh"])
def test_activations_match_transformers(tmp_path, hidden_act):
    ref = _reference("CLIPTextModelWithProjection", 2, hidden_act)
    ours = _ours(_save(ref, tmp_path / "enc", "transformers5"))
    ids = _ids("!")
    with torch.no_grad():
        out = ref(ids)
        states, pooled = ours.encode(ids)
    assert_close_rel(states, out.last_hidden_state, REL_TOL, f"{hidden_act}: states")
    assert_close_rel(pooled, out.text_embeds, REL_TOL, f"{hidden_act}: text_embeds")


@pytest.mark.parametrize("eos_token_id", [2, EOS])
def test_added_token_embeddings_match_transformers(tmp_path, eos_token_id):
    """Textual inversion on the projected encoder: the new row is used, the projection kept.
    With the legacy eos_token_id 2 the pooled output sits at the added (highest) id, in
    transformers as here."""
    ref = _reference("CLIPTextModelWithProjection", eos_token_id)
    ours = _ours(_save(ref, tmp_path / "enc", "transformers5"))
    vectors = -0.3 + 0.8 * torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    new = ours.add_token_embeddings(vectors)
    assert list(new) == [49408, 49409] and ours.config.vocab_size == 49410
    ref.resize_token_embeddings(49410)
    with torch.no_grad():
        ref.get_input_embeddings().weight[49408:] = vectors
    ids = _ids("!")
    ids[0, 3], ids[1, 2] = 49408, 49409
    with torch.no_grad():
        out = ref(ids)
        states, pooled = ours.encode(ids)
    assert_close_rel(states, out.last_hidden_state, REL_TOL, "states with added tokens")
    assert_close_rel(pooled, out.text_embeds, REL_TOL, "text_embeds with added tokens")


@pytest.mark.parametrize("model, component, cls", [
    ("sd15", "text_encoder", CLIPTextModel), ("sd21", "text_encoder", CLIPTextModel),
    ("sdxl", "text_encoder", CLIPTextModel),
    ("sdxl", "text_encoder_2", CLIPTextModelWithProjection),
    ("sdxl-refiner", "text_encoder_2", CLIPTextModelWithProjection)])
def test_parameter_names_and_shapes_equal_transformers_at_real_config(model, component, cls):
    import transformers
    config = model_config(model)[component]
    cfg = TextConfig.from_dict(config)
    assert text_model_class(cfg) is cls
    with torch.device("meta"):
        ours = {n: tuple(p.shape) for n, p in cls(cfg).named_parameters()}
        ref = getattr(transformers, cls.__name__)(transformers.CLIPTextConfig(**config))
    theirs = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    rename = checkpoint_rename(theirs) or (lambda n: n)
    assert {rename(n): s for n, s in ours.items()} == theirs


def test_real_configs():
    bigg = TextConfig.from_dict(model_config("sdxl")["text_encoder_2"])
    assert (bigg.with_projection, bigg.projection_dim, bigg.eos_token_id) == (True, 1280, 2)
    vit_l = TextConfig.from_dict(model_config("sdxl")["text_encoder"])
    assert (vit_l.with_projection, vit_l.projection_dim) == (False, 768)
    for name in ("sd15", "sd21", "sd21-base", "sd-turbo"):
        assert not TextConfig.from_dict(model_config(name)["text_encoder"]).with_projection
    # The ONNX export writes configs with dataclasses.asdict; they must read back the same.
    assert TextConfig.from_dict(asdict(bigg)) == bigg


def test_harmless_keys_accepted():
    from transformers import CLIPTextConfig
    # Everything this transformers writes, and a transformers 4.2x full dump (the
    # "text_config" of a CLIPConfig), whose generation and fine-tuning keys do nothing here.
    full = CLIPTextConfig(**TINY).to_dict()
    assert TextConfig.from_dict(full).hidden_size == 32
    old = {**TINY, "_name_or_path": "", "add_cross_attention": False, "architectures": None,
           "attention_dropout": 0.0, "bad_words_ids": None, "bos_token_id": 0,
           "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None,
           "decoder_start_token_id": None, "diversity_penalty": 0.0, "do_sample": False,
           "dropout": 0.0, "early_stopping": False, "encoder_no_repeat_ngram_size": 0,
           "eos_token_id": 2, "exponential_decay_length_penalty": None,
           "finetuning_task": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
           "hidden_act": "quick_gelu", "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
           "initializer_factor": 1.0, "initializer_range": 0.02, "is_decoder": False,
           "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
           "layer_norm_eps": 1e-05, "length_penalty": 1.0, "max_length": 20, "min_length": 0,
           "model_type": "clip_text_model", "no_repeat_ngram_size": 0, "num_beam_groups": 1,
           "num_beams": 1, "num_return_sequences": 1, "output_attentions": False,
           "output_hidden_states": False, "output_scores": False, "pad_token_id": 1,
           "prefix": None, "problem_type": None, "pruned_heads": {},
           "remove_invalid_values": False, "repetition_penalty": 1.0, "return_dict": True,
           "return_dict_in_generate": False, "sep_token_id": None,
           "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False,
           "tie_encoder_decoder": False, "tie_word_embeddings": True, "tokenizer_class": None,
           "top_k": 50, "top_p": 1.0, "torch_dtype": None, "torchscript": False,
           "transformers_version": "4.22.0.dev0", "typical_p": 1.0, "use_bfloat16": False}
    cfg = TextConfig.from_dict({"architectures": ["CLIPModel"], "text_config": old,
                                "vision_config": {}, "logit_scale_init_value": 2.6592})
    assert (cfg.hidden_size, cfg.eos_token_id, cfg.with_projection) == (32, 2, False)


# Each changes what the encoder computes, or names a model that is not CLIP's text tower.
REFUSED = [
    ("quantization_config", {"quant_method": "bitsandbytes", "load_in_4bit": True}),
    ("pruned_heads", {"0": [1]}),
    ("model_type", "t5"),
    ("architectures", ["T5EncoderModel"]),
    ("hidden_act", "relu"),
    ("hidden_act", ["gelu"]),
    ("rope_theta", 10000.0),  # a key sdrt has never seen: refused, not silently ignored
]


@pytest.mark.parametrize("key, value", REFUSED, ids=[f"{k}={v}" for k, v in REFUSED])
def test_computation_changing_keys_refused_by_name(key, value):
    with pytest.raises(SdrtError) as e:
        TextConfig.from_dict({**TINY, key: value})
    message = str(e.value)
    assert message.startswith(f"text encoder config: unsupported setting {key}"), message
    assert "\n" not in message


@pytest.mark.parametrize("change, key", [
    ({"architectures": ["CLIPTextModelWithProjection"], "projection_dim": None}, "projection_dim"),
    ({"projection_dim": 0}, "projection_dim"),
    ({"eos_token_id": [2, 49407]}, "eos_token_id"),
    ({"architectures": ["CLIPTextModel"], "with_projection": True}, "with_projection"),
])
def test_bad_values_refused_by_name(change, key):
    with pytest.raises(SdrtError, match=f"^text encoder config: {key} must be"):
        TextConfig.from_dict({**TINY, **change})


def test_clip_skip_out_of_range_refused(pairs):
    _, ours = pairs["CLIPTextModel", 2]
    ids = _ids("!")
    for bad in (-1, 3, 1.0):
        with pytest.raises(SdrtError, match="clip_skip must be an integer from 0 to 2"):
            ours(ids, clip_skip=bad)
        with pytest.raises(SdrtError, match="clip_skip must be an integer from 0 to 2"):
            ours.encode(ids, clip_skip=bad)
