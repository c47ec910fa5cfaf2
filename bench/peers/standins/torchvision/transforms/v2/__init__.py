"""torchvision.transforms.v2 placeholder: transformers imports it for its fast image processors, unused here."""
