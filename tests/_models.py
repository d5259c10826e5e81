"""Test helpers shared by several test files (not collected: no test_ prefix)."""


def randomised_model(variant="ternary-tanh", base=8, seed=0):
    """A TernaryUNet in eval mode with random batch-norm statistics and affine parameters (some
    negative scales, so the export must flip filters)."""
    import torch

    from training.network import NetworkConfig, TernaryUNet

    torch.manual_seed(seed)
    model = TernaryUNet(NetworkConfig(variant=variant, base_channels=base))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.normal_(0, 3)
                module.running_var.uniform_(2, 30)
                module.weight.normal_(0.8, 0.6)
                module.bias.normal_(0, 0.7)
    return model.eval()
