import pytest
import torch

from models.text.transformer import TextEncoder, normalize_caption, resolve_text_model


def test_normalize_caption():
    assert normalize_caption("A Dog barks, loudly!  Then  stops.") == "a dog barks loudly then stops"
    assert normalize_caption("A Dog!", lowercase=False, remove_punctuation=False) == "A Dog!"


def test_resolution_prefers_local_directories(data_dir):
    local = data_dir / "clotho_demo" / "roberta-tiny"
    assert resolve_text_model(str(local)) == str(local)
    assert resolve_text_model("clotho_demo/roberta-tiny", data_dir) == str(local)
    assert resolve_text_model("roberta-large", data_dir) == "roberta-large"
    with pytest.raises(ValueError, match="'robbie' is unknown: choose one of roberta-base, roberta-large"):
        resolve_text_model("robbie", data_dir)


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


def test_missing_local_model_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match=f"text model '{tmp_path}' could not be loaded"):
        TextEncoder(str(tmp_path))
