"""Model helpers: the masks that keep pruned weights at zero."""


def test_keep_zeros_masks_only_trainable_weight_matrices():
    """A frozen layer has no gradient to mask (it crashed the fine-tune); biases are never masked."""
    import torch
    from torch import nn

    from lepton.model.builders import zero_masks

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with torch.no_grad():
        for layer in model:
            layer.weight[0, 0] = 0.0
            layer.bias.zero_()
    model[0].requires_grad_(False)
    masks = zero_masks(model)
    assert [p is model[1].weight for p, _ in masks] == [True]
    assert masks[0][1].sum() == model[1].weight.numel() - 1
