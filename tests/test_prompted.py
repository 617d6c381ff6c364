"""The prompted image tower and the text side against open_clip's own forward passes."""
import pytest
import torch
import torch.nn.functional as F

from guard._compat import import_open_clip
from guard.errors import InputError, ModelLoadError
from guard.prompted import PromptedCLIP, PromptedVisionEncoder, VisualPrompts
from training.text import ClassContext, TextEncoder, class_text_features

open_clip = import_open_clip()
CLASSES = ("t-shirt", "ankle boot", "bag")


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def folded_block(block, tokens, prompt):
    """Block l of VPT-deep computed the folded way (docs/methods.md): image tokens attend to
    their own keys/values plus the prompt's constant keys/values; no prompt queries or
    MLP. Written from the block's weights, independently of insert/drop_prompts."""
    attention = block.attn
    heads, width = attention.num_heads, tokens.shape[-1]
    weight, bias = attention.in_proj_weight, attention.in_proj_bias
    q, k, v = F.linear(block.ln_1(tokens), weight, bias).chunk(3, dim=-1)
    _, prompt_k, prompt_v = F.linear(block.ln_1(prompt), weight, bias).chunk(3, dim=-1)
    k = torch.cat([k, prompt_k.expand(len(tokens), -1, -1)], dim=1)
    v = torch.cat([v, prompt_v.expand(len(tokens), -1, -1)], dim=1)
    split = lambda x: x.reshape(len(tokens), -1, heads, width // heads).transpose(1, 2)  # noqa: E731
    mixed = F.scaled_dot_product_attention(split(q), split(k), split(v))
    mixed = attention.out_proj(mixed.transpose(1, 2).reshape(tokens.shape))
    tokens = tokens + mixed
    return tokens + block.mlp(block.ln_2(tokens))


def test_no_prompted_block_reproduces_encode_image_exactly(clip, images):
    encoder = PromptedVisionEncoder(clip.visual)
    expected = clip.encode_image(images)
    assert torch.equal(encoder(images).embedding, expected)
    no_blocks = encoder.new_prompts(start_block=encoder.num_blocks, num_tokens=4)
    assert torch.equal(encoder(images, no_blocks).embedding, expected)


def test_prompts_follow_vpt_deep(clip, images):
    encoder = PromptedVisionEncoder(clip.visual)
    torch.manual_seed(0)
    prompts = encoder.new_prompts(start_block=1, num_tokens=5)
    tokens = encoder.embed(images)
    class_tokens = []
    for index, block in enumerate(encoder.blocks):
        tokens = block(tokens) if index < 1 else folded_block(block, tokens, prompts.tokens[index - 1])
        class_tokens.append(tokens[:, 0])
    features = encoder(images, prompts)
    torch.testing.assert_close(features.embedding, encoder.head(tokens), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.block_cls, torch.stack(class_tokens[1:], dim=1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(features.embedding, clip.encode_image(images), atol=1e-3)


def test_final_class_token_is_what_the_head_pools(clip, images):
    encoder = PromptedVisionEncoder(clip.visual)
    torch.manual_seed(0)
    prompts = encoder.new_prompts(start_block=1, num_tokens=5)
    torch.testing.assert_close(encoder.final_class_token(images, prompts), encoder(images, prompts).block_cls[:, -1])
    # without prompts: open_clip's own blocks, and ln_post + proj of it is encode_image
    tokens = clip.visual._embeds(images)
    for block in clip.visual.transformer.resblocks:
        tokens = block(tokens)
    unprompted = encoder.final_class_token(images)
    assert torch.equal(unprompted, tokens[:, 0])
    torch.testing.assert_close(clip.visual.ln_post(unprompted) @ clip.visual.proj, clip.encode_image(images))


def test_reference_pass_shares_the_unprompted_blocks(clip, images):
    encoder = PromptedVisionEncoder(clip.visual)
    prompts = encoder.new_prompts(start_block=2, num_tokens=3)
    prompted, frozen = encoder.forward_with_reference(images, prompts)
    assert torch.equal(frozen.embedding, clip.encode_image(images))
    torch.testing.assert_close(prompted.embedding, encoder(images, prompts).embedding)
    assert prompted.block_cls.shape == frozen.block_cls.shape == (3, encoder.num_blocks - 2, encoder.width)
    # the last class token, pooled, is the embedding
    pooled = clip.visual.ln_post(prompted.block_cls[:, -1]) @ clip.visual.proj
    torch.testing.assert_close(pooled, prompted.embedding)


def test_only_the_prompts_get_gradients(clip, images):
    encoder = PromptedVisionEncoder(clip.visual)
    prompts = encoder.new_prompts(start_block=1, num_tokens=2)
    prompted, frozen = encoder.forward_with_reference(images, prompts)
    (prompted.embedding.sum() + prompted.block_cls.sum()).backward()
    assert prompts.tokens.grad is not None and prompts.tokens.grad.abs().sum() > 0
    assert all(parameter.grad is None and not parameter.requires_grad for parameter in clip.visual.parameters())
    assert not frozen.embedding.requires_grad


def test_prompted_clip_logits_are_scaled_cosines(clip, images):
    encoder = PromptedVisionEncoder(clip.visual)
    text = torch.randn(4, clip.visual.output_dim)
    model = PromptedCLIP(encoder, text, logit_scale=7.0)
    logits, embedding = model(images)
    expected = 7.0 * F.normalize(clip.encode_image(images), dim=-1) @ F.normalize(text, dim=-1).T
    torch.testing.assert_close(logits, expected)
    assert torch.equal(embedding, clip.encode_image(images))


@pytest.mark.parametrize("start_block, num_tokens", [(-1, 4), (99, 4), (1, 0)])
def test_bad_prompt_shapes_are_rejected(start_block, num_tokens):
    with pytest.raises(InputError):
        VisualPrompts(num_blocks=3, width=8, start_block=start_block, num_tokens=num_tokens)


def test_resnet_towers_are_rejected():
    resnet = open_clip.model.CLIP(embed_dim=32, vision_cfg={"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
                                  text_cfg={"context_length": 8, "vocab_size": 100, "width": 32, "heads": 1,
                                            "layers": 1})
    with pytest.raises(ModelLoadError, match="VisionTransformer"):
        PromptedVisionEncoder(resnet.visual)


def test_text_encoder_matches_encode_text(clip, tokenizer):
    token_ids = tokenizer(["a photo of a coat.", "an ankle boot"])
    assert torch.equal(TextEncoder(clip)(token_ids), clip.encode_text(token_ids))


def test_class_context_starts_as_the_template(clip, tokenizer):
    text_encoder = TextEncoder(clip)
    context = ClassContext(text_encoder, tokenizer, CLASSES, num_context=4, init_words="a photo of a")
    embeddings, token_ids = context()
    expected = clip.encode_text(tokenizer([f"a photo of a {name}." for name in CLASSES]))
    torch.testing.assert_close(text_encoder.encode(embeddings, token_ids), expected)
    assert context.context.shape == (len(CLASSES), 4, clip.token_embedding.weight.shape[1])


@pytest.mark.parametrize("position, expected", [
    ("end", "x x x x ankle boot . "), ("front", "ankle boot x x x x . "), ("middle", "x x ankle boot x x . ")])
def test_class_context_positions(clip, tokenizer, position, expected):
    context = ClassContext(TextEncoder(clip), tokenizer, CLASSES, num_context=4, position=position, init_words=None)
    ids = context.token_ids[1]
    body = ids[1:int(ids.argmax())].tolist()  # between start and end of text
    assert tokenizer.decode(body) == expected
    slots = context.context_positions[1].tolist()
    assert all(ids[slot] == tokenizer.encode("x")[0] for slot in slots)


def test_class_context_trains_only_its_context(clip, tokenizer):
    text_encoder = TextEncoder(clip)
    context = ClassContext(text_encoder, tokenizer, CLASSES, num_context=2, init_words=None)
    text_encoder.encode(*context()).sum().backward()
    assert context.context.grad is not None and context.context.grad.abs().sum() > 0
    assert [name for name, parameter in context.named_parameters() if parameter.requires_grad] == ["context"]


def test_class_context_rejects_bad_settings(clip, tokenizer):
    text_encoder = TextEncoder(clip)
    with pytest.raises(InputError, match="position"):
        ClassContext(text_encoder, tokenizer, CLASSES, position="side")
    with pytest.raises(InputError, match="needs"):
        ClassContext(text_encoder, tokenizer, ["a very long class name " * 3], num_context=8)


def test_class_text_features_average_templates(clip, tokenizer):
    text_encoder = TextEncoder(clip)
    templates = ("a photo of a {}.", "a drawing of a {}.")
    features = class_text_features(text_encoder, tokenizer, CLASSES, templates)
    assert features.shape == (len(CLASSES), clip.text_projection.shape[1])
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(len(CLASSES)))
    per_template = [F.normalize(clip.encode_text(tokenizer([t.format(c) for t in templates])), dim=-1)
                    for c in CLASSES]
    expected = F.normalize(torch.stack([f.mean(0) for f in per_template]), dim=-1)
    torch.testing.assert_close(features, expected)
    with pytest.raises(InputError, match="template"):
        class_text_features(text_encoder, tokenizer, CLASSES, ("no placeholder",))
