import numpy as np
import pytest

import tlm  # noqa: F401  (BLAS before MLX)
import mlx.core as mx
import mlx.nn as nn

from tlm.model import Model, ModelArgs
from tlm.train import loss_fn


def small(**kw) -> Model:
    mx.random.seed(0)
    model = Model(ModelArgs(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, **kw))
    mx.eval(model.parameters())
    return model


def test_logits_shape_and_llama_parameter_names():
    model = small()
    x = mx.random.randint(0, 50, (3, 7))
    assert model(x).shape == (3, 7, 50)
    names = {k for k, _ in nn.utils.tree_flatten(model.parameters())}
    assert "model.embed_tokens.weight" in names
    assert "model.layers.1.self_attn.q_proj.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names
    assert "model.layers.0.post_attention_layernorm.weight" in names
    assert "model.norm.weight" in names and "lm_head.weight" in names
    assert not any(k.endswith(".bias") for k in names)


def test_tied_embeddings_have_no_output_head():
    model = small(tie_word_embeddings=True)
    names = {k for k, _ in nn.utils.tree_flatten(model.parameters())}
    assert "lm_head.weight" not in names
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 50)


def test_causal_later_tokens_never_change_earlier_logits():
    model = small()
    x = np.random.default_rng(0).integers(0, 50, (1, 10))
    y = x.copy()
    y[0, 6:] = (y[0, 6:] + 7) % 50
    a, b = np.array(model(mx.array(x))), np.array(model(mx.array(y)))
    np.testing.assert_allclose(a[0, :6], b[0, :6], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[0, 6:], b[0, 6:])


def test_kv_cache_decoding_matches_full_forward():
    model = small()
    x = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    full = np.array(model(x))
    cache = model.make_cache()
    first = np.array(model(x[:, :5], cache=cache))
    steps = [np.array(model(x[:, i : i + 1], cache=cache)) for i in range(5, 8)]
    np.testing.assert_allclose(np.concatenate([first] + steps, axis=1), full, rtol=1e-4, atol=1e-4)


def test_word_dropout_drops_every_occurrence_of_a_word_and_only_in_training():
    from tlm.model import WordDropout

    drop = WordDropout(vocab_size=50, p=0.5)
    inputs = mx.array([list(range(50)) * 4])  # each word four times
    h = mx.ones((1, 200, 8))
    mx.random.seed(0)
    scale = np.array(drop(h, inputs))[0, :, 0].reshape(4, 50)
    assert set(np.unique(scale)) == {0.0, 2.0}  # dropped, or kept and scaled by 1/(1-p)
    assert (scale == scale[0]).all()  # a word's occurrences share their fate
    assert 10 < (scale[0] == 0).sum() < 40
    drop.eval()
    assert (np.array(drop(h, inputs)) == 1.0).all()


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = small()
    x = mx.random.randint(0, 50, (2, 9))
    grad = nn.value_and_grad(model, loss_fn)
    plain_loss, plain_grads = grad(model, x[:, :-1], x[:, 1:])
    ck_loss, ck_grads = grad(model, x[:, :-1], x[:, 1:], checkpoint=True)
    assert plain_loss.item() == pytest.approx(ck_loss.item(), rel=1e-6)
    for (k, a), (_, b) in zip(nn.utils.tree_flatten(plain_grads), nn.utils.tree_flatten(ck_grads)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-6, err_msg=k)


def test_fast_exp_silu_and_cross_entropy_match_mlx():
    from tlm import fastmath

    x = mx.random.normal((1000,)) * 20
    np.testing.assert_allclose(np.array(fastmath.exp(x)), np.array(mx.exp(x)), rtol=1e-5)
    np.testing.assert_allclose(np.array(fastmath.silu(x)), np.array(nn.silu(x)), rtol=1e-5, atol=1e-6)
    logits, targets = mx.random.normal((4, 7, 30)) * 3, mx.random.randint(0, 30, (4, 7))
    np.testing.assert_allclose(np.array(fastmath.cross_entropy(logits, targets)),
                               np.array(nn.losses.cross_entropy(logits, targets)), rtol=1e-5)
    g_fast = mx.grad(lambda z: fastmath.cross_entropy(z, targets).sum())(logits)
    g_mlx = mx.grad(lambda z: nn.losses.cross_entropy(z, targets).sum())(logits)
    np.testing.assert_allclose(np.array(g_fast), np.array(g_mlx), rtol=1e-4, atol=1e-6)
