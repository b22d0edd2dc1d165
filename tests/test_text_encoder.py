import csv
from pathlib import Path

import pytest
import torch

from models.text.transformer import TextEncoder, normalize_caption, resolve_text_model

PHI4_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "clotho_captions_development_plus_phi_generated.csv"


def test_normalize_caption_deletes_punctuation_as_published_or_spaces_it():
    assert normalize_caption("Nature's sounds, e.g. birds!  Then  rain.") == "natures sounds eg birds  then  rain"
    assert normalize_caption("Nature's sounds, e.g. birds!  Then  rain.", punctuation="space") == \
        "nature s sounds e g birds then rain"
    assert normalize_caption("A Dog!", lowercase=False, remove_punctuation=False) == "A Dog!"
    with pytest.raises(ValueError, match="sentence_features.punctuation='drop' is not one of delete, space"):
        normalize_caption("a", punctuation="drop")


def test_the_two_normalisations_differ_on_twelve_percent_of_the_published_phi4_captions():
    with open(PHI4_CSV, encoding="utf-8") as handle:
        generated = [row[f"caption_{i}"] for row in csv.DictReader(handle) for i in range(6, 11)]
    differing = sum(normalize_caption(c).split() != normalize_caption(c, punctuation="space").split()
                    for c in generated)
    assert len(generated) == 19195 and 0.11 < differing / len(generated) < 0.13


def test_resolution_prefers_local_directories(data_dir):
    local = data_dir / "clotho_demo" / "roberta-tiny"
    assert resolve_text_model(str(local)) == str(local)
    assert resolve_text_model("clotho_demo/roberta-tiny", data_dir) == str(local)
    assert resolve_text_model("roberta-large", data_dir) == "roberta-large"
    with pytest.raises(ValueError, match="'robbie' is unknown: choose one of roberta-base, roberta-large") as error:
        resolve_text_model("robbie", data_dir)
    assert str(error.value).endswith(f"directories.data_dir={data_dir}")
    wrong_data_dir = data_dir / "absent"  # the demo's model is missed because the data folder is wrong
    with pytest.raises(ValueError, match=f"relative to directories.data_dir={wrong_data_dir} .that folder does not "):
        resolve_text_model("clotho_demo/roberta-tiny", wrong_data_dir)


def test_first_token_embedding_and_truncation(data_dir):
    encoder = TextEncoder(str(data_dir / "clotho_demo" / "roberta-tiny"), max_sentence_tokens=6).eval()
    tokens = encoder.tokenize(["A dog barks.", "rain falls while a bell rings and birds chirp and wind blows"])
    assert tokens["input_ids"].shape[1] == 6
    assert tokens["input_ids"][:, 0].tolist() == [encoder.tokenizer.bos_token_id] * 2
    with torch.no_grad():
        embedded = encoder(["A dog barks.", "a dog barks", "Thunder rumbles."])
    assert embedded.shape == (3, encoder.output_size)
    torch.testing.assert_close(embedded[0], embedded[1])  # case and punctuation removed before tokenising
    assert not torch.allclose(embedded[0], embedded[2])


@pytest.mark.parametrize("train_dropout", [False, True])
def test_dropout_in_training_is_off_as_published_unless_asked_for(data_dir, train_dropout):
    encoder = TextEncoder(str(data_dir / "clotho_demo" / "roberta-tiny"), train_dropout=train_dropout).train()
    assert {module.training for module in encoder.modules()} == {train_dropout}
    assert encoder.model.config.hidden_dropout_prob == 0.2  # the published from_pretrained setting
    torch.manual_seed(0)
    first, second = encoder(["a dog barks"]), encoder(["a dog barks"])
    assert torch.equal(first, second) != train_dropout


def test_missing_local_model_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match=f"text model '{tmp_path}' could not be loaded"):
        TextEncoder(str(tmp_path))


def test_sdpa_and_eager_attention_give_the_same_embeddings(data_dir):
    folder = str(data_dir / "clotho_demo" / "roberta-tiny")
    fused, eager = TextEncoder(folder, attention="sdpa").eval(), TextEncoder(folder, attention="eager").eval()
    assert (fused.model.config._attn_implementation, eager.model.config._attn_implementation) == ("sdpa", "eager")
    captions = ["a dog barks", "rain falls on a tin roof while thunder rumbles far away"]  # padding in the first
    with torch.no_grad():
        assert (fused(captions) - eager(captions)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="sentence_features.attention='flash' is not one of sdpa, eager"):
        TextEncoder(folder, attention="flash")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_fixed_padding_and_the_device_side_mask_leave_embeddings_unchanged(data_dir, attention):
    folder = str(data_dir / "clotho_demo" / "roberta-tiny")
    longest = TextEncoder(folder, attention=attention).eval()
    fixed = TextEncoder(folder, attention=attention, padding="max_length", max_sentence_tokens=24).eval()
    captions = ["a dog barks", "rain falls on a tin roof while thunder rumbles far away"]
    assert fixed.tokenize(captions)["input_ids"].shape == (2, 24)
    assert longest.tokenize(captions)["input_ids"].shape[1] < 24
    with torch.no_grad():
        transformers_mask = longest.model(**longest.tokenize(captions)).last_hidden_state[:, 0]  # its own 2D path
        torch.testing.assert_close(longest(captions), transformers_mask, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fixed(captions), transformers_mask, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sentence_features.padding='left' is not one of longest, max_length"):
        TextEncoder(folder, padding="left")
