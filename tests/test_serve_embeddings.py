"""`mlxlab serve` answers OpenAI's POST /v1/embeddings for a sentence-transformers folder, talked
to with the official `openai` client over HTTP, as a user starts it: the vectors equal
sentence-transformers' `encode` (the tiny folder's stored reference by default; the real
all-MiniLM-L6-v2 and `mlxlab embed` in the slow run) in float and base64 encodings, shortened
with `dimensions` as OpenAI shortens them; token ids embed as their text does; usage counts the
tokens read; a bad request is OpenAI's error object naming its field, and a model asked at the
other endpoint is refused naming the one it answers."""

from __future__ import annotations

import base64
import os

import numpy as np
import openai
import pytest

from embedder_fixtures import DENSE_OUT, TEXTS, stored_reference, write_tiny_folder
from mlxlab.models.embedders.sentence_folder import TextEmbedder
from serve_helpers import serving


def shortened(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """OpenAI's (and sentence-transformers' truncate_dim + normalize) shortened vectors."""
    kept = vectors[:, :dimensions]
    return kept / np.linalg.norm(kept, axis=1, keepdims=True)


def vectors(response) -> np.ndarray:
    """The response's vectors; an explicit base64 encoding comes back as the wire's string
    (the client decodes only the base64 it asked for itself): little-endian float32."""
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([np.frombuffer(base64.b64decode(d.embedding), "<f4")
                     if isinstance(d.embedding, str) else d.embedding for d in response.data],
                    dtype=np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-embed")
    folder = write_tiny_folder(root / "tiny-st")
    with serving([str(folder)], root / "serve.log", dict(os.environ), wait_s=120) as url:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60), folder


def test_vectors_equal_sentence_transformers_in_both_encodings(tiny):
    client, folder = tiny
    reference = stored_reference()["full"]  # sentence-transformers' encode of TEXTS
    listed = {m.id: m for m in client.models.list().data}
    assert list(listed) == [str(folder)] and listed[str(folder)].model_extra["aliases"] == ["tiny-st"]
    as_floats = client.embeddings.create(model="tiny-st", input=TEXTS, encoding_format="float")
    assert as_floats.model == "tiny-st" and as_floats.object == "list"
    np.testing.assert_allclose(vectors(as_floats), reference, atol=1e-5)
    # the client's default: base64, which it decodes (little-endian float32) itself
    as_base64 = client.embeddings.create(model="tiny-st", input=TEXTS)
    np.testing.assert_array_equal(vectors(as_base64), vectors(as_floats))
    raw = client.embeddings.with_raw_response.create(model="tiny-st", input="dog",
                                                     encoding_format="base64").http_response
    assert isinstance(raw.json()["data"][0]["embedding"], str)
    one = client.embeddings.create(model="tiny-st", input=TEXTS[1], encoding_format="float")
    np.testing.assert_allclose(vectors(one)[0], reference[1], atol=1e-5)
    ids = TextEmbedder(folder).token_ids(TEXTS)
    assert as_floats.usage.prompt_tokens == as_floats.usage.total_tokens == sum(map(len, ids))


def test_dimensions_shorten_and_renormalize_and_token_ids_embed_as_their_text(tiny):
    client, folder = tiny
    reference = stored_reference()["full"]
    for encoding in ("float", "base64"):
        short = client.embeddings.create(model="tiny-st", input=TEXTS, dimensions=5,
                                         encoding_format=encoding)
        np.testing.assert_allclose(vectors(short), shortened(reference, 5), atol=1e-5)
    ids = TextEmbedder(folder).token_ids(TEXTS[:3])
    by_ids = client.embeddings.create(model="tiny-st", input=ids, encoding_format="float")
    np.testing.assert_allclose(vectors(by_ids), reference[:3], atol=1e-5)
    one_row = client.embeddings.create(model="tiny-st", input=ids[0], encoding_format="float")
    np.testing.assert_allclose(vectors(one_row)[0], reference[0], atol=1e-5)
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))


@pytest.mark.parametrize("request_body, param, status", [
    ({"input": "dog", "dimensions": DENSE_OUT + 1}, "dimensions", 400),
    ({"input": "dog", "dimensions": 0}, "dimensions", 400),
    ({"input": "dog", "encoding_format": "int8"}, "encoding_format", 400),
    ({"input": []}, "input", 400),
    ({"input": ["dog", 3]}, "input", 400),
    ({"input": [[2, 10_000]]}, "input", 400),
    ({"input": "dog", "prompt_name": "query"}, "prompt_name", 400),
    ({"input": "dog", "temperature": 0.5}, "temperature", 400),
    ({"input": "dog", "model": "absent"}, "model", 404),
])
def test_bad_requests_are_openai_errors_naming_the_field(tiny, request_body, param, status):
    client, _ = tiny
    body = {"model": "tiny-st", **request_body}
    with pytest.raises(openai.APIStatusError) as caught:
        client.post("/embeddings", body=body, cast_to=dict)
    assert caught.value.status_code == status
    error = caught.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    print(error["message"])


def test_an_embedder_asked_for_a_completion_names_its_endpoint(tiny):
    client, _ = tiny
    with pytest.raises(openai.BadRequestError, match="tiny-st is a text embedder: it answers "
                       "POST /v1/embeddings") as caught:
        client.chat.completions.create(model="tiny-st",
                                       messages=[{"role": "user", "content": "hi"}])
    assert caught.value.param == "model"


def test_an_embedder_asked_to_rerank_names_its_endpoint(tiny):
    client, _ = tiny
    with pytest.raises(openai.BadRequestError, match="tiny-st is a text embedder: it answers "
                       "POST /v1/embeddings, not /v1/rerank") as caught:
        client.post("/rerank", body={"model": "tiny-st", "query": "q", "documents": ["d"]},
                    cast_to=dict)
    assert caught.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError, match="'absent' is not served here; this server "
                       "serves none of its kind"):
        client.post("/rerank", body={"model": "absent", "query": "q", "documents": ["d"]},
                    cast_to=dict)


@pytest.mark.slow
def test_all_minilm_l6_v2_beside_a_language_model(tmp_path, cli_env):
    """The real all-MiniLM-L6-v2 served beside a tiny Llama: its vectors equal
    sentence-transformers' encode and `mlxlab embed`'s, whole and shortened, in both encodings;
    the Llama asked for embeddings is refused naming the embedders."""
    st = pytest.importorskip("sentence_transformers", reason="the reference is sentence-transformers'")
    from conftest import mlxlab
    from hf_helpers import save_tiny_model
    from real_models import packaged_folder

    folder = packaged_folder()
    llama = save_tiny_model("llama", tmp_path / "tiny-llama", chat="chatml")
    texts = ["A man is eating food.", "A man is riding a horse.", "Café naïve résumé, ÀÉÎ",
             "中文 text 日本語", "word " * 300, "The new movie is awesome"]
    reference = st.SentenceTransformer(str(folder), device="cpu").encode(texts, batch_size=4)
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    done = mlxlab("embed", folder, "--input", tmp_path / "texts.txt", "--out",
                  tmp_path / "v.npy", env=cli_env)
    assert done.returncode == 0, done.stderr[-2000:]
    embedded = np.load(tmp_path / "v.npy")
    with serving([str(folder), str(llama)], tmp_path / "serve.log", cli_env) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        for encoding in ("float", "base64"):
            got = vectors(client.embeddings.create(model=folder.name, input=texts,
                                                   encoding_format=encoding))
            np.testing.assert_allclose(got, reference, atol=1e-5)
            np.testing.assert_allclose(got, embedded, atol=1e-5)
            short = vectors(client.embeddings.create(model=folder.name, input=texts,
                                                     dimensions=128, encoding_format=encoding))
            np.testing.assert_allclose(short, shortened(reference, 128), atol=1e-5)
        print("max |served - sentence-transformers|:", float(np.abs(got - reference).max()))
        with pytest.raises(openai.BadRequestError, match="tiny-llama is a language model: it "
                           "answers POST /v1/completions, /v1/chat/completions; /v1/embeddings "
                           f"is for text embedders \\({folder}\\)"):
            client.embeddings.create(model="tiny-llama", input="hi")
        with pytest.raises(openai.BadRequestError, match="dimensions: .* 384-dimensional"):
            client.embeddings.create(model=folder.name, input="hi", dimensions=385)
