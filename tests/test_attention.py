"""The selectable attention kernels against the math reference (model/attention.py), on CPU."""
import pytest
import torch

from model.attention import IMPLS, attend_flex, attend_math, attend_sdpa, use_attention
from model.beit import create_model, timm_export

B, H, N, D = 2, 3, 17, 8  # N = 1 + 4x4 patches: odd, so SDPA's bias alignment padding is exercised


def inputs(dtype, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(dtype).requires_grad_(requires_grad) for _ in range(3))
    bias = torch.randn(1, H, N, N, generator=g).to(dtype).requires_grad_(requires_grad)  # shared over the batch
    return q, k, v, bias


def run(fn, tensors):
    q, k, v, bias = tensors
    out = fn(q, k, v, bias, D ** -0.5)  # [B, H, N, D]
    out.float().square().sum().backward()
    return out.detach().float(), [t.grad.float() for t in tensors]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_sdpa_matches_math_outputs_and_gradients(dtype, tol):
    ref_out, ref_grads = run(attend_math, inputs(torch.float32))  # the fp32 reference
    out, grads = run(attend_sdpa, inputs(dtype))
    scale = ref_out.abs().max()
    assert (out - ref_out).abs().max() <= tol * scale
    for name, g, r in zip("qkv", grads, ref_grads):
        assert (g - r).abs().max() <= tol * r.abs().max() * 2, name
    assert (grads[3] - ref_grads[3]).abs().max() <= tol * ref_grads[3].abs().max() * 2  # the bias table's gradient


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_flex_matches_math_forward(dtype, tol):
    # torch 2.14.1 has no FlexAttention backward on CPU (NotImplementedError, eager and compiled):
    # on CPU only its forward is checkable; its gradients are checked where CUDA is.
    ref = attend_math(*inputs(torch.float32, requires_grad=False), D ** -0.5)
    out = attend_flex(*inputs(dtype, requires_grad=False), D ** -0.5)
    assert (out.float() - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward needs CUDA")
def test_flex_gradients_on_cuda():
    ref_out, ref_grads = run(attend_math, [t.detach().cuda().requires_grad_() for t in inputs(torch.float32)])
    out, grads = run(attend_flex, [t.detach().cuda().requires_grad_() for t in inputs(torch.float32)])
    assert torch.allclose(out, ref_out, atol=1e-4)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-4, rtol=1e-3)


def model_loss(impl, amp=False, seed=0):
    torch.manual_seed(seed)
    model = use_attention(create_model("micro", img_size=16, depth=2, vocab_size=32), impl)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 16, 16, generator=g)
    mask = torch.rand(2, 16, generator=g) < 0.5
    targets = torch.randint(0, 32, (2, 4, 4), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss, _ = model(images, mask, targets)
    loss.backward()
    table = model.rel_pos_bias.relative_position_bias_table.grad
    return model, loss.detach(), table.clone()


def test_timm_impl_is_todays_forward_bit_for_bit():
    torch.manual_seed(0)
    plain = create_model("micro", img_size=16, depth=2, vocab_size=32)
    _, loss, _ = model_loss("timm")
    g = torch.Generator().manual_seed(1)
    images, mask = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, 16, generator=g) < 0.5
    targets = torch.randint(0, 32, (2, 4, 4), generator=g)
    assert torch.equal(plain(images, mask, targets)[0].detach(), loss)


@pytest.mark.parametrize("impl", ["math", "sdpa"])
@pytest.mark.parametrize("amp,tol", [(False, 1e-5), (True, 3e-2)])
def test_model_loss_and_bias_gradient_match_timm(impl, amp, tol):
    _, ref_loss, ref_table = model_loss("timm", amp)
    _, loss, table = model_loss(impl, amp)
    assert abs(float(loss) - float(ref_loss)) <= tol * abs(float(ref_loss))
    assert (table - ref_table).abs().max() <= tol * ref_table.abs().max() + 1e-7


def test_switching_keeps_state_dict_and_timm_export():
    torch.manual_seed(0)
    plain = create_model("micro", img_size=16, depth=2, vocab_size=32)
    torch.manual_seed(0)
    fused = use_attention(create_model("micro", img_size=16, depth=2, vocab_size=32), "sdpa")
    a, b = timm_export(plain)[0], timm_export(fused)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert timm_export(plain)[1] == timm_export(fused)[1]


def test_unknown_impl_is_an_error():
    with pytest.raises(ValueError, match="attention='fast'"):
        use_attention(create_model("micro", img_size=16, depth=1, vocab_size=32), "fast")
    assert set(IMPLS) == {"timm", "math", "sdpa", "flex"}


def test_pretrain_param_selects_the_kernel_and_only_a_non_default_changes_the_run(tmp_path):
    import dataclasses

    from helpers import tiny_params
    from model.attention import BiasAttention
    from stages.pretrain import build_model, run_fingerprint

    params = tiny_params(tmp_path)
    fused = dataclasses.replace(params, pretrain=dataclasses.replace(params.pretrain, attention="sdpa"))
    assert params.pretrain.attention == "timm"
    model = build_model(fused, 64, (8, 8))
    assert {m.attn_impl for m in model.modules() if isinstance(m, BiasAttention)} == {"sdpa"}
    assert run_fingerprint(fused, {}) != run_fingerprint(params, {})
    math = dataclasses.replace(params, pretrain=dataclasses.replace(params.pretrain, attention="math"))
    assert len({run_fingerprint(p, {}) for p in (params, fused, math)}) == 3
