import pytest
import torch
from PIL import Image

from model.config import CogVLMConfig
from model.generation import GenerationParams, generate_reference
from model.processor import Conversation, Processor, load_tokenizer
from model.weights import load_model
from tests.model.naive_cogvlm import naive_greedy, naive_logits


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    cfg = CogVLMConfig.from_checkpoint(tiny_checkpoint)
    model = load_model(tiny_checkpoint, torch.float32)
    return model, Processor(load_tokenizer(tiny_checkpoint), cfg)


def striped_image() -> Image.Image:
    return Image.fromarray((torch.rand(40, 24, 3) * 255).byte().numpy())


@pytest.mark.parametrize("with_image", [True, False])
def test_prefill_logits_match_the_naive_model(loaded, with_image):
    model, processor = loaded
    image = striped_image() if with_image else None
    inputs = processor.build(Conversation(query="What is in the image?", history=(("Hi", "Hello"),), image=image))
    sd = model.state_dict()
    want = naive_logits(sd, model.config, inputs.input_ids, inputs.token_type_ids, inputs.pixels)
    from model.attention import ContiguousKVCache
    from model.processor import vision_expert_mask

    cfg = model.config
    cache = ContiguousKVCache(cfg.num_layers, inputs.num_tokens, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
    ids = torch.tensor(inputs.input_ids)
    embeds = model.embed(ids)
    if with_image:
        embeds = model.embed(ids, model.encode_images(inputs.pixels[None])[0], torch.tensor(inputs.image_slots))
    mask = torch.tensor(vision_expert_mask(inputs.token_type_ids))
    with torch.no_grad():
        got = model.compute_logits(model(embeds, torch.tensor(inputs.position_ids), mask, cache))
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("with_image", [True, False])
def test_greedy_tokens_match_the_naive_model(loaded, with_image):
    model, processor = loaded
    image = striped_image() if with_image else None
    inputs = processor.build(Conversation(query="Describe the picture.", image=image))
    params = GenerationParams(max_tokens=6, stop_token_ids=())
    got = generate_reference(model, inputs, params)
    want = naive_greedy(
        model.state_dict(), model.config, inputs.input_ids, inputs.token_type_ids, inputs.pixels, max_tokens=6
    )
    assert got.output_token_ids == want[: len(got.output_token_ids)]
    assert got.finish_reason == "length" and len(got.output_token_ids) == 6


def test_stop_token_ends_generation_with_reason_stop(loaded):
    model, processor = loaded
    inputs = processor.build(Conversation(query="Hi"))
    first = generate_reference(model, inputs, GenerationParams(max_tokens=3)).output_token_ids
    stopped = generate_reference(model, inputs, GenerationParams(max_tokens=10, stop_token_ids=(first[1],)))
    assert stopped.output_token_ids == first[:2] and stopped.finish_reason == "stop"


def test_sampling_is_reproducible_by_seed(loaded):
    model, processor = loaded
    inputs = processor.build(Conversation(query="Hi"))

    def run(seed):
        params = GenerationParams(max_tokens=8, temperature=5.0, seed=seed, stop_token_ids=())
        return generate_reference(model, inputs, params).output_token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)  # temperature 5 over ~500 tokens: 8 equal draws would be a bug


def test_top_logprobs_are_sorted_log_probabilities(loaded):
    model, processor = loaded
    inputs = processor.build(Conversation(query="Hi"))
    result = generate_reference(model, inputs, GenerationParams(max_tokens=3, top_logprobs=5))
    assert len(result.top_logprobs) == len(result.output_token_ids)
    for token, top in zip(result.output_token_ids, result.top_logprobs, strict=True):
        logprobs = [lp for _, lp in top]
        assert len(top) == 5 and logprobs == sorted(logprobs, reverse=True)
        assert top[0][0] == token  # greedy picks the best
        assert all(lp <= 0 for lp in logprobs) and sum(torch.tensor(logprobs).exp()) <= 1 + 1e-5


def test_max_model_len_caps_generation(loaded):
    model, processor = loaded
    inputs = processor.build(Conversation(query="Hi"))
    params = GenerationParams(max_tokens=50, stop_token_ids=())
    result = generate_reference(model, inputs, params, max_model_len=inputs.num_tokens + 2)
    assert len(result.output_token_ids) == 2 and result.finish_reason == "length"
    with pytest.raises(ValueError, match="max_model_len"):
        generate_reference(model, inputs, params, max_model_len=inputs.num_tokens)
    with pytest.raises(ValueError, match="max_position_embeddings"):  # rotary's table ends there
        generate_reference(model, inputs, params, max_model_len=model.config.max_position_embeddings + 1)


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1.0), dict(top_logprobs=21)])
def test_bad_parameters_are_refused(loaded, bad):
    model, processor = loaded
    with pytest.raises(ValueError, match=next(iter(bad))):
        generate_reference(model, processor.build(Conversation(query="Hi")), GenerationParams(**bad))
