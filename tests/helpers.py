"""Small helpers shared by several test modules."""

import torch


def randomize(module, std=0.1, seed=0):
    """Fresh random weights; on READ's side networks this moves W_o off its zero initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def train_steps(model, batch, labels, loss_fn, lr, steps=15):
    """(loss before, loss after) ``steps`` AdamW steps on one batch; both losses in eval mode."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def loss():
        return loss_fn(model(**batch), labels)

    model.eval()
    with torch.no_grad():
        first = loss().item()
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return first, loss().item()


def assert_restores(restored, trained, saved_path, state, batch):
    """Loading the saved trained state into a freshly built model reproduces the trained model's outputs."""
    with torch.no_grad():
        assert not torch.equal(restored(**batch), trained(**batch))
        result = restored.load_state_dict(torch.load(saved_path), strict=False)
        assert result.unexpected_keys == []
        assert set(result.missing_keys) == set(restored.state_dict()) - set(state)  # only the frozen backbone
        assert torch.equal(restored(**batch), trained(**batch))
        return result


def own_copy(backbone):
    """A deep copy, for methods that change the backbone they get (the session fixture must stay as it is)."""
    import copy
    import dataclasses

    return dataclasses.replace(backbone, model=copy.deepcopy(backbone.model))


def t5_batch(seed=0):
    """A text-to-text batch for a tiny random T5: 3 sources of 7 tokens (one padded) and 3 x 4 target tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0  # one padded source
    labels = torch.randint(5, 1000, (3, 4), generator=gen)
    decoder_input_ids = torch.cat([torch.zeros(3, 1, dtype=torch.long), labels[:, :-1]], 1)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_input_ids}, labels
