import torch
from tiny_models import SMALL_DSA, random_ids, tiny_model

import dsa


def _converted(top_k=16):
    return dsa.convert(tiny_model(), dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=top_k))


def test_warmup_freezes_all_but_indexer():
    model = _converted()
    dsa.set_mode(model, "warmup")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".indexer." in name for name in trainable)
    assert {id(p) for p in dsa.indexer_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}


def test_warmup_step_keeps_base_identical():
    model = _converted()
    dsa.set_mode(model, "warmup")
    model.train()
    base_before = {name: p.detach().clone() for name, p in model.named_parameters() if ".indexer." not in name}
    indexer_before = [p.detach().clone() for p in dsa.indexer_parameters(model)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = random_ids(2, 24)
    output = model(ids, labels=ids)
    assert output.indexer_loss.ndim == 0
    assert output.indexer_loss > 0
    torch.testing.assert_close(output.loss, output.lm_loss + output.indexer_loss)
    output.loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if ".indexer." not in name:
            assert p.grad is None, f"{name} received a gradient in warm-up"
            assert torch.equal(p, base_before[name]), f"{name} changed in warm-up"
    assert any(not torch.equal(p, before) for p, before in zip(dsa.indexer_parameters(model), indexer_before))


def test_warmup_lowers_kl():
    model = _converted()
    dsa.set_mode(model, "warmup")
    model.train()
    optimizer = torch.optim.AdamW(dsa.indexer_parameters(model), lr=3e-3)
    ids = random_ids(4, 32, seed=1)
    losses = []
    for _ in range(30):
        loss = model(ids).indexer_loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.7 * losses[0], losses


def test_loss_without_labels_is_indexer_loss():
    model = _converted()
    dsa.set_mode(model, "warmup")
    output = model(random_ids(1, 12))
    torch.testing.assert_close(output.loss, output.indexer_loss)
    assert "lm_loss" not in output


def test_no_indexer_loss_without_grad():
    model = _converted()
    dsa.set_mode(model, "warmup")
    with torch.no_grad():
        output = model(random_ids(1, 12))
    assert "indexer_loss" not in output
    assert output.loss is None


def test_sparse_losses_stay_separate():
    model = _converted(top_k=5)
    model.train()
    ids = random_ids(2, 24)
    output = model(ids, labels=ids)
    assert output.indexer_loss > 0
    output.indexer_loss.backward()
    for name, p in model.named_parameters():
        if ".indexer." in name:
            assert p.grad is not None
        else:
            assert p.grad is None or p.grad.abs().max() == 0, f"the indexer KL reached base parameter {name}"
    model.zero_grad()
    model(ids, labels=ids).lm_loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().max() > 0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in dsa.indexer_parameters(model)), (
        "the LM loss reached the indexer"
    )


def test_gradient_checkpointing_non_reentrant_matches_plain():
    ids = random_ids(2, 24)
    grads = []
    for checkpointing in (False, True):
        model = _converted(top_k=5)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        output = model(ids, labels=ids)
        output.loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_small_config_converts_with_default_sizing():
    model = tiny_model()
    dsa.convert(model)
    config = model.dsa_runtime.config
    assert (config.indexer_heads, config.indexer_head_dim, config.rope_dim, config.top_k) == (4, 16, 8, 2048)
    assert config.rope_theta == model.config.rope_parameters["rope_theta"]
    assert SMALL_DSA.top_k == 16
