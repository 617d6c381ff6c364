"""The folded serving form against the literal prompt-concatenation form it replaces."""
import copy
import os

import pytest
import torch
from torch import nn

from guard._compat import import_open_clip
from guard.errors import ModelLoadError
from guard.folded import FoldedBlock, attend_with_prompts, fold
from guard.prompted import PromptedCLIP, PromptedVisionEncoder

from conftest import TINY_CFG

open_clip = import_open_clip()


def random_clip(seed: int, **vision_overrides) -> nn.Module:
    cfg = copy.deepcopy(TINY_CFG)
    cfg["vision_cfg"].update(vision_overrides)
    torch.manual_seed(seed)
    clip = open_clip.model.CLIP(**cfg).eval()
    with torch.no_grad():
        for parameter in clip.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return clip


def prompted_model(clip, start_block: int, num_tokens: int) -> PromptedCLIP:
    encoder = PromptedVisionEncoder(clip.visual)
    prompts = encoder.new_prompts(start_block, num_tokens)
    with torch.no_grad():  # large prompts, so a folding mistake cannot hide in the noise
        prompts.tokens.normal_(0, 1)
    return PromptedCLIP(encoder, torch.randn(5, TINY_CFG["embed_dim"]), 30.0, prompts).eval()


@pytest.mark.parametrize("start_block, num_tokens, batch", [(0, 5, 3), (1, 1, 1), (2, 7, 4), (3, 2, 2)])
def test_folded_equals_literal(start_block, num_tokens, batch):
    model = prompted_model(random_clip(start_block), start_block, num_tokens)
    images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        literal_logits, literal_embedding = model(images)
        folded = fold(model)
        folded_logits, folded_embedding = folded(images)
    assert folded.num_folded_blocks == 3 - start_block
    torch.testing.assert_close(folded_embedding, literal_embedding, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(folded_logits, literal_logits, atol=1e-4, rtol=1e-4)
    # the prompts matter: the plain tower gives something else
    if start_block < 3:
        assert not torch.allclose(folded_embedding, model.encoder.visual(images), atol=1e-3)


@pytest.mark.parametrize("overrides", [{"ls_init_value": 0.5}, {"mlp_ratio": 2.0}])
def test_folded_equals_literal_for_block_variants(overrides):
    clip = random_clip(7, **overrides)
    model = prompted_model(clip, 1, 4)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fold(model)(images)[1], model(images)[1], atol=2e-5, rtol=1e-4)


def test_folding_without_prompts_is_the_plain_tower():
    clip = random_clip(3)
    model = PromptedCLIP(PromptedVisionEncoder(clip.visual), torch.randn(5, TINY_CFG["embed_dim"]), 30.0)
    images = torch.randn(2, 3, 32, 32)
    folded = fold(model)
    assert folded.num_folded_blocks == 0
    with torch.no_grad():
        assert torch.equal(folded(images)[1], clip.encode_image(images))


def test_frozen_rows_run_through_the_plain_tower_in_the_same_call():
    model = prompted_model(random_clip(5), 1, 3)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    plain = PromptedCLIP(model.encoder, model.text_features, model.logit_scale)  # the prompts off
    with torch.no_grad():
        logits, embedding = fold(model)(images, frozen_rows=2)
        torch.testing.assert_close(embedding[:3], model(images[:3])[1], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(embedding[3:], plain(images[3:])[1], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(logits[3:], plain(images[3:])[0], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(embedding[3:], model(images[3:])[1], atol=1e-3)  # the prompts do matter


def test_prompt_keys_and_values_are_the_blocks_projections():
    clip = random_clip(4)
    block = clip.visual.transformer.resblocks[1]
    prompt = torch.randn(6, TINY_CFG["vision_cfg"]["width"])
    folded = FoldedBlock(block, prompt)
    heads = block.attn.num_heads
    width = prompt.shape[-1]
    w_q, w_k, w_v = block.attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = block.attn.in_proj_bias.chunk(3)
    normed = block.ln_1(prompt)
    expected_k = (normed @ w_k.T + b_k).reshape(6, heads, width // heads).transpose(0, 1)
    expected_v = (normed @ w_v.T + b_v).reshape(6, heads, width // heads).transpose(0, 1)
    torch.testing.assert_close(folded.prompt_k, expected_k)
    torch.testing.assert_close(folded.prompt_v, expected_v)
    assert folded.num_prompts == 6
    assert not any(buffer.requires_grad for buffer in folded.buffers())


def test_attend_with_prompts_is_one_softmax_over_both_key_sets():
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 4, 8, generator=generator) for _ in range(3))
    prompt_k, prompt_v = (torch.randn(3, 5, 8, generator=generator) for _ in range(2))
    scores = torch.cat([q @ k.transpose(-1, -2), q @ prompt_k.transpose(-1, -2)], dim=-1) / 8 ** 0.5
    expected = scores.softmax(dim=-1) @ torch.cat([v, prompt_v.expand(2, -1, -1, -1)], dim=2)
    torch.testing.assert_close(attend_with_prompts(q, k, v, prompt_k, prompt_v), expected)


def test_a_block_that_cannot_be_folded_is_refused():
    clip = random_clip(5)
    block = copy.deepcopy(clip.visual.transformer.resblocks[0])
    block.attn = nn.Identity()
    with pytest.raises(ModelLoadError, match="block 2 .*not an nn.MultiheadAttention"):
        FoldedBlock(block, torch.randn(2, TINY_CFG["vision_cfg"]["width"]), index=2)


def test_folded_form_computes_no_projection_or_mlp_for_prompt_tokens():
    # FlopCounterMode counts the linear layers (attention products are not counted on the
    # CPU): the folded tower must do exactly the plain tower's, the literal one more.
    from torch.utils.flop_counter import FlopCounterMode

    model = prompted_model(random_clip(9), 1, 7)
    plain = PromptedCLIP(model.encoder, model.text_features, 30.0)
    images = torch.randn(2, 3, 32, 32)

    def linear_flops(module):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(images)
        return counter.get_total_flops()

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused fast path hides its products from the counter
    try:
        plain_flops, folded_flops, literal_flops = linear_flops(plain), linear_flops(fold(model)), linear_flops(model)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    assert folded_flops == plain_flops < literal_flops


def test_fused_operator_gives_the_folded_result():
    from guard.folded import fused_attention_available

    if not fused_attention_available():
        if os.environ.get("CLIP_GUARD_REQUIRE_EXT") == "1":
            pytest.fail("the clip_guard C++ operator is not built (python -m cpp_ext build)")
        pytest.skip("the clip_guard C++ operator is not built (python -m cpp_ext build)")
    model = prompted_model(random_clip(11), 1, 5)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    standard, fused = fold(model, fused=False), fold(model, fused=True)
    assert fused.fused and not standard.fused and fold(model, fused=None).fused  # on by default on the CPU
    with torch.no_grad():
        torch.testing.assert_close(fused(images)[1], standard(images)[1], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(fused(images)[1], model(images)[1], atol=2e-5, rtol=1e-4)
